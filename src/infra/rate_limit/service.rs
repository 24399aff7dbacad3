//! `RateLimiter` for `RedisRateLimiter`: the container's face of the limiter.

use super::*;

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    fn enabled(&self) -> bool {
        self.settings.enabled
    }

    fn trusted_proxies(&self) -> &[IpNet] {
        &self.settings.trust_proxy
    }

    async fn check(&self, group: RouteGroup, identities: &[Identity]) -> Decision {
        let decision = self.inner.decide(group, identities).await;
        self.decisions[group as usize][usize::from(!decision.allowed)][decision.decided_by as usize].inc();
        decision
    }

    async fn give_back(&self, group: RouteGroup, decision: &Decision, identities: &[Identity], policy: usize) {
        match decision.decided_by {
            DecidedBy::Redis => {
                self.run_script(group, identities, &[policy], 0, 1).await;
            }
            DecidedBy::Local => {
                let spec = &self.group(group).policies[policy];
                let instances = self.settings.instances.max(1);
                if let Some(state) = self.local[self.local_index(group, policy)].get(&identities[policy]) {
                    let mut tats = state.lock().unwrap();
                    for (tat, quota) in tats.iter_mut().zip(&spec.quotas) {
                        let limit = (quota.limit / instances).max(1);
                        *tat = tat.saturating_sub(micros(quota.period) / limit);
                    }
                }
            }
            // Leases are for the `/api` policy, which gives nothing back.
            DecidedBy::Lease => {}
        }
    }

    async fn remember_address(&self, email: &Identity, ip: &Identity) {
        let digest = known_address(email, ip);
        self.known_addresses.insert(digest, ());
        if self.redis.active().is_some_and(|redis| redis.accepting()) {
            let key = self.redis.keys().rate_limit("known-address", &digest);
            if let Err(err) = self.redis.set(&key, b"1", KNOWN_ADDRESS_TTL).await {
                log::debug!("rate limit: known address kept in process only, Redis failed: {err}");
            }
        }
    }

    async fn is_known_address(&self, email: &Identity, ip: &Identity) -> bool {
        let digest = known_address(email, ip);
        if self.known_addresses.contains_key(&digest) {
            return true;
        }
        if !self.redis.active().is_some_and(|redis| redis.accepting()) {
            return false;
        }
        let key = self.redis.keys().rate_limit("known-address", &digest);
        matches!(self.redis.get(&key).await, Ok(Some(_)))
    }

    fn headers(&self, group: RouteGroup, decision: &Decision, headers: &mut actix_web::http::header::HeaderMap) {
        use actix_web::http::header::HeaderName;
        // Constants: `from_static` checks the name each time it runs.
        const POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
        const CURRENT: HeaderName = HeaderName::from_static("ratelimit");
        const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
        const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
        const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
        let spec = self.group(group);
        let (p, q) = decision.tightest;
        let policy = &spec.policies[p];
        let reset = whole_seconds(decision.reset);
        // GCRA counts whole microseconds per token, rounded down: a quota of a few microseconds
        // per token counts more tokens than it has (10^9 an hour: 3.6 µs -> 3, 20 % more; from a
        // millisecond per token on, under 0.1 %). Never show more than the limit less the token
        // this request took (a denial shows 0 anyway).
        let remaining = decision.remaining.min(policy.quotas[q].limit.saturating_sub(1));
        headers.insert(POLICY, spec.policy_header.clone());
        let current = format!("\"{}\";r={remaining};t={reset}", policy.quota_names[q]);
        if let Ok(value) = HeaderValue::from_str(&current) {
            headers.insert(CURRENT, value);
        }
        headers.insert(LIMIT, policy.limit_headers[q].clone());
        headers.insert(REMAINING, HeaderValue::from(remaining));
        headers.insert(RESET, HeaderValue::from(reset));
    }

    fn status(&self) -> RateLimitStatus {
        let instances = self.settings.instances.max(1);
        let view = |group: RouteGroup, policy: &Policy, identity: &'static str, lease: u64| PolicyView {
            group,
            name: policy.name,
            identity,
            lease,
            quotas: policy
                .quotas
                .iter()
                .zip(&policy.quota_names)
                .map(|(q, name)| QuotaView {
                    name: name.clone(),
                    limit: q.limit,
                    window_seconds: q.period.as_secs(),
                    local_limit: (q.limit / instances).max(1),
                })
                .collect(),
        };
        RateLimitStatus {
            enabled: self.settings.enabled,
            mode: if self.redis.status().usable() { "redis" } else { "local" },
            instances,
            trusted_proxies: self.settings.trust_proxy.iter().map(ToString::to_string).collect(),
            policies: vec![
                view(RouteGroup::Api, &self.api.policies[0], "user-or-ip", self.api.lease),
                view(RouteGroup::Credentials, &self.credentials.policies[0], "ip", 1),
                view(RouteGroup::Credentials, &self.credentials.policies[1], "email", 1),
            ],
        }
    }
}
