use async_trait::async_trait;
use chrono::{DateTime, Utc};
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use super::model::StoredSession;
use crate::infra::database::Database;

/// Auth tokens, stored by SHA-256 only.
#[async_trait]
pub trait TokenRepository: Interface {
    async fn insert(&self, token_hash: &[u8], user_id: Uuid, expires_at: DateTime<Utc>) -> Result<(), sqlx::Error>;
    /// The id of the user a live (unexpired) token belongs to, with the token's expiry. Tokens go
    /// with their user (`ON DELETE CASCADE`), so no join is needed to know the user exists.
    async fn find_user(&self, token_hash: &[u8]) -> Result<Option<(Uuid, DateTime<Utc>)>, sqlx::Error>;
    async fn delete(&self, token_hash: &[u8]) -> Result<(), sqlx::Error>;
    /// The user's live sessions, newest first.
    async fn sessions(&self, user_id: Uuid) -> Result<Vec<StoredSession>, sqlx::Error>;
    /// The hash of the token behind one of the user's sessions (`None`: unknown, or another user's).
    async fn session_hash(&self, user_id: Uuid, id: Uuid) -> Result<Option<Vec<u8>>, sqlx::Error>;
    /// The hashes of every token of the user.
    async fn hashes(&self, user_id: Uuid) -> Result<Vec<Vec<u8>>, sqlx::Error>;
    /// Deletes one of the user's sessions; returns the hash of the token it ended, if any.
    async fn delete_session(&self, user_id: Uuid, id: Uuid) -> Result<Option<Vec<u8>>, sqlx::Error>;
    /// Deletes every token of the user but `except`; returns the hashes of those it ended.
    async fn delete_all(&self, user_id: Uuid, except: Option<&[u8]>) -> Result<Vec<Vec<u8>>, sqlx::Error>;
    /// Records a use of these live tokens, skipping any written in the last `TOUCH_GUARD`. With
    /// `extend = Some((to, before))`, a token that expires before `before` then expires at `to`.
    /// Returns the hashes of the tokens it extended.
    async fn touch(
        &self,
        hashes: &[Vec<u8>],
        extend: Option<(DateTime<Utc>, DateTime<Utc>)>,
    ) -> Result<Vec<Vec<u8>>, sqlx::Error>;
}

/// Across instances a token's last use is written at most this often; a little under the minute
/// each instance waits between two writes, so a write that arrives late does not skip the next.
const TOUCH_GUARD: &str = "55 seconds";

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

    async fn sessions(&self, user_id: Uuid) -> Result<Vec<StoredSession>, sqlx::Error> {
        let query = sqlx::query_as(
            "SELECT id, token_hash, created_at, last_used_at, expires_at FROM auth_tokens
             WHERE user_id = $1 AND expires_at > now() ORDER BY created_at DESC, id",
        )
        .bind(user_id);
        self.db.run(query.fetch_all(self.db.pool())).await
    }

    async fn session_hash(&self, user_id: Uuid, id: Uuid) -> Result<Option<Vec<u8>>, sqlx::Error> {
        let query = sqlx::query_scalar("SELECT token_hash FROM auth_tokens WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(user_id);
        self.db.run(query.fetch_optional(self.db.pool())).await
    }

    async fn hashes(&self, user_id: Uuid) -> Result<Vec<Vec<u8>>, sqlx::Error> {
        let query = sqlx::query_scalar("SELECT token_hash FROM auth_tokens WHERE user_id = $1").bind(user_id);
        self.db.run(query.fetch_all(self.db.pool())).await
    }

    async fn delete_session(&self, user_id: Uuid, id: Uuid) -> Result<Option<Vec<u8>>, sqlx::Error> {
        let query = sqlx::query_scalar("DELETE FROM auth_tokens WHERE id = $1 AND user_id = $2 RETURNING token_hash")
            .bind(id)
            .bind(user_id);
        self.db.run(query.fetch_optional(self.db.pool())).await
    }

    async fn delete_all(&self, user_id: Uuid, except: Option<&[u8]>) -> Result<Vec<Vec<u8>>, sqlx::Error> {
        let query = sqlx::query_scalar(
            "DELETE FROM auth_tokens WHERE user_id = $1 AND token_hash IS DISTINCT FROM $2 RETURNING token_hash",
        )
        .bind(user_id)
        .bind(except);
        self.db.run(query.fetch_all(self.db.pool())).await
    }

    async fn touch(
        &self,
        hashes: &[Vec<u8>],
        extend: Option<(DateTime<Utc>, DateTime<Utc>)>,
    ) -> Result<Vec<Vec<u8>>, sqlx::Error> {
        // Without `extend`, `expires_at < NULL` is NULL: no token is extended, and only the
        // last-use guard selects rows. An extended token's new expiry is exactly `to`.
        let sql = format!(
            "UPDATE auth_tokens
             SET last_used_at = now(), expires_at = CASE WHEN expires_at < $3 THEN $2 ELSE expires_at END
             WHERE token_hash = ANY($1) AND expires_at > now()
               AND (last_used_at < now() - interval '{TOUCH_GUARD}' OR expires_at < $3)
             RETURNING token_hash, expires_at = $2"
        );
        let (to, before) = extend.unzip();
        let query = sqlx::query_as::<_, (Vec<u8>, Option<bool>)>(&sql)
            .bind(hashes)
            .bind(to)
            .bind(before);
        let touched = self.db.run(query.fetch_all(self.db.pool())).await?;
        Ok(touched
            .into_iter()
            .filter(|(_, extended)| *extended == Some(true))
            .map(|(hash, _)| hash)
            .collect())
    }
}
