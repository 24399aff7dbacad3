use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A row of `auth_tokens` as the sessions list reads it. The hash stays on the server: it is
/// what the credential is looked up by; `id` is the session's public name.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredSession {
    pub id: Uuid,
    pub token_hash: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}
