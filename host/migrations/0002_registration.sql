-- Device registration: operations live here so that any node answers a poll; the `record`
-- hub driver keeps device identities and twins here.

CREATE TABLE operations (
    operation_id TEXT PRIMARY KEY,
    registration_key TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    result TEXT,
    lease_until BIGINT NOT NULL,
    created_unix BIGINT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);

CREATE INDEX operations_by_age ON operations (created_unix);

CREATE TABLE hub_devices (
    hub_key TEXT NOT NULL,
    device_key TEXT NOT NULL,
    device_id TEXT NOT NULL,
    sealed_identity TEXT NOT NULL,
    twin TEXT NOT NULL,
    etag TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    PRIMARY KEY (hub_key, device_key)
);

CREATE INDEX enrollment_groups_by_attestation ON enrollment_groups (attestation_type, id_key);
