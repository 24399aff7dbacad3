//! `Semaphore`: at most `limit` holders of a name across the fleet, each on a lease with a TTL,
//! renewed by `with_permit`, released (or extended) only by its own holder. A permit carries no
//! fence: it caps how many run at once, it does not order their writes (a lock does).
//! The store follows the locks' rule (Redis while caching in Redis, Postgres otherwise).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use shaku::{Component, Interface};
use uuid::Uuid;

use super::postgres::PgLeases;
use super::redis::RedisLeases;
use super::{lease, store_of, LockError, LockStore};
use crate::infra::database::Database;
use crate::infra::redis::RedisService;
use crate::infra::telemetry::Telemetry;

/// A held permit. Release it with `Semaphore::release`.
#[must_use = "release it with Semaphore::release (or use with_permit): dropped, it stays taken until its TTL ends"]
#[derive(Debug)]
pub struct Permit {
    name: String,
    token: Uuid,
    store: LockStore,
}

impl Permit {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn token(&self) -> Uuid {
        self.token
    }

    pub fn store(&self) -> LockStore {
        self.store
    }
}

#[async_trait]
pub trait Semaphore: Interface {
    /// One of `limit` places of `name` for `ttl`, waiting up to `wait` for one to come free
    /// (`Busy` after). Fails at once with `Unavailable` when the store does not answer.
    async fn acquire(&self, name: &str, limit: u32, ttl: Duration, wait: Duration) -> Result<Permit, LockError>;
    /// The lease ends `ttl` from now, if `permit`'s has not ended (`NotHeld` if it has).
    async fn extend(&self, permit: &Permit, ttl: Duration) -> Result<(), LockError>;
    /// Gives the place back (`NotHeld` if it was not this holder's any more).
    async fn release(&self, permit: Permit) -> Result<(), LockError>;
}

impl dyn Semaphore {
    /// Runs `work` holding a permit: acquired as by `acquire`, renewed every `ttl / 3`, released
    /// when `work` ends.
    pub async fn with_permit<T, Fut>(
        &self,
        name: &str,
        limit: u32,
        ttl: Duration,
        wait: Duration,
        work: impl FnOnce() -> Fut,
    ) -> Result<T, LockError>
    where
        Fut: Future<Output = T>,
    {
        let permit = self.acquire(name, limit, ttl, wait).await?;
        let output = lease::renewing(name, ttl, work(), || self.extend(&permit, ttl)).await;
        if let Err(err) = self.release(permit).await {
            log::warn!("semaphore {name}: release failed ({err}); the place frees itself when its TTL ends");
        }
        Ok(output)
    }
}

/// `Semaphore` with leases in Redis (a sorted set) or Postgres (a row per holder).
#[derive(Component)]
#[shaku(interface = Semaphore)]
pub struct LeasedSemaphore {
    #[shaku(inject)]
    redis: Arc<dyn RedisService>,
    #[shaku(inject)]
    database: Arc<dyn Database>,
    telemetry: Arc<Telemetry>,
    /// `LOCK_STORE_TIMEOUT_MS`.
    store_timeout: Duration,
}

impl LeasedSemaphore {
    fn postgres(&self) -> PgLeases<'_> {
        PgLeases::new(&*self.database, self.store_timeout)
    }

    fn redis(&self) -> RedisLeases<'_> {
        RedisLeases::new(&*self.redis)
    }
}

#[async_trait]
impl Semaphore for LeasedSemaphore {
    async fn acquire(&self, name: &str, limit: u32, ttl: Duration, wait: Duration) -> Result<Permit, LockError> {
        let started = Instant::now();
        let store = store_of(&*self.redis);
        let token = Uuid::new_v4();
        let acquired = lease::waiting(wait, || async {
            let taken = match store {
                LockStore::Redis => self.redis().try_permit(name, token, limit, ttl).await?,
                LockStore::Postgres => self.postgres().try_permit(name, token, limit, ttl).await?,
            };
            Ok(taken.then_some(()))
        })
        .await;
        lease::observe(&self.telemetry, "semaphore", started, &acquired);
        acquired?;
        Ok(Permit {
            name: name.to_owned(),
            token,
            store,
        })
    }

    async fn extend(&self, permit: &Permit, ttl: Duration) -> Result<(), LockError> {
        let extended = match permit.store {
            LockStore::Redis => self.redis().extend_permit(&permit.name, permit.token, ttl).await?,
            LockStore::Postgres => self.postgres().extend_permit(&permit.name, permit.token, ttl).await?,
        };
        extended.then_some(()).ok_or(LockError::NotHeld)
    }

    async fn release(&self, permit: Permit) -> Result<(), LockError> {
        let released = match permit.store {
            LockStore::Redis => self.redis().release_permit(&permit.name, permit.token).await?,
            LockStore::Postgres => self.postgres().release_permit(&permit.name, permit.token).await?,
        };
        released.then_some(()).ok_or(LockError::NotHeld)
    }
}
