//! The invalidation subscriber: a dedicated pub/sub connection that PINGs itself, reconnects and
//! resubscribes, drops invalidated keys from L1, and flushes L1 whenever it (re)connects, since
//! messages published while it was away are lost. Each answered PING marks the instance as up to
//! date until the PING's send time (L1 serves nothing older while that mark is stale). It also
//! replays queued invalidations, and follows the fleet-wide switch. It runs in redis and
//! memory-synced modes alike.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};

use super::Inner;

/// The message body that makes every other instance flush its L1 (after an admin flush).
pub(super) const FLUSH_ALL: &str = "*";
/// The fleet-wide switch (`POST /admin/cache/mode` with `"scope": "fleet"`). Keys always start
/// with the prefix, which is never empty, so none of these can be a key.
pub(super) const FLEET_REDIS_ON: &str = "!redis=on";
pub(super) const FLEET_REDIS_OFF: &str = "!redis=off";

const RETRY_EVERY: Duration = Duration::from_millis(250);

pub(super) async fn run(inner: Arc<Inner>) {
    // Whether Redis was out of reach since the last subscription: then other instances'
    // invalidations may never have reached L2, and what L2 holds from before is suspect.
    let mut lost = false;
    loop {
        if inner.sync_redis().is_some() {
            if let Err(err) = listen(&inner, &mut lost).await {
                log::debug!("cache: invalidation subscriber: {err}");
                lost = true;
            }
            if inner.subscriber_connected.swap(false, Ordering::AcqRel) {
                log::warn!("cache: invalidation subscriber disconnected; L1 flushed, reconnecting");
                inner.flush_l1();
            }
        } else {
            // Memory mode: whatever happens in Redis meanwhile is unknown to us.
            lost = true;
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

async fn listen(inner: &Inner, lost: &mut bool) -> Result<(), String> {
    let Some(redis) = inner.sync_redis() else {
        return Ok(());
    };
    let timeout = inner.redis.settings().connect_timeout;
    let pubsub = redis.pubsub().await.map_err(|e| e.to_string())?;
    let (mut sink, mut stream) = pubsub.split();
    let channel = inner.keys.invalidation_channel();
    tokio::time::timeout(timeout, sink.subscribe(&channel))
        .await
        .map_err(|_| "subscribe timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    if *lost || inner.l2_trusted_since_ms.load(Ordering::Acquire) == u64::MAX {
        let (seconds, micros): (u64, u64) = redis
            .call(|mut c| async move { bb8_redis::redis::cmd("TIME").query_async(&mut c).await })
            .await
            .map_err(|e| e.to_string())?;
        inner
            .l2_trusted_since_ms
            .store(seconds * 1000 + micros / 1000, Ordering::Release);
        *lost = false;
    }
    // Anything published before this point is lost to us: start from an empty L1.
    inner.flush_l1();
    inner.mark_synced(std::time::Instant::now());
    inner.subscriber_connected.store(true, Ordering::Release);
    inner.replay_pending().await;
    let mut ping = tokio::time::interval(inner.sync_every());
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else { return Err("subscription closed".into()) };
                apply(inner, &message).await?;
            }
            _ = ping.tick() => {
                if !inner.redis.is_syncing() {
                    return Ok(());
                }
                // Switched off and on again between two ticks: L2 is distrusted until a new
                // trust point is taken, which subscribing afresh does.
                if inner.l2_trusted_since_ms.load(Ordering::Acquire) == u64::MAX {
                    return Err("Redis was switched off meanwhile: subscribing afresh".into());
                }
                let sent_at = std::time::Instant::now();
                let pong = tokio::time::timeout(inner.redis.settings().command_timeout * 4, sink.ping::<bb8_redis::redis::Value>()).await;
                match pong {
                    Ok(Ok(_)) => {
                        // Messages published before the PING arrived before its answer: apply
                        // them, and then every invalidation until `sent_at` has been heard.
                        while let Some(Some(message)) = stream.next().now_or_never() {
                            apply(inner, &message).await?;
                        }
                        inner.mark_synced(sent_at);
                        inner.replay_pending().await
                    }
                    Ok(Err(err)) => return Err(format!("ping failed: {err}")),
                    Err(_) => return Err("ping timed out".into()),
                }
            }
        }
    }
}

/// `<instance>|<redis key>`: drop the key from L1 unless we published it ourselves.
async fn apply(inner: &Inner, message: &bb8_redis::redis::Msg) -> Result<(), String> {
    let payload: String = message.get_payload().map_err(|e| e.to_string())?;
    inner.telemetry.pubsub_messages.inc();
    let Some((instance, redis_key)) = payload.split_once('|') else {
        return Ok(());
    };
    if instance == inner.instance {
        return Ok(());
    }
    if redis_key == FLUSH_ALL {
        inner.flush_l1();
    } else if redis_key == FLEET_REDIS_ON || redis_key == FLEET_REDIS_OFF {
        log::info!("cache: switched by the fleet-wide switch of instance {instance}");
        inner.set_redis_enabled(redis_key == FLEET_REDIS_ON);
    } else if let Some(key) = inner.keys.parse(redis_key) {
        inner.drop_from_l1(&key).await;
    }
    Ok(())
}
