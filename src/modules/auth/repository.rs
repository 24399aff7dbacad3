use async_trait::async_trait;
use chrono::{DateTime, Utc};
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use crate::infra::database::Database;

/// Auth tokens, stored by SHA-256 only.
#[async_trait]
pub trait TokenRepository: Interface {
    async fn insert(&self, token_hash: &[u8], user_id: Uuid, expires_at: DateTime<Utc>) -> Result<(), sqlx::Error>;
    /// The id of the user a live (unexpired) token belongs to, with the token's expiry. Tokens go
    /// with their user (`ON DELETE CASCADE`), so no join is needed to know the user exists.
    async fn find_user(&self, token_hash: &[u8]) -> Result<Option<(Uuid, DateTime<Utc>)>, sqlx::Error>;
    async fn delete(&self, token_hash: &[u8]) -> Result<(), sqlx::Error>;
}

#[derive(Component)]
#[shaku(interface = TokenRepository)]
pub struct PgTokenRepository {
    #[shaku(inject)]
    db: Arc<dyn Database>,
}

#[async_trait]
impl TokenRepository for PgTokenRepository {
    async fn insert(&self, token_hash: &[u8], user_id: Uuid, expires_at: DateTime<Utc>) -> Result<(), sqlx::Error> {
        // Expired tokens of this user go at the same time, so the table does not grow without bound.
        let work = async {
            let mut tx = self.db.pool().begin().await?;
            sqlx::query("DELETE FROM auth_tokens WHERE user_id = $1 AND expires_at <= now()")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO auth_tokens (token_hash, user_id, expires_at) VALUES ($1, $2, $3)")
                .bind(token_hash)
                .bind(user_id)
                .bind(expires_at)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        };
        self.db.run(work).await
    }

    async fn find_user(&self, token_hash: &[u8]) -> Result<Option<(Uuid, DateTime<Utc>)>, sqlx::Error> {
        let query =
            sqlx::query_as("SELECT user_id, expires_at FROM auth_tokens WHERE token_hash = $1 AND expires_at > now()")
                .bind(token_hash);
        self.db.run(query.fetch_optional(self.db.pool())).await
    }

    async fn delete(&self, token_hash: &[u8]) -> Result<(), sqlx::Error> {
        let query = sqlx::query("DELETE FROM auth_tokens WHERE token_hash = $1").bind(token_hash);
        self.db.run(query.execute(self.db.pool())).await.map(|_| ())
    }
}
