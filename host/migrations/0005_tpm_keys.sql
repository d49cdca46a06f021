-- The key K each TPM device was last issued (wire-protocol.md §7.3): the server verifies the
-- device's SAS tokens with it and writes it to the hub. Sealed like every secret.

CREATE TABLE tpm_keys (
    registration_key TEXT PRIMARY KEY,
    sealed_key TEXT NOT NULL,
    blob TEXT NOT NULL,
    created BIGINT NOT NULL
);
