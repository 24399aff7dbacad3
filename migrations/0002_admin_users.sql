-- Users who may call the /admin endpoints with their own bearer token (besides ADMIN_TOKEN).
-- Granted and revoked with `nestling admin grant|revoke <email>`.
ALTER TABLE users ADD COLUMN is_admin boolean NOT NULL DEFAULT false;
