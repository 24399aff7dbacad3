-- Accounts are matched by one normalised form of the email, computed by the app
-- (`users::model::email_key`: NFKC and Unicode case folding), so the login limiter, the lookups
-- and the unique index agree. `lower()` follows the database's locale and disagrees with Rust
-- on letters such as 'İ'; existing rows are keyed by it once here, which matches the app's form
-- for every ASCII address.
ALTER TABLE users ADD COLUMN email_key text;
UPDATE users SET email_key = lower(email);
ALTER TABLE users ALTER COLUMN email_key SET NOT NULL;
DROP INDEX users_email_key;
CREATE UNIQUE INDEX users_email_key ON users (email_key);
