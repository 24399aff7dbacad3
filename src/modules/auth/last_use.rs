//! When each session was last used (and, with `AUTH_TOKEN_SLIDING`, its extension): written at
//! most once a minute per token on each instance, and never while a request waits. A request
//! whose token is not due costs one atomic load and compare, of a word written once a minute (no
//! reference count: both cores keep it cached when one token is used from both); one whose token
//! is due queues its hash, and one task per instance writes the queue, one statement per batch,
//! until it is empty. The queue is bounded: a use that finds it full is recorded a minute later.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;

use super::repository::TokenRepository;
use crate::infra::cache::CacheService;

/// How often one instance writes a token's last use (`lastUsedAt` is accurate to this).
pub const EVERY: Duration = Duration::from_secs(60);
/// Most hashes waiting to be written (32 bytes each).
const MAX_QUEUED: usize = 10_000;
/// Most tokens one statement writes.
const BATCH: usize = 1_000;
/// Tokens tracked at once (512 KiB of due times). A token unused for two minutes, or pushed out
/// by more tokens than this, gets a new slot: its next use is written at once (Postgres skips the
/// write if it is recent). Slots are handed out in turn, so two tokens share one only when more
/// than this many were seen since; one of them is then written up to a minute late.
const SLOTS: usize = 1 << 16;

/// When each token's last use is next written, and the queue of those to write.
pub struct LastUse {
    /// Per slot, when its token's next use is due to be written (Unix ms).
    due: Box<[AtomicI64; SLOTS]>,
    /// Token → its slot; looked up only when a session is loaded, not on every request.
    slots: moka::sync::Cache<[u8; 32], u32>,
    next_slot: AtomicU32,
    queue: Arc<Queue>,
}

impl Default for LastUse {
    fn default() -> Self {
        // SAFETY: an AtomicI64 has the representation of an i64, so zeroed memory holds zeros.
        // Zeroed, not written: its pages take no memory until tokens use them.
        let due = unsafe { Box::<[AtomicI64; SLOTS]>::new_zeroed().assume_init() };
        Self {
            due,
            slots: moka::sync::Cache::builder()
                .max_capacity(SLOTS as u64)
                .time_to_idle(EVERY * 2)
                .build(),
            next_slot: AtomicU32::new(0),
            queue: Arc::default(),
        }
    }
}

#[derive(Default)]
struct Queue {
    hashes: Mutex<Vec<[u8; 32]>>,
    /// A writer task is running (it empties the queue before it ends).
    writing: AtomicBool,
}

/// What the writer task needs: the service's repository and cache.
pub struct Writer {
    pub tokens: Arc<dyn TokenRepository>,
    pub cache: Arc<dyn CacheService>,
    /// `AUTH_TOKEN_SLIDING`: the token lifetime an extension grants.
    pub extend_by: Option<Duration>,
}

impl LastUse {
    /// The token's slot, kept with its session: a session loaded again (after an invalidation,
    /// or with L1 off) finds the same one.
    pub fn slot(&self, hash: &[u8; 32]) -> u32 {
        self.slots
            .get_with(*hash, || self.next_slot.fetch_add(1, Ordering::Relaxed) % SLOTS as u32)
    }

    /// Records a use of the token (in `slot`) at `now_ms`: queues it when its last write here is
    /// `EVERY` old, and starts the writer (made by `writer`) if none is running.
    #[inline]
    pub fn used(&self, hash: &[u8; 32], slot: u32, now_ms: i64, writer: impl FnOnce() -> Writer) {
        let due = &self.due[slot as usize % SLOTS];
        let next = due.load(Ordering::Relaxed);
        if now_ms < next {
            return;
        }
        let later = now_ms + EVERY.as_millis() as i64;
        // Concurrent requests with one token: one of them queues it.
        if due
            .compare_exchange(next, later, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.queue(hash, writer);
        }
    }

    #[cold]
    fn queue(&self, hash: &[u8; 32], writer: impl FnOnce() -> Writer) {
        {
            let mut hashes = self.queue.hashes.lock().unwrap();
            if hashes.len() >= MAX_QUEUED {
                log::debug!("auth: last-use queue full; a session's use is recorded later");
                return;
            }
            hashes.push(*hash);
        }
        if self.queue.writing.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(writer().run(self.queue.clone()));
            }
            Err(_) => self.queue.writing.store(false, Ordering::Release),
        }
    }
}

impl Writer {
    async fn run(self, queue: Arc<Queue>) {
        loop {
            let batch: Vec<Vec<u8>> = {
                let mut hashes = queue.hashes.lock().unwrap();
                let n = hashes.len().min(BATCH);
                hashes.drain(..n).map(|hash| hash.to_vec()).collect()
            };
            if batch.is_empty() {
                queue.writing.store(false, Ordering::Release);
                // A hash queued after the take saw the flag still set: it is ours to write.
                if queue.hashes.lock().unwrap().is_empty() || queue.writing.swap(true, Ordering::AcqRel) {
                    return;
                }
                continue;
            }
            self.write(batch).await;
        }
    }

    async fn write(&self, batch: Vec<Vec<u8>>) {
        let extend = self.extend_by.map(|ttl| {
            let now = Utc::now();
            (now + ttl, now + ttl / 2)
        });
        let keys = |hashes: &[Vec<u8>]| {
            hashes
                .iter()
                .filter_map(|hash| <[u8; 32]>::try_from(hash.as_slice()).ok())
                .map(|hash| self.cache.keys().auth_token(&hash))
                .collect()
        };
        // An extended token's cached session holds its old expiry, on every instance: it goes.
        let touched = self
            .cache
            .write(Vec::new(), self.tokens.touch(&batch, extend), |extended| keys(extended))
            .await;
        if let Err(err) = touched {
            log::warn!(
                "auth: recording the last use of {} session(s) failed: {err}",
                batch.len()
            );
            // Some may have been extended all the same: a cache keeping the old expiry would
            // refuse them early.
            if extend.is_some() {
                self.cache.invalidate(keys(&batch)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No runtime here, so no writer starts: what is queued stays queued.
    fn no_writer() -> Writer {
        unreachable!("a writer is only made to be spawned")
    }

    #[test]
    fn a_token_is_queued_once_a_minute_however_often_it_is_used() {
        let last_use = LastUse::default();
        let (mine, theirs) = ([1; 32], [2; 32]);
        let (slot, other) = (last_use.slot(&mine), last_use.slot(&theirs));
        assert_eq!(last_use.slot(&mine), slot, "a token keeps its slot");
        assert_ne!(slot, other, "tokens have slots of their own");
        let queued = || last_use.queue.hashes.lock().unwrap().clone();
        let start = 1_000_000;
        for ms in [0, 1, 30_000, 59_999] {
            last_use.used(&mine, slot, start + ms, no_writer);
        }
        assert_eq!(queued(), vec![mine], "one write for the first minute");
        last_use.used(&theirs, other, start + 59_999, no_writer);
        last_use.used(&mine, slot, start + 60_000, no_writer);
        assert_eq!(queued(), vec![mine, theirs, mine], "then one a minute");
    }
}
