-- CA certificates the operator uploads, optionally verified by proof of possession.

CREATE TABLE ca_certificates (
    name_key TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    pem TEXT NOT NULL,
    info TEXT NOT NULL,
    is_verified BIGINT NOT NULL,
    verification_code TEXT,
    code_expiry BIGINT,
    etag TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
