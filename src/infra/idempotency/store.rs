//! The `idempotency_keys` table: claim a key (open the request's transaction under the key's
//! lock), record the answer in that transaction and commit, prune expired records.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use shaku::{Component, Interface};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::error::{AppError, AppResult};
use crate::infra::database::transaction::OpenTransaction;
use crate::infra::database::Database;
use crate::infra::telemetry::Telemetry;

/// The first answer to a key, as replayed.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// What a claim found.
pub enum Claim {
    /// Answered before, to the same request: replay this.
    Replay(Recorded),
    /// Answered before, to another request (method, path or body).
    Reused,
    /// Another request with this key is being answered now.
    InFlight,
    /// First use (or the last one expired or rolled back): run the request in this transaction.
    Open(OpenClaim),
}

/// A key held for one request: its transaction (holding the key's lock) and its turn among the
/// requests with keys. Dropped without `complete`, the transaction rolls back.
pub struct OpenClaim {
    pub transaction: OpenTransaction,
    user_id: Uuid,
    key: String,
    fingerprint: [u8; 32],
    _turn: OwnedSemaphorePermit,
}

#[async_trait]
pub trait IdempotencyStore: Interface {
    /// Looks the key up under its lock, in a transaction that stays open when it is free.
    async fn claim(&self, user_id: Uuid, key: &str, fingerprint: [u8; 32]) -> AppResult<Claim>;
    /// Records `answer` in the claim's transaction and commits it, with the request's writes.
    async fn complete(&self, claim: OpenClaim, answer: &Recorded) -> AppResult<()>;
    /// Rolls the claim's transaction back, the request's writes with it: the key is free again
    /// when this returns.
    async fn abandon(&self, claim: OpenClaim);
}

#[derive(Component)]
#[shaku(interface = IdempotencyStore)]
pub struct PgIdempotencyStore {
    #[shaku(inject)]
    db: Arc<dyn Database>,
    /// `IDEMPOTENCY_TTL`.
    ttl: Duration,
    /// Requests with a key hold a connection while they run: at most this many at once, so the
    /// reads they wait on always find one (half the pool).
    turns: Arc<Semaphore>,
    /// Longest wait for a turn (`DATABASE_ACQUIRE_TIMEOUT_MS`, as for a connection).
    turn_wait: Duration,
    #[shaku(default)]
    last_prune: LastPrune,
    /// `idempotency_requests_total`.
    telemetry: Arc<Telemetry>,
}

/// Unix seconds of this instance's last prune.
#[derive(Default)]
pub struct LastPrune(AtomicU64);

/// At most one prune a minute per instance, of at most this many rows.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const PRUNE_ROWS: i64 = 1000;

/// A Postgres session that stops answering mid-request is ended by Postgres after this, which
/// frees the key: longer than any request waits on its deadlines.
const IDLE_IN_TRANSACTION_MS: &str = "30000";

/// The advisory lock of (user, key): 64 bits of their hash.
fn lock_id(user_id: Uuid, key: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"idempotency\0")
        .chain_update(user_id.as_bytes())
        .chain_update(key.as_bytes())
        .finalize();
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl PgIdempotencyStore {
    /// `claim`, uncounted.
    async fn look_up(&self, user_id: Uuid, key: &str, fingerprint: [u8; 32]) -> AppResult<Claim> {
        let turn = tokio::time::timeout(self.turn_wait, self.turns.clone().acquire_owned())
            .await
            .map_err(|_| AppError::ServiceBusy { retry_after_secs: 1 })?
            .map_err(AppError::internal)?;
        let db = &self.db;
        let mut tx = db.run(db.pool().begin()).await?;
        let lock = sqlx::query_scalar::<_, bool>(
            "SELECT pg_try_advisory_xact_lock($1) FROM set_config('idle_in_transaction_session_timeout', $2, true)",
        )
        .bind(lock_id(user_id, key))
        .bind(IDLE_IN_TRANSACTION_MS);
        if !db.run(lock.fetch_one(&mut *tx)).await? {
            return Ok(Claim::InFlight);
        }
        // Rolled back before answering, not on drop (sqlx rolls a dropped transaction back later,
        // in a task of its own): the next request with the key finds the lock free.
        let answer = |tx: sqlx::Transaction<'static, sqlx::Postgres>, claim: Claim| async move {
            let _ = db.run(tx.rollback()).await;
            Ok::<_, AppError>(claim)
        };
        // A statement of its own, after the lock: its snapshot is taken once the lock is ours, so
        // it sees the record of a holder that committed just before.
        let find = sqlx::query_as::<_, (Vec<u8>, i16, Option<String>, Vec<u8>)>(
            "SELECT request_hash, status, content_type, body FROM idempotency_keys
             WHERE user_id = $1 AND key = $2 AND expires_at > now()",
        )
        .bind(user_id)
        .bind(key);
        match db.run(find.fetch_optional(&mut *tx)).await? {
            Some((hash, ..)) if hash != fingerprint => answer(tx, Claim::Reused).await,
            Some((_, status, content_type, body)) => {
                let recorded = Recorded {
                    status: status as u16,
                    content_type,
                    body: body.into(),
                };
                answer(tx, Claim::Replay(recorded)).await
            }
            None => Ok(Claim::Open(OpenClaim {
                transaction: OpenTransaction::new(tx),
                user_id,
                key: key.to_owned(),
                fingerprint,
                _turn: turn,
            })),
        }
    }

    /// Deletes expired records, at most `PRUNE_ROWS`, in the background.
    fn prune_if_due(&self) {
        let now = unix_secs();
        let last = self.last_prune.0.load(Ordering::Relaxed);
        let due = now >= last + PRUNE_EVERY.as_secs();
        if !due
            || self
                .last_prune
                .0
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let db = self.db.clone();
        tokio::spawn(async move {
            let prune = sqlx::query(
                "DELETE FROM idempotency_keys WHERE (user_id, key) IN
                   (SELECT user_id, key FROM idempotency_keys WHERE expires_at < now() LIMIT $1)",
            )
            .bind(PRUNE_ROWS)
            .execute(db.pool());
            if let Err(err) = db.run(prune).await {
                log::warn!("pruning idempotency keys failed (next try in a minute): {err}");
            }
        });
    }
}

#[async_trait]
impl IdempotencyStore for PgIdempotencyStore {
    async fn claim(&self, user_id: Uuid, key: &str, fingerprint: [u8; 32]) -> AppResult<Claim> {
        let claim = self.look_up(user_id, key, fingerprint).await;
        let outcome = match &claim {
            Ok(Claim::Replay(_)) => "replayed",
            Ok(Claim::Reused) => "reused",
            Ok(Claim::InFlight) => "in_flight",
            Ok(Claim::Open(_)) | Err(_) => return claim,
        };
        self.telemetry.idempotency_requests.with_label_values(&[outcome]).inc();
        claim
    }

    async fn complete(&self, claim: OpenClaim, answer: &Recorded) -> AppResult<()> {
        let db = &self.db;
        let commit = async {
            let mut tx = claim.transaction.take().await?;
            // An expired record of the key is replaced. A live one cannot exist while we hold the
            // lock; should one ever, nothing is committed (belt and braces: exactly once even if
            // the lock failed).
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys (user_id, key, request_hash, status, content_type, body, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))
                 ON CONFLICT (user_id, key) DO UPDATE SET
                   request_hash = EXCLUDED.request_hash, status = EXCLUDED.status,
                   content_type = EXCLUDED.content_type, body = EXCLUDED.body,
                   created_at = now(), expires_at = EXCLUDED.expires_at
                 WHERE idempotency_keys.expires_at <= now()",
            )
            .bind(claim.user_id)
            .bind(&claim.key)
            .bind(&claim.fingerprint[..])
            .bind(answer.status as i16)
            .bind(answer.content_type.as_deref())
            .bind(&answer.body[..])
            .bind(self.ttl.as_secs_f64())
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() != 1 {
                return Ok(false);
            }
            tx.commit().await.map(|()| true)
        };
        if !db.run(commit).await? {
            return Err(AppError::IdempotencyKeyInFlight { retry_after_secs: 1 });
        }
        claim.transaction.committed().await;
        self.telemetry
            .idempotency_requests
            .with_label_values(&["recorded"])
            .inc();
        self.prune_if_due();
        Ok(())
    }

    async fn abandon(&self, claim: OpenClaim) {
        let rollback = async { claim.transaction.take().await?.rollback().await };
        if let Err(err) = self.db.run(rollback).await {
            // Dropped, the transaction still rolls back, a moment later (sqlx does it in a task).
            log::warn!("rolling back an idempotent request failed: {err}");
        }
    }
}
