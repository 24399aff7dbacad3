use async_trait::async_trait;
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use super::model::{email_key, User};
use crate::infra::database::Database;

/// The unique index on `email_key` (see `email_key`), named so a duplicate becomes a 409.
pub const EMAIL_UNIQUE: &str = "users_email_key";

const COLUMNS: &str = "id, email, name, created_at, updated_at";

#[async_trait]
pub trait UserRepository: Interface {
    async fn create(&self, email: &str, name: &str, password_hash: &str) -> Result<User, sqlx::Error>;
    async fn find(&self, id: Uuid) -> Result<Option<User>, sqlx::Error>;
    async fn find_by_email(&self, email: &str) -> Result<Option<User>, sqlx::Error>;
    /// (user id, password hash) for a login attempt.
    async fn find_credentials(&self, email: &str) -> Result<Option<(Uuid, String)>, sqlx::Error>;
    async fn update_name(&self, id: Uuid, name: &str) -> Result<Option<User>, sqlx::Error>;
    /// Whether the user holds the admin role (read fresh on every admin request: a revoke applies at once).
    async fn is_admin(&self, id: Uuid) -> Result<bool, sqlx::Error>;
}

/// Grants or revokes the admin role (`nestling admin grant|revoke`); false when no user has the
/// email. Not part of the user's JSON, so no cache entry changes.
pub async fn set_admin(
    pool: &sqlx::PgPool,
    email: &str,
    is_admin: bool,
    deadline: std::time::Duration,
) -> Result<bool, sqlx::Error> {
    let update = sqlx::query("UPDATE users SET is_admin = $2 WHERE email_key = $1")
        .bind(email_key(email))
        .bind(is_admin)
        .execute(pool);
    Ok(crate::infra::database::within(deadline, update).await?.rows_affected() > 0)
}

#[derive(Component)]
#[shaku(interface = UserRepository)]
pub struct PgUserRepository {
    #[shaku(inject)]
    db: Arc<dyn Database>,
}

#[async_trait]
impl UserRepository for PgUserRepository {
    async fn create(&self, email: &str, name: &str, password_hash: &str) -> Result<User, sqlx::Error> {
        let sql = format!(
            "INSERT INTO users (email, email_key, name, password_hash) VALUES ($1, $2, $3, $4) RETURNING {COLUMNS}"
        );
        let query = sqlx::query_as(&sql)
            .bind(email)
            .bind(email_key(email))
            .bind(name)
            .bind(password_hash);
        self.db.run(query.fetch_one(self.db.pool())).await
    }

    async fn find(&self, id: Uuid) -> Result<Option<User>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM users WHERE id = $1");
        self.db
            .run(sqlx::query_as(&sql).bind(id).fetch_optional(self.db.pool()))
            .await
    }

    async fn find_by_email(&self, email: &str) -> Result<Option<User>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM users WHERE email_key = $1");
        self.db
            .run(
                sqlx::query_as(&sql)
                    .bind(email_key(email))
                    .fetch_optional(self.db.pool()),
            )
            .await
    }

    async fn find_credentials(&self, email: &str) -> Result<Option<(Uuid, String)>, sqlx::Error> {
        let query = sqlx::query_as("SELECT id, password_hash FROM users WHERE email_key = $1").bind(email_key(email));
        self.db.run(query.fetch_optional(self.db.pool())).await
    }

    async fn update_name(&self, id: Uuid, name: &str) -> Result<Option<User>, sqlx::Error> {
        let sql = format!("UPDATE users SET name = $2, updated_at = now() WHERE id = $1 RETURNING {COLUMNS}");
        let write = async {
            let mut write = self.db.writer().await?;
            let updated = sqlx::query_as(&sql)
                .bind(id)
                .bind(name)
                .fetch_optional(write.conn())
                .await?;
            write.commit().await?;
            Ok(updated)
        };
        self.db.run(write).await
    }

    async fn is_admin(&self, id: Uuid) -> Result<bool, sqlx::Error> {
        let query = sqlx::query_scalar("SELECT is_admin FROM users WHERE id = $1").bind(id);
        Ok(self
            .db
            .run(query.fetch_optional(self.db.pool()))
            .await?
            .unwrap_or(false))
    }
}
