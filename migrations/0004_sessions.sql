-- Sessions a user can list and end (`/api/auth/sessions`): every token gets a public id (never
-- its hash, which is what the credential is looked up by) and the time it was last used, written
-- at most once a minute per token. `created_at` exists since 0001. gen_random_uuid() is built in
-- since Postgres 13, as 0001 relies on.
ALTER TABLE auth_tokens ADD COLUMN id uuid NOT NULL DEFAULT gen_random_uuid();
ALTER TABLE auth_tokens ADD CONSTRAINT auth_tokens_id_key UNIQUE (id);
-- Unknown for tokens issued before this migration: their creation is the best guess.
ALTER TABLE auth_tokens ADD COLUMN last_used_at timestamptz;
UPDATE auth_tokens SET last_used_at = created_at;
ALTER TABLE auth_tokens
    ALTER COLUMN last_used_at SET DEFAULT now(),
    ALTER COLUMN last_used_at SET NOT NULL;
