//! Leases: tokens an instance takes from Redis for one identity and spends locally, sized by
//! the identity's recent rate; their top-ups, in the background, on a tick, a tick's together in
//! one round trip.

use super::*;

/// Tokens this instance took from Redis for one identity, spent locally until used up or stale;
/// and, after Redis said no, the time until which the answer stays no (no Redis call per denied
/// request). Times are microseconds on the limiter's clock. `repr(C)`, what a request reads
/// first: with thousands of identities a lease is rarely in the CPU's cache, and the fields a
/// spent token touches then come in one cache line.
#[derive(Default)]
#[repr(C)]
pub(super) struct Lease {
    pub(super) tokens: AtomicU64,
    /// Tokens may be spent until then.
    pub(super) expires: AtomicU64,
    /// What Redis said was left after its grant, when the tightest quota is full again, and which
    /// quota that is.
    pub(super) remaining: AtomicU64,
    pub(super) reset_at: AtomicU64,
    pub(super) tightest: AtomicU64,
    /// The size of the lease now: what the identity spent in a lease lifetime lately.
    pub(super) size: AtomicU64,
    /// The tokens spent since the last grant (with `granted_at`: the identity's recent rate).
    pub(super) spent: AtomicU64,
    /// Set while one request takes or tops up the lease: the others keep spending what is left,
    /// and those that find nothing wait for it (`refilled`) instead of each asking Redis.
    pub(super) refilling: AtomicBool,
    pub(super) granted_at: AtomicU64,
    pub(super) denied_until: AtomicU64,
    pub(super) refill_done: tokio::sync::Notify,
}

impl Lease {
    /// Returns once the request taking or topping up this lease has recorded what Redis granted
    /// (at once if none is). That fetch is bounded by the Redis command timeout; `REFILL_WAIT`
    /// only guards against a missed wake-up.
    pub(super) async fn refilled(&self) {
        let done = self.refill_done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        if self.refilling.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(REFILL_WAIT, done).await;
        }
    }

    pub(super) fn finish_refill(&self) {
        self.refilling.store(false, Ordering::Release);
        self.refill_done.notify_waiters();
    }
}

pub(super) const REFILL_WAIT: Duration = Duration::from_secs(1);

/// A lease is at most 1/`LEASE_SHARE` of the tightest quota (5 %).
pub(super) const LEASE_SHARE: u64 = 20;

/// A lease this request is to top up, how many tokens it lacks, and whether what is left lasts
/// until the next top-up tick (else the top-up goes at once).
pub(super) type TopUp = (Arc<Lease>, u64, bool);

/// A top-up waiting for the next tick: its identities, lease and the tokens it lacks.
pub(super) struct WaitingTopUp {
    pub(super) group: RouteGroup,
    pub(super) identities: SmallVec<[Identity; 2]>,
    pub(super) lease: Arc<Lease>,
    pub(super) lacking: u64,
}

/// This instance's leases by identity. A plain concurrent map: read on every request, where a
/// moka lookup's bookkeeping (recording the read, its frequency sketch, the upkeep it sets off)
/// cost the many-users benchmark about 1.5 µs a request. Bounded all the same: when full, the
/// leases that lapsed go, and if none did, all of them (a flood of new identities; each lease
/// dropped holds at most its cap of charged tokens, as a moka eviction would).
pub(super) struct Leases {
    pub(super) map: dashmap::DashMap<Identity, Arc<Lease>, foldhash::fast::RandomState>,
    pub(super) capacity: usize,
}

impl Leases {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            // Many shards: a read takes its shard's lock, whose cache line the workers otherwise
            // pass back and forth on nearly every request (a few shards, thousands of identities).
            map: dashmap::DashMap::with_hasher_and_shard_amount(foldhash::fast::RandomState::default(), LEASE_SHARDS),
            capacity,
        }
    }

    pub(super) fn get(&self, identity: &Identity) -> Option<Arc<Lease>> {
        self.map.get(identity).map(|lease| lease.clone())
    }

    /// `spend` on the identity's lease, in place: no reference count touched on the way.
    pub(super) fn with<T>(&self, identity: &Identity, spend: impl FnOnce(&Arc<Lease>) -> Option<T>) -> Option<T> {
        spend(self.map.get(identity)?.value())
    }

    pub(super) fn get_or_insert(&self, identity: Identity, now: u64) -> Arc<Lease> {
        if let Some(lease) = self.get(&identity) {
            return lease;
        }
        if self.map.len() >= self.capacity {
            self.map.retain(|_, lease| lease.expires.load(Ordering::Acquire) > now);
            if self.map.len() >= self.capacity {
                self.map.clear();
            }
        }
        self.map.entry(identity).or_default().clone()
    }
}

pub(super) const LEASE_SHARDS: usize = 256;

/// Top-ups wait for the next tick of this clock and go to Redis together (`next_top_up_tick`),
/// when what is left of the lease lasts four ticks at the rate it is spent; those of identities
/// faster than that go at once.
pub(super) const TOP_UP_TICK: Duration = Duration::from_millis(5);

/// The tokens spent from a lease since its last grant, and the microseconds since that grant:
/// the identity's recent rate, which sizes its next lease and times its top-up.
pub(super) fn spending_since_grant(lease: &Lease, now: u64) -> (u64, u64) {
    (
        lease.spent.load(Ordering::Relaxed),
        now.saturating_sub(lease.granted_at.load(Ordering::Relaxed)),
    )
}

impl Limiter {
    /// When the top-ups set off now go to Redis: together, on the next `TOP_UP_TICK` of the
    /// limiter's clock, so that Redis wakes once for them all rather than once for each (with
    /// thousands of busy identities, each waking Redis cost more than its script).
    pub(super) fn next_top_up_tick(&self) -> tokio::time::Instant {
        let tick = micros(TOP_UP_TICK);
        let next = (micros(self.epoch.elapsed()) / tick + 1) * tick;
        tokio::time::Instant::from_std(self.epoch + Duration::from_micros(next))
    }

    /// Answers from this instance's lease: a token of it, or the denial Redis gave until it
    /// expires. `None`: ask Redis. With the decision come the lease and the tokens it lacks when
    /// this request is the one to top it up (under a quarter of the lease left, nobody else at it).
    pub(super) fn spend_lease(&self, identity: &Identity, cap: u64) -> Option<(Decision, Option<TopUp>)> {
        self.leases.with(identity, |lease| self.spend(lease, cap))
    }

    pub(super) fn spend(&self, lease: &Arc<Lease>, cap: u64) -> Option<(Decision, Option<TopUp>)> {
        let now = self.now();
        let reset = Duration::from_micros(lease.reset_at.load(Ordering::Relaxed).saturating_sub(now));
        let tightest = (0, lease.tightest.load(Ordering::Relaxed) as usize);
        let spent = (now < lease.expires.load(Ordering::Acquire))
            .then(|| {
                lease
                    .tokens
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_sub(1))
                    .ok()
            })
            .flatten();
        if let Some(before) = spent {
            lease.spent.fetch_add(1, Ordering::Relaxed);
            let decision = Decision {
                allowed: true,
                tightest,
                remaining: lease.remaining.load(Ordering::Relaxed) + before - 1,
                reset,
                retry_after: Duration::ZERO,
                decided_by: DecidedBy::Lease,
            };
            let left = before - 1;
            // Under a quarter of the lease left: a top-up sets off, in the background, while a
            // quarter of a lifetime's requests still find tokens.
            let top_up = left * 4 < lease.size.load(Ordering::Relaxed)
                && lease
                    .refilling
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
            if !top_up {
                return Some((decision, None));
            }
            let next = self.next_size(lease, now, cap);
            // At the rate the lease is spent, do the tokens left last a few ticks?
            let (spent, since_grant) = spending_since_grant(lease, now);
            let can_wait = u128::from(left) * u128::from(since_grant) / u128::from(spent.max(1))
                > u128::from(micros(TOP_UP_TICK) * 4);
            return Some((
                decision,
                Some((lease.clone(), next.saturating_sub(left).max(1), can_wait)),
            ));
        }
        if lease.tokens.load(Ordering::Acquire) > 0 {
            // Lapsed tokens: ask Redis, which takes them back first.
            return None;
        }
        let denied_until = lease.denied_until.load(Ordering::Acquire);
        (now < denied_until).then(|| {
            let decision = Decision {
                allowed: false,
                tightest,
                remaining: 0,
                reset,
                retry_after: Duration::from_micros(denied_until - now),
                decided_by: DecidedBy::Lease,
            };
            (decision, None)
        })
    }

    /// The size of an identity's next lease: the tokens it spent since its last grant, scaled to
    /// a lease lifetime, at least 1 and at most `cap`. A client calling now and then gets 1 (it
    /// is charged what it uses), a busy one a lifetime's worth (one Redis call per lease). It
    /// becomes the lease's size, which the next top-up mark is judged by.
    pub(super) fn next_size(&self, lease: &Lease, now: u64, cap: u64) -> u64 {
        let (spent, since_grant) = spending_since_grant(lease, now);
        let elapsed = since_grant.max(1_000);
        let per_lifetime = u128::from(spent) * u128::from(micros(self.settings.lease_lifetime)) / u128::from(elapsed);
        let size = u64::try_from(per_lifetime).unwrap_or(u64::MAX).clamp(1, cap);
        lease.size.store(size, Ordering::Relaxed);
        size
    }

    /// Takes the tokens of a lease that lapsed unspent, to give them back to Redis.
    pub(super) fn reclaim_lapsed(&self, lease: &Lease) -> u64 {
        if self.now() >= lease.expires.load(Ordering::Acquire) {
            lease.tokens.swap(0, Ordering::AcqRel)
        } else {
            0
        }
    }

    /// Keeps what Redis granted beyond the `used` tokens of this request (or its denial) for the
    /// next requests.
    pub(super) fn record_lease(&self, identity: &Identity, granted: u64, used: u64, decision: &Decision) {
        let lease = self.leases.get_or_insert(*identity, self.now());
        let now = self.now();
        if granted == 0 {
            lease
                .denied_until
                .store(now + micros(decision.retry_after), Ordering::Release);
            return;
        }
        lease.denied_until.store(0, Ordering::Release);
        lease.remaining.store(decision.remaining, Ordering::Relaxed);
        lease.reset_at.store(now + micros(decision.reset), Ordering::Relaxed);
        lease.tightest.store(decision.tightest.1 as u64, Ordering::Relaxed);
        // Tokens that lapsed while this call was out are lent on with the new ones: each was
        // granted once, and dropping them would charge the client for nothing.
        lease.tokens.fetch_add(granted - used, Ordering::AcqRel);
        lease.granted_at.store(now, Ordering::Relaxed);
        lease.spent.store(used, Ordering::Relaxed);
        lease
            .expires
            .store(now + micros(self.settings.lease_lifetime), Ordering::Release);
    }

    /// A decision from this instance's lease (`spend_lease`); the one request whose token left
    /// it under a quarter full sets off its top-up and is answered at once: on the next top-up
    /// tick, with the others of that tick (`top_up_together`), unless the lease would run out
    /// first; then (and on a Redis Cluster) in a task of its own. The lease never holds more than
    /// its size.
    pub(super) async fn decide_by_lease(
        self: &Arc<Self>,
        group: RouteGroup,
        identities: &[Identity],
        lease: u64,
    ) -> Option<Decision> {
        let (decision, top_up) = self.spend_lease(&identities[0], lease)?;
        let Some((state, lacking, can_wait)) = top_up else {
            return Some(decision);
        };
        let identities = SmallVec::<[Identity; 2]>::from_slice(identities);
        let on_cluster = self.redis.active().is_some_and(|redis| redis.is_cluster());
        if can_wait && !on_cluster {
            let waiting = WaitingTopUp {
                group,
                identities,
                lease: state,
                lacking,
            };
            let first_of_tick = {
                let mut queue = self.waiting_top_ups.lock().unwrap();
                queue.push(waiting);
                queue.len() == 1
            };
            if first_of_tick {
                let limiter = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(limiter.next_top_up_tick()).await;
                    limiter.top_up_together().await;
                });
            }
            return Some(decision);
        }
        let limiter = self.clone();
        tokio::spawn(async move {
            if let Some(outcome) = limiter.in_redis(group, &identities, lacking, 0).await {
                limiter.record_top_up(group, &identities[0], &outcome);
            }
            state.finish_refill();
        });
        Some(decision)
    }

    /// Keeps what Redis granted a top-up in the identity's lease (no request spent a token of it).
    fn record_top_up(&self, group: RouteGroup, identity: &Identity, outcome: &gcra::Outcome) {
        let topped = self.decision(group, outcome, DecidedBy::Redis);
        self.record_lease(identity, outcome.granted, 0, &topped);
    }

    /// The top-ups that waited for this tick, in one round trip (a pipeline of script runs):
    /// with thousands of busy identities, a round trip each cost Redis and this instance more than
    /// the scripts themselves. A top-up Redis could not decide is left for the next request.
    pub(super) async fn top_up_together(&self) {
        let waiting = std::mem::take(&mut *self.waiting_top_ups.lock().unwrap());
        let runs: Vec<ScriptRun> = waiting
            .iter()
            .map(|top_up| {
                let all: SmallVec<[usize; 2]> = (0..top_up.identities.len()).collect();
                self.script_run(top_up.group, &top_up.identities, &all, top_up.lacking, 0)
            })
            .collect();
        let answers = match self.redis.run_scripts(script(), &runs).await {
            Ok(answers) => answers,
            Err(err) => {
                log::debug!("rate limit: top-ups not taken, Redis failed: {err}");
                Vec::new()
            }
        };
        let mut answers = answers.into_iter();
        for top_up in waiting {
            if let Some(outcome) = answers.next().and_then(outcome_of) {
                self.record_top_up(top_up.group, &top_up.identities[0], &outcome);
            }
            top_up.lease.finish_refill();
        }
    }
}
