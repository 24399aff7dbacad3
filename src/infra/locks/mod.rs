//! Locks and semaphores across the fleet, container components: `LockService` (one holder at a
//! time, with fencing tokens) and `Semaphore` (at most N holders).
//!
//! What they guarantee:
//! - **Leases.** Every hold has a TTL, so a holder that crashes frees it when the TTL ends.
//!   `with_lock` / `with_permit` renew the lease every `ttl / 3` while the work runs and release
//!   it explicitly afterwards: never in `Drop`, where async code cannot wait.
//! - **Checked release and extend.** Each acquisition has a random owner token; release and extend
//!   compare it first, atomically (compare-and-delete, compare-and-extend: a Lua script in Redis,
//!   `UPDATE … WHERE owner = $token` in Postgres). A holder whose lease ended cannot free or
//!   prolong the next holder's.
//! - **Fencing tokens.** Every lock acquisition gets a fence that only grows per lock name. It is
//!   issued by Postgres (`locks.fence`) whichever store keeps the lease, so it keeps growing across
//!   a Redis restart and a switch between Redis and Postgres. A lease cannot stop a holder that was
//!   paused (GC, a frozen VM, a slow network) past its TTL from writing after the next holder: the
//!   resource has to, by refusing a write whose fence is lower than one it has accepted
//!   (`UPDATE … WHERE fence < $fence`). When a renewal fails, the work is not interrupted: its
//!   fenced write is what keeps the data right.
//! - **Fails closed.** When the store cannot answer (Redis down, its breaker open, Postgres frozen
//!   or gone), `acquire` returns `LockError::Unavailable` within a second
//!   (`REDIS_COMMAND_TIMEOUT_MS`, `LOCK_STORE_TIMEOUT_MS` per round trip), never a lock it does
//!   not hold. There is no in-process stand-in: its guarantee would stop at the process.
//!
//! What they do not:
//! - Exclusion by the lease alone. Redis without persistence forgets leases when it restarts, and
//!   an eviction under `maxmemory` can drop one; two holders are then possible, and the fence is
//!   what orders their writes.
//! - Exclusion during a switch between stores. The store is Redis while this instance caches in
//!   Redis (`REDIS_ENABLED` or the runtime switch) and Postgres otherwise (memory and
//!   memory-synced modes). While a fleet-wide switch travels (pub/sub, milliseconds), an instance
//!   that has not heard it yet locks in the other store, and the stores do not see each other's
//!   leases. Fences come from the one Postgres row either way.
//! - Fairness. Waiters poll (2 ms, doubling up to 50 ms, with jitter): no queue decides who is next.
//!
//! Costs: in Redis, an acquisition is `SET NX PX`, one Postgres statement (the fence) and a
//! compare-and-extend proving the lease outlived the fence's issue, so that fences follow the
//! order in which leases were held; in Postgres, one statement does lease and fence together.
//! Release is one round trip. Locks are for rebuilds and jobs, not for every request.
//! Leases expire by the store's clock (Redis' or Postgres'); the instances' clocks play no part.

mod lease;
mod postgres;
mod redis;
mod semaphore;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;
use shaku::{Component, Interface};
use uuid::Uuid;

use crate::infra::database::Database;
use crate::infra::redis::{RedisFailure, RedisService};
use crate::infra::telemetry::Telemetry;
pub use semaphore::{LeasedSemaphore, LeasedSemaphoreParameters, Permit, Semaphore};

/// A fencing token: per lock name, each acquisition's is higher than every earlier one's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Fence(i64);

impl Fence {
    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where leases are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LockStore {
    Redis,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another owner held it for the whole wait (or, for a semaphore, every permit was taken).
    #[error("held by another owner")]
    Busy,
    /// Release or extend by a token that does not hold the lease (any more).
    #[error("not held: the lease ended or belongs to another owner")]
    NotHeld,
    /// The store did not answer: nothing is known to be held.
    #[error("the lock store did not answer")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<RedisFailure> for LockError {
    fn from(failure: RedisFailure) -> Self {
        Self::Unavailable(failure.into())
    }
}

impl From<sqlx::Error> for LockError {
    fn from(err: sqlx::Error) -> Self {
        Self::Unavailable(err.into())
    }
}

/// A held lock: its owner token and fence, and the store it lives in (release and extend go there
/// even if the instance has switched stores since). Release it with `LockService::release`.
#[must_use = "release it with LockService::release (or use with_lock): dropped, it stays held until its TTL ends"]
#[derive(Debug)]
pub struct LockGuard {
    name: String,
    token: Uuid,
    fence: Fence,
    store: LockStore,
}

impl LockGuard {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn token(&self) -> Uuid {
        self.token
    }

    /// What the holder's writes carry, for the resource to refuse older holders' writes.
    pub fn fence(&self) -> Fence {
        self.fence
    }

    pub fn store(&self) -> LockStore {
        self.store
    }
}

#[async_trait]
pub trait LockService: Interface {
    /// Takes `name` for `ttl`, waiting up to `wait` while another owner holds it (`Busy` after).
    /// Fails at once with `Unavailable` when the store does not answer.
    async fn acquire(&self, name: &str, ttl: Duration, wait: Duration) -> Result<LockGuard, LockError>;
    /// Compare-and-extend: the lease ends `ttl` from now, if `guard` still holds it (`NotHeld` if not).
    async fn extend(&self, guard: &LockGuard, ttl: Duration) -> Result<(), LockError>;
    /// Compare-and-delete: frees the lock if `guard` still holds it (`NotHeld` if not).
    async fn release(&self, guard: LockGuard) -> Result<(), LockError>;
    /// Where this instance takes new locks now.
    fn store(&self) -> LockStore;
}

impl dyn LockService {
    /// Runs `work` holding `name`: acquired as by `acquire`, renewed every `ttl / 3` while `work`
    /// runs, released when it ends. `work` gets the fence for its writes. Should a renewal fail
    /// (the lease lost), `work` goes on to its end: its fenced write is what refuses it then.
    pub async fn with_lock<T, Fut>(
        &self,
        name: &str,
        ttl: Duration,
        wait: Duration,
        work: impl FnOnce(Fence) -> Fut,
    ) -> Result<T, LockError>
    where
        Fut: Future<Output = T>,
    {
        let guard = self.acquire(name, ttl, wait).await?;
        let output = lease::renewing(name, ttl, work(guard.fence), || self.extend(&guard, ttl)).await;
        if let Err(err) = self.release(guard).await {
            // Nothing to undo: the lease ends with its TTL, and the work is done.
            log::warn!("lock {name}: release failed ({err}); it frees itself when its TTL ends");
        }
        Ok(output)
    }
}

/// `LockService` with leases in Redis or Postgres and fences from Postgres (see the module).
#[derive(Component)]
#[shaku(interface = LockService)]
pub struct FencedLocks {
    #[shaku(inject)]
    redis: Arc<dyn RedisService>,
    #[shaku(inject)]
    database: Arc<dyn Database>,
    telemetry: Arc<Telemetry>,
    /// `LOCK_STORE_TIMEOUT_MS`.
    store_timeout: Duration,
}

impl FencedLocks {
    fn postgres(&self) -> postgres::PgLeases<'_> {
        postgres::PgLeases::new(&*self.database, self.store_timeout)
    }

    fn redis(&self) -> redis::RedisLeases<'_> {
        redis::RedisLeases::new(&*self.redis)
    }

    /// One attempt: the fence when the lock was free, `None` when another owner holds it.
    async fn try_acquire(
        &self,
        store: LockStore,
        name: &str,
        token: Uuid,
        ttl: Duration,
    ) -> Result<Option<Fence>, LockError> {
        match store {
            LockStore::Postgres => self.postgres().try_lock(name, token, ttl).await,
            LockStore::Redis => {
                let redis = self.redis();
                if !redis.try_lock(name, token, ttl).await? {
                    return Ok(None);
                }
                let fence = match self.postgres().next_fence(name).await {
                    Ok(fence) => fence,
                    Err(err) => {
                        let _ = redis.unlock(name, token).await;
                        return Err(err);
                    }
                };
                // Still ours after the fence was issued: whoever holds the lease next takes its
                // fence later, so a higher one. A lease lost meanwhile is no acquisition.
                match redis.extend_lock(name, token, ttl).await? {
                    true => Ok(Some(fence)),
                    false => Ok(None),
                }
            }
        }
    }
}

#[async_trait]
impl LockService for FencedLocks {
    async fn acquire(&self, name: &str, ttl: Duration, wait: Duration) -> Result<LockGuard, LockError> {
        let started = Instant::now();
        let store = self.store();
        let token = Uuid::new_v4();
        let acquired = lease::waiting(wait, || self.try_acquire(store, name, token, ttl)).await;
        lease::observe(&self.telemetry, "lock", started, &acquired);
        Ok(LockGuard {
            name: name.to_owned(),
            token,
            fence: acquired?,
            store,
        })
    }

    async fn extend(&self, guard: &LockGuard, ttl: Duration) -> Result<(), LockError> {
        let extended = match guard.store {
            LockStore::Redis => self.redis().extend_lock(&guard.name, guard.token, ttl).await?,
            LockStore::Postgres => self.postgres().extend_lock(&guard.name, guard.token, ttl).await?,
        };
        extended.then_some(()).ok_or(LockError::NotHeld)
    }

    async fn release(&self, guard: LockGuard) -> Result<(), LockError> {
        let released = match guard.store {
            LockStore::Redis => self.redis().unlock(&guard.name, guard.token).await?,
            LockStore::Postgres => self.postgres().unlock(&guard.name, guard.token).await?,
        };
        released.then_some(()).ok_or(LockError::NotHeld)
    }

    fn store(&self) -> LockStore {
        store_of(&*self.redis)
    }
}

/// Redis while this instance caches in Redis (even when Redis is failing: then locks fail closed,
/// rather than move to a store the rest of the fleet is not using); Postgres otherwise.
fn store_of(redis: &dyn RedisService) -> LockStore {
    match redis.active() {
        Some(_) => LockStore::Redis,
        None => LockStore::Postgres,
    }
}
