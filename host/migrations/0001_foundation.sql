-- Portable between SQLite and PostgreSQL: TEXT and BIGINT only. IDs are compared
-- case-insensitively through the lower-cased *_key columns; display IDs keep their case.

CREATE TABLE instance_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE access_policies (
    name_key TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    rights TEXT NOT NULL,
    primary_key TEXT NOT NULL,
    secondary_key TEXT NOT NULL,
    etag TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);

CREATE TABLE enrollments (
    id_key TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    doc TEXT NOT NULL,
    sealed_keys TEXT,
    etag TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    provisioning_status TEXT NOT NULL,
    attestation_type TEXT NOT NULL,
    device_id TEXT,
    iot_hub_host_name TEXT,
    allocation_policy TEXT
);

CREATE TABLE enrollment_groups (
    id_key TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    doc TEXT NOT NULL,
    sealed_keys TEXT,
    etag TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    provisioning_status TEXT NOT NULL,
    attestation_type TEXT NOT NULL,
    device_id TEXT,
    iot_hub_host_name TEXT,
    allocation_policy TEXT
);

CREATE TABLE registrations (
    id_key TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    group_key TEXT,
    doc TEXT NOT NULL,
    etag TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    status TEXT NOT NULL,
    assigned_hub TEXT,
    device_id TEXT
);

CREATE INDEX registrations_by_group ON registrations (group_key, id_key);

CREATE TABLE linked_hubs (
    name_key TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    sealed_connection_string TEXT,
    allocation_weight BIGINT NOT NULL,
    apply_allocation_policy BIGINT NOT NULL,
    location TEXT,
    etag TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
