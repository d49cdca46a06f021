-- Policy modules and lookup tables: every upload is an immutable version.

CREATE TABLE policies (
    name_key TEXT NOT NULL,
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    world TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    wasm TEXT NOT NULL,
    limits TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (name_key, version)
);

CREATE TABLE lookup_tables (
    name_key TEXT NOT NULL,
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    doc TEXT NOT NULL,
    size BIGINT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (name_key, version)
);
