//! The GCRA script in Redis: every quota of every identity of a decision in one atomic call,
//! timed by Redis `TIME` (on a Redis Cluster, one call per policy).

use super::*;

/// GCRA over several quotas in one atomic step, timed by Redis. KEYS: one hash per (policy,
/// identity); ARGV[1]: tokens wanted; ARGV[2]: tokens given back first (a lease's unspent ones, a
/// login that succeeded); then per quota: key index, field (the quota's index in its policy),
/// interval and period (µs). Returns granted, retry-after (µs), then remaining and reset (µs) per
/// quota. Same rule as `gcra::decide`.
pub(super) const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wanted, returned = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = (#ARGV - 2) / 4
local granted, retry = wanted, 0
local tats, available = {}, {}
for i = 1, n do
  local b = 2 + (i - 1) * 4
  local interval, period = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local tat = tonumber(redis.call('HGET', KEYS[tonumber(ARGV[b + 1])], ARGV[b + 2]) or 0) - returned * interval
  if tat < now then tat = now end
  tats[i] = tat
  available[i] = math.floor((now + period - tat) / interval)
  if available[i] < granted then granted = available[i] end
  if available[i] < 1 then retry = math.max(retry, tat + interval - period - now) end
end
if granted > 0 then retry = 0 end
local result, expiry = {granted, retry}, {}
for i = 1, n do
  local b = 2 + (i - 1) * 4
  local key = KEYS[tonumber(ARGV[b + 1])]
  local tat = tats[i] + granted * tonumber(ARGV[b + 3])
  if granted > 0 or returned > 0 then
    redis.call('HSET', key, ARGV[b + 2], tat)
    expiry[key] = math.max(expiry[key] or 0, tat - now)
  end
  result[#result + 1] = available[i] - granted
  result[#result + 1] = tat - now
end
for key, us in pairs(expiry) do redis.call('PEXPIRE', key, math.floor(us / 1000) + 1) end
return result
";

pub(super) fn script() -> &'static Script {
    static SCRIPT_ONCE: OnceLock<Script> = OnceLock::new();
    SCRIPT_ONCE.get_or_init(|| Script::new(SCRIPT))
}

/// The script's answer: granted, retry-after, then remaining and reset per quota.
pub(super) fn outcome_of(value: redis::Value) -> Option<gcra::Outcome> {
    let numbers: Vec<i64> = redis::from_redis_value(value).ok()?;
    let (head, cells) = numbers.split_at_checked(2)?;
    Some(gcra::Outcome {
        granted: head[0].max(0) as u64,
        retry_after: head[1].max(0) as u64,
        cells: cells
            .chunks_exact(2)
            .map(|pair| gcra::CellState {
                remaining: pair[0].max(0) as u64,
                reset: pair[1].max(0) as u64,
            })
            .collect(),
    })
}

impl Limiter {
    /// One script call for every quota of every identity, after giving `returned` tokens back to
    /// each; `None` when Redis could not decide. On a Redis Cluster, identities live on different
    /// slots: each policy is decided by its own call, in order, and a denial stops there (the
    /// policies decided before it have spent).
    pub(super) async fn in_redis(
        &self,
        group: RouteGroup,
        identities: &[Identity],
        wanted: u64,
        returned: u64,
    ) -> Option<gcra::Outcome> {
        let on_cluster = self.redis.active().is_some_and(|redis| redis.is_cluster());
        if !on_cluster || identities.len() < 2 {
            let all: SmallVec<[usize; 2]> = (0..identities.len()).collect();
            return self.run_script(group, identities, &all, wanted, returned).await;
        }
        let spec = self.group(group);
        let mut merged = gcra::Outcome {
            granted: wanted,
            retry_after: 0,
            cells: Default::default(),
        };
        for index in 0..identities.len() {
            if merged.granted == 0 {
                // Not asked: shown as full.
                for quota in &spec.policies[index].quotas {
                    merged.cells.push(gcra::CellState {
                        remaining: quota.limit,
                        reset: 0,
                    });
                }
                continue;
            }
            let outcome = self
                .run_script(group, identities, &[index], merged.granted, returned)
                .await?;
            merged.granted = merged.granted.min(outcome.granted);
            merged.retry_after = merged.retry_after.max(outcome.retry_after);
            merged.cells.extend(outcome.cells);
        }
        Some(merged)
    }

    /// The GCRA script over the policies at `indices` (`script_run`); `None` when Redis could not
    /// decide.
    pub(super) async fn run_script(
        &self,
        group: RouteGroup,
        identities: &[Identity],
        indices: &[usize],
        wanted: u64,
        returned: u64,
    ) -> Option<gcra::Outcome> {
        let run = self.script_run(group, identities, indices, wanted, returned);
        // `run_script` bounds the connection wait and the command together by the command timeout.
        match self.redis.run_script(script(), &run.keys, &run.args).await {
            Ok(value) => outcome_of(value),
            Err(err) => {
                log::debug!("rate limit: deciding locally, Redis failed: {err}");
                None
            }
        }
    }

    /// The script's keys and arguments for the policies at `indices` (each one key: the policy's
    /// state for its identity). Each quota is a field named by its index, so two quotas with the
    /// same period (`"5, 50/1m"`) are two states, as they are in process.
    pub(super) fn script_run(
        &self,
        group: RouteGroup,
        identities: &[Identity],
        indices: &[usize],
        wanted: u64,
        returned: u64,
    ) -> ScriptRun {
        let spec = self.group(group);
        let registry = self.redis.keys();
        let mut keys = Vec::with_capacity(indices.len());
        let mut args: Vec<Vec<u8>> = vec![wanted.to_string().into_bytes(), returned.to_string().into_bytes()];
        for (position, &index) in indices.iter().enumerate() {
            let policy = &spec.policies[index];
            keys.push(registry.rate_limit(policy.name, &identities[index].key_material()));
            for (field, quota) in policy.quotas.iter().enumerate() {
                let period = micros(quota.period);
                args.push((position + 1).to_string().into_bytes());
                args.push(field.to_string().into_bytes());
                args.push((period / quota.limit).to_string().into_bytes());
                args.push(period.to_string().into_bytes());
            }
        }
        ScriptRun { keys, args }
    }
}
