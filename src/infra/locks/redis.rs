//! Leases in Redis. A lock is a string key holding its owner's token, with a `PX` expiry; a
//! semaphore is a sorted set of holders' tokens scored by when their lease ends (Redis' own
//! clock, `TIME`). Each operation is one script, so its check and its change are atomic, and it
//! touches one key (one cluster slot).

use std::sync::OnceLock;
use std::time::Duration;

use bb8_redis::redis::{self, Script};
use uuid::Uuid;

use super::LockError;
use crate::infra::redis::keys::RedisKey;
use crate::infra::redis::{RedisFailure, RedisService};

/// `now` in milliseconds by the server's clock, shared by the semaphore scripts.
const NOW_MS: &str = "local time = redis.call('TIME')
    local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)";

/// A key whose members expire one by one lives as long as its longest lease.
const OUTLIVE_LEASE: &str = "if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
        redis.call('PEXPIRE', KEYS[1], ARGV[1])
    end";

fn script(cell: &'static OnceLock<Script>, source: impl FnOnce() -> String) -> &'static Script {
    cell.get_or_init(|| Script::new(&source()))
}

pub(super) struct RedisLeases<'a> {
    redis: &'a dyn RedisService,
}

impl<'a> RedisLeases<'a> {
    pub fn new(redis: &'a dyn RedisService) -> Self {
        Self { redis }
    }

    /// Runs a script that answers 1 (done) or 0 (refused).
    async fn run(&self, script: &Script, key: RedisKey, args: &[Vec<u8>]) -> Result<bool, LockError> {
        let value = self.redis.run_script(script, &[key], args).await?;
        let done: i64 = redis::from_redis_value(value).map_err(|err| RedisFailure::Command(err.into()))?;
        Ok(done == 1)
    }

    pub async fn try_lock(&self, name: &str, token: Uuid, ttl: Duration) -> Result<bool, LockError> {
        static LOCK: OnceLock<Script> = OnceLock::new();
        let script = script(&LOCK, || {
            "if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[1]) then return 1 end
             return 0"
                .to_owned()
        });
        self.run(script, self.redis.keys().lock(name), &[millis(ttl), token_arg(token)])
            .await
    }

    /// Compare-and-extend.
    pub async fn extend_lock(&self, name: &str, token: Uuid, ttl: Duration) -> Result<bool, LockError> {
        static EXTEND: OnceLock<Script> = OnceLock::new();
        let script = script(&EXTEND, || {
            "if redis.call('GET', KEYS[1]) == ARGV[2] then return redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
             return 0"
                .to_owned()
        });
        self.run(script, self.redis.keys().lock(name), &[millis(ttl), token_arg(token)])
            .await
    }

    /// Compare-and-delete.
    pub async fn unlock(&self, name: &str, token: Uuid) -> Result<bool, LockError> {
        static UNLOCK: OnceLock<Script> = OnceLock::new();
        let script = script(&UNLOCK, || {
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('UNLINK', KEYS[1]) end
             return 0"
                .to_owned()
        });
        self.run(script, self.redis.keys().lock(name), &[token_arg(token)])
            .await
    }

    /// Drops the expired holders, then takes a place if fewer than `limit` remain.
    pub async fn try_permit(&self, name: &str, token: Uuid, limit: u32, ttl: Duration) -> Result<bool, LockError> {
        static ACQUIRE: OnceLock<Script> = OnceLock::new();
        let script = script(&ACQUIRE, || {
            format!(
                "{NOW_MS}
                redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
                if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
                redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
                {OUTLIVE_LEASE}
                return 1"
            )
        });
        let args = [millis(ttl), token_arg(token), limit.to_string().into_bytes()];
        self.run(script, self.redis.keys().semaphore(name), &args).await
    }

    /// Compare-and-extend: only a holder whose lease has not ended.
    pub async fn extend_permit(&self, name: &str, token: Uuid, ttl: Duration) -> Result<bool, LockError> {
        static EXTEND: OnceLock<Script> = OnceLock::new();
        let script = script(&EXTEND, || {
            format!(
                "{NOW_MS}
                local ends = redis.call('ZSCORE', KEYS[1], ARGV[2])
                if not ends or tonumber(ends) <= now then return 0 end
                redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
                {OUTLIVE_LEASE}
                return 1"
            )
        });
        self.run(
            script,
            self.redis.keys().semaphore(name),
            &[millis(ttl), token_arg(token)],
        )
        .await
    }

    /// Removes this holder, and no other.
    pub async fn release_permit(&self, name: &str, token: Uuid) -> Result<bool, LockError> {
        static RELEASE: OnceLock<Script> = OnceLock::new();
        let script = script(&RELEASE, || "return redis.call('ZREM', KEYS[1], ARGV[1])".to_owned());
        self.run(script, self.redis.keys().semaphore(name), &[token_arg(token)])
            .await
    }
}

fn millis(ttl: Duration) -> Vec<u8> {
    ttl.as_millis().max(1).to_string().into_bytes()
}

fn token_arg(token: Uuid) -> Vec<u8> {
    token.simple().to_string().into_bytes()
}
