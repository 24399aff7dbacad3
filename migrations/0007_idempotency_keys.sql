-- Idempotency keys (README, "Idempotency keys"; src/infra/idempotency): the first answer to a
-- write sent with an `Idempotency-Key`, per user and key, inserted in the write's own
-- transaction and replayed byte for byte until it expires.
CREATE TABLE idempotency_keys (
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key text NOT NULL,
    -- SHA-256 of method, path and the parsed body: the same key with another request is a 422.
    request_hash bytea NOT NULL,
    status smallint NOT NULL,
    content_type text,
    body bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, key)
);

-- The prune finds expired records through this.
CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);
