//! Leases in Postgres (`migrations/0005_locks.sql`), and the fences of every lock. A lock is one
//! row of `locks`: its fence, which only grows, and the lease (owner, end) while it is held here.
//! A semaphore is a row per holder in `semaphore_permits`. Leases end by Postgres' clock.
//! Every round trip runs under `LOCK_STORE_TIMEOUT_MS`.

use std::time::Duration;

use uuid::Uuid;

use super::{Fence, LockError};
use crate::infra::database::{within, Database};

pub(super) struct PgLeases<'a> {
    database: &'a dyn Database,
    timeout: Duration,
}

impl<'a> PgLeases<'a> {
    pub fn new(database: &'a dyn Database, timeout: Duration) -> Self {
        Self { database, timeout }
    }

    /// The lease and its fence in one statement, if the lock is free (never held, released, or
    /// ended). An attempt on a held lock matches no row in its snapshot, so it waits for no row
    /// lock: a hundred waiters do not queue behind each other.
    pub async fn try_lock(&self, name: &str, token: Uuid, ttl: Duration) -> Result<Option<Fence>, LockError> {
        let query = sqlx::query_scalar(
            "WITH clock AS (SELECT clock_timestamp() AS now),
             taken AS (
                UPDATE locks SET fence = fence + 1, owner = $2, expires_at = clock.now + $3 * interval '1 millisecond'
                FROM clock
                WHERE name = $1 AND (owner IS NULL OR expires_at <= clock.now)
                RETURNING fence
             ), created AS (
                INSERT INTO locks (name, fence, owner, expires_at)
                SELECT $1, 1, $2, clock.now + $3 * interval '1 millisecond' FROM clock
                WHERE NOT EXISTS (SELECT 1 FROM locks WHERE name = $1)
                ON CONFLICT (name) DO NOTHING
                RETURNING fence
             )
             SELECT fence FROM taken UNION ALL SELECT fence FROM created",
        )
        .bind(name)
        .bind(token)
        .bind(millis(ttl));
        let fence: Option<i64> = within(self.timeout, query.fetch_optional(self.database.pool())).await?;
        Ok(fence.map(Fence))
    }

    /// The next fence of a lock whose lease lives in Redis.
    pub async fn next_fence(&self, name: &str) -> Result<Fence, LockError> {
        let query = sqlx::query_scalar(
            "INSERT INTO locks (name, fence) VALUES ($1, 1)
             ON CONFLICT (name) DO UPDATE SET fence = locks.fence + 1
             RETURNING fence",
        )
        .bind(name);
        Ok(Fence(
            within(self.timeout, query.fetch_one(self.database.pool())).await?,
        ))
    }

    /// Compare-and-extend.
    pub async fn extend_lock(&self, name: &str, token: Uuid, ttl: Duration) -> Result<bool, LockError> {
        let query = sqlx::query(
            "UPDATE locks SET expires_at = clock_timestamp() + $3 * interval '1 millisecond'
             WHERE name = $1 AND owner = $2 AND expires_at > clock_timestamp()",
        )
        .bind(name)
        .bind(token)
        .bind(millis(ttl));
        self.changed_one(query).await
    }

    /// Compare-and-delete (of the lease: the row stays, with its fence).
    pub async fn unlock(&self, name: &str, token: Uuid) -> Result<bool, LockError> {
        let query = sqlx::query(
            "UPDATE locks SET owner = NULL, expires_at = NULL
             WHERE name = $1 AND owner = $2 AND expires_at > clock_timestamp()",
        )
        .bind(name)
        .bind(token);
        self.changed_one(query).await
    }

    /// Counts the holders and adds one if fewer than `limit`, under a transaction-scoped advisory
    /// lock on the semaphore's name: the count must see every holder that committed before it,
    /// which one statement's snapshot, taken before it waits, would not. An attempt that finds the
    /// advisory lock taken does not wait for it (that wait would count against
    /// `LOCK_STORE_TIMEOUT_MS` as if the store were down): it finds no place now, and `acquire`
    /// tries again while it may wait.
    pub async fn try_permit(&self, name: &str, token: Uuid, limit: u32, ttl: Duration) -> Result<bool, LockError> {
        let pool = self.database.pool();
        let attempt = async {
            let mut tx = pool.begin().await?;
            let counting: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended('semaphore:' || $1, 0))")
                    .bind(name)
                    .fetch_one(&mut *tx)
                    .await?;
            if !counting {
                return Ok(false);
            }
            let added = sqlx::query(
                "WITH clock AS (SELECT clock_timestamp() AS now),
                 expired AS (
                    DELETE FROM semaphore_permits USING clock WHERE name = $1 AND expires_at <= clock.now
                 )
                 INSERT INTO semaphore_permits (name, holder, expires_at)
                 SELECT $1, $2, clock.now + $4 * interval '1 millisecond' FROM clock
                 WHERE (SELECT count(*) FROM semaphore_permits, clock
                        WHERE name = $1 AND expires_at > clock.now) < $3",
            )
            .bind(name)
            .bind(token)
            .bind(i64::from(limit))
            .bind(millis(ttl))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(added.rows_affected() == 1)
        };
        Ok(within(self.timeout, attempt).await?)
    }

    /// Compare-and-extend: only a holder whose lease has not ended.
    pub async fn extend_permit(&self, name: &str, token: Uuid, ttl: Duration) -> Result<bool, LockError> {
        let query = sqlx::query(
            "UPDATE semaphore_permits SET expires_at = clock_timestamp() + $3 * interval '1 millisecond'
             WHERE name = $1 AND holder = $2 AND expires_at > clock_timestamp()",
        )
        .bind(name)
        .bind(token)
        .bind(millis(ttl));
        self.changed_one(query).await
    }

    /// Removes this holder, and no other.
    pub async fn release_permit(&self, name: &str, token: Uuid) -> Result<bool, LockError> {
        let query = sqlx::query("DELETE FROM semaphore_permits WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(token);
        self.changed_one(query).await
    }

    async fn changed_one(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<bool, LockError> {
        let done = within(self.timeout, query.execute(self.database.pool())).await?;
        Ok(done.rows_affected() == 1)
    }
}

fn millis(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1)
}
