//! The key registry: every Redis key nestling writes is built here, under `REDIS_KEY_PREFIX`,
//! as `<prefix><namespace>:{<id>}`, and every namespace takes its TTL from the TTL table.
//! The `{...}` is a Redis Cluster hash tag: the keys one script or transaction touches (an entry
//! and its fill version; one identity's rate-limit policies) share it, so they share a slot,
//! while different ids spread over every master.
//! Keys that carry user data (emails, IPs) hold its SHA-256, so they are bounded and cannot collide.

use std::fmt::{Display, Write};
use std::time::Duration;

use uuid::Uuid;

use crate::config::TtlTable;

/// What kind of entry a key holds; decides its TTL and its metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Namespace {
    Tasks,
    TaskLists,
    Projects,
    ProjectLists,
    Workspaces,
    WorkspaceLists,
    Members,
    Users,
    AuthTokens,
    DailyMetrics,
    // @generate: namespaces
}

impl Namespace {
    pub const ALL: &'static [Namespace] = &[
        Self::Tasks,
        Self::TaskLists,
        Self::Projects,
        Self::ProjectLists,
        Self::Workspaces,
        Self::WorkspaceLists,
        Self::Members,
        Self::Users,
        Self::AuthTokens,
        Self::DailyMetrics,
        // @generate: namespace-list
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tasks => "tasks",
            Self::TaskLists => "task-lists",
            Self::Projects => "projects",
            Self::ProjectLists => "project-lists",
            Self::Workspaces => "workspaces",
            Self::WorkspaceLists => "workspace-lists",
            Self::Members => "members",
            Self::Users => "users",
            Self::AuthTokens => "auth-tokens",
            Self::DailyMetrics => "daily-metrics",
            // @generate: namespace-names
        }
    }

    /// Whether entries live in a per-owner Redis hash (lists, members, metrics), so that one key
    /// drops every variant.
    pub fn is_grouped(self) -> bool {
        matches!(self, Self::TaskLists | Self::Members | Self::DailyMetrics)
    }

    /// The shape of what this namespace caches, stored with every entry: an entry written with
    /// another number (by an older or newer deploy sharing the Redis) is not served. Bump a
    /// namespace's number in the commit that changes its entries' shape.
    pub fn format(self) -> u32 {
        match self {
            Self::Tasks | Self::TaskLists => 1,
            Self::Projects | Self::ProjectLists => 1,
            Self::Workspaces | Self::WorkspaceLists | Self::Members => 1,
            Self::Users => 1,
            Self::AuthTokens => 1,
            Self::DailyMetrics => 1,
            // @generate: namespace-formats
        }
    }

    /// Whether a group's fields are variants a client chooses (filters, pages, date ranges), so
    /// their number must be capped; members' roles are bounded by the membership itself.
    pub fn has_variants(self) -> bool {
        matches!(self, Self::TaskLists | Self::DailyMetrics)
    }

    pub fn parse(name: &str) -> Option<Namespace> {
        Self::ALL.iter().copied().find(|ns| ns.as_str() == name)
    }

    /// The TTL-table entry this namespace lives by.
    pub fn ttl(self, table: &TtlTable) -> Duration {
        match self {
            Self::Tasks | Self::TaskLists => table.tasks,
            Self::Projects | Self::ProjectLists => table.projects,
            Self::Workspaces | Self::WorkspaceLists | Self::Members => table.workspaces,
            Self::Users => table.user,
            Self::AuthTokens => table.auth_token,
            Self::DailyMetrics => table.daily_metrics,
            // @generate: namespace-ttls
        }
    }
}

/// A key for `RedisService`'s typed surface: only the registry makes them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RedisKey(String);

impl RedisKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One cache entry's address. `group` entries (lists, metrics) share a Redis hash per owner,
/// so one `DEL` drops every variant (every filter, page or date range) at once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub namespace: Namespace,
    /// `<redis key>` or `<redis key>#<field>`, built once: every L1 lookup uses it as it is.
    l1_key: String,
    /// Where the Redis key ends inside `l1_key`.
    redis_key_len: usize,
}

impl CacheKey {
    /// The full Redis key, prefix included.
    pub fn redis_key(&self) -> &str {
        &self.l1_key[..self.redis_key_len]
    }

    /// The hash field for grouped entries; `None` for plain string keys.
    pub fn field(&self) -> Option<&str> {
        self.l1_key.get(self.redis_key_len + 1..)
    }

    /// The in-process (L1) key: the Redis key and the field.
    pub fn l1_key(&self) -> &str {
        &self.l1_key
    }
}

#[derive(Debug, Clone)]
pub struct KeyRegistry {
    prefix: String,
    ttl: TtlTable,
}

impl KeyRegistry {
    pub fn new(prefix: impl Into<String>, ttl: TtlTable) -> Self {
        Self {
            prefix: prefix.into(),
            ttl,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn ttl(&self, namespace: Namespace) -> Duration {
        namespace.ttl(&self.ttl)
    }

    fn plain(&self, namespace: Namespace, id: impl Display) -> CacheKey {
        let mut l1_key = String::with_capacity(self.prefix.len() + 64);
        let _ = write!(l1_key, "{}{}:{{{id}}}", self.prefix, namespace.as_str());
        CacheKey {
            namespace,
            redis_key_len: l1_key.len(),
            l1_key,
        }
    }

    fn grouped(&self, namespace: Namespace, owner: impl Display, field: impl Display) -> CacheKey {
        let mut key = self.plain(namespace, owner);
        let _ = write!(key.l1_key, "#{field}");
        key
    }

    pub fn task(&self, id: Uuid) -> CacheKey {
        self.plain(Namespace::Tasks, id)
    }

    /// One filtered page of a project's tasks; `query` is the canonical query string.
    pub fn task_list(&self, project_id: Uuid, query: String) -> CacheKey {
        self.grouped(Namespace::TaskLists, project_id, query)
    }

    pub fn task_lists(&self, project_id: Uuid) -> CacheKey {
        self.plain(Namespace::TaskLists, project_id)
    }

    /// One page of the tasks assigned to a user.
    pub fn assigned_task_list(&self, user_id: Uuid, query: String) -> CacheKey {
        self.grouped(Namespace::TaskLists, format!("assignee:{user_id}"), query)
    }

    pub fn assigned_task_lists(&self, user_id: Uuid) -> CacheKey {
        self.plain(Namespace::TaskLists, format!("assignee:{user_id}"))
    }

    pub fn project(&self, id: Uuid) -> CacheKey {
        self.plain(Namespace::Projects, id)
    }

    pub fn project_list(&self, workspace_id: Uuid) -> CacheKey {
        self.plain(Namespace::ProjectLists, workspace_id)
    }

    pub fn workspace(&self, id: Uuid) -> CacheKey {
        self.plain(Namespace::Workspaces, id)
    }

    pub fn workspace_list(&self, user_id: Uuid) -> CacheKey {
        self.plain(Namespace::WorkspaceLists, user_id)
    }

    /// A user's role in a workspace (or their absence from it).
    pub fn member(&self, workspace_id: Uuid, user_id: Uuid) -> CacheKey {
        self.grouped(Namespace::Members, workspace_id, user_id)
    }

    /// Every cached role of one workspace, and its member list.
    pub fn members(&self, workspace_id: Uuid) -> CacheKey {
        self.plain(Namespace::Members, workspace_id)
    }

    pub fn member_list(&self, workspace_id: Uuid) -> CacheKey {
        self.grouped(Namespace::Members, workspace_id, "list")
    }

    pub fn user(&self, id: Uuid) -> CacheKey {
        self.plain(Namespace::Users, id)
    }

    /// Keyed by the token's SHA-256 (hex), never by the token itself.
    pub fn auth_token(&self, token_sha256: &[u8; 32]) -> CacheKey {
        let mut hex = [0u8; 64];
        hex::encode_to_slice(token_sha256, &mut hex).expect("64 bytes hold 32 in hex");
        self.plain(Namespace::AuthTokens, std::str::from_utf8(&hex).expect("hex is ASCII"))
    }

    pub fn daily_metrics(&self, workspace_id: Uuid, range: String) -> CacheKey {
        self.grouped(Namespace::DailyMetrics, workspace_id, range)
    }

    pub fn all_daily_metrics(&self, workspace_id: Uuid) -> CacheKey {
        self.plain(Namespace::DailyMetrics, workspace_id)
    }

    // @generate: key-builders

    /// The state of one rate-limit policy for one identity (a user id, a client IP, an email):
    /// `<prefix>rl:<policy>:{<sha256(identity) in hex>}`, whatever the identity holds.
    pub fn rate_limit(&self, policy: &str, identity: &[u8]) -> RedisKey {
        use sha2::{Digest, Sha256};
        let digest: [u8; 32] = Sha256::digest(identity).into();
        RedisKey(format!("{}rl:{policy}:{{{}}}", self.prefix, hex::encode(digest)))
    }

    /// A counter that application code keeps with `RedisService::incr` (`<prefix>counter:<name>:<id>`).
    pub fn counter(&self, name: &str, id: impl Display) -> RedisKey {
        RedisKey(format!("{}counter:{name}:{id}", self.prefix))
    }

    /// A lock's lease (`infra::locks`): `<prefix>lock:{<name>}`, holding the owner's token.
    pub fn lock(&self, name: &str) -> RedisKey {
        RedisKey(format!("{}lock:{{{name}}}", self.prefix))
    }

    /// A semaphore's holders (`infra::locks`): `<prefix>semaphore:{<name>}`, a sorted set of
    /// owner tokens scored by when their lease ends.
    pub fn semaphore(&self, name: &str) -> RedisKey {
        RedisKey(format!("{}semaphore:{{{name}}}", self.prefix))
    }

    /// What a key under the prefix is: its cache namespace, `rate-limits`, `versions` (fill
    /// versions), `locks`, `semaphores`, or `other`.
    pub fn kind_of(&self, redis_key: &str) -> &'static str {
        let Some(rest) = redis_key.strip_prefix(&self.prefix) else {
            return "other";
        };
        let head = rest.split(':').next().unwrap_or_default();
        match head {
            "rl" => "rate-limits",
            "version" => "versions",
            "lock" => "locks",
            "semaphore" => "semaphores",
            _ => Namespace::parse(head).map_or("other", Namespace::as_str),
        }
    }

    /// The throw-away key and channel `nestling redis check` writes, reads and publishes on.
    pub fn check(&self, run: impl Display) -> RedisKey {
        RedisKey(format!("{}check:{run}", self.prefix))
    }

    /// The channel invalidations travel on, for `RedisService::publish`.
    pub fn invalidations(&self) -> RedisKey {
        RedisKey(self.invalidation_channel())
    }

    /// The fill-version companion of a key (see `infra::cache`): bumped by every invalidation.
    pub fn version_of(&self, redis_key: &str) -> String {
        let unprefixed = redis_key.strip_prefix(&self.prefix).unwrap_or(redis_key);
        format!("{}version:{unprefixed}", self.prefix)
    }

    /// The pub/sub channel the event relay publishes on (see `infra::events`).
    pub fn event_channel(&self) -> String {
        format!("{}events", self.prefix)
    }

    /// The pub/sub channel invalidations travel on.
    pub fn invalidation_channel(&self) -> String {
        format!("{}invalidations", self.prefix)
    }

    /// `SCAN` pattern for a whole namespace.
    pub fn namespace_pattern(&self, namespace: Namespace) -> String {
        format!("{}{}:*", self.prefix, namespace.as_str())
    }

    /// Parses a full Redis key back into a plain `CacheKey` (for invalidation messages).
    pub fn parse(&self, redis_key: &str) -> Option<CacheKey> {
        let rest = redis_key.strip_prefix(&self.prefix)?;
        let (namespace, _) = rest.split_once(':')?;
        Some(CacheKey {
            namespace: Namespace::parse(namespace)?,
            l1_key: redis_key.to_owned(),
            redis_key_len: redis_key.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn registry() -> KeyRegistry {
        KeyRegistry::new("app:", Settings::from_lookup(|_| None).unwrap().ttl)
    }

    #[test]
    fn keys_follow_prefix_namespace_id() {
        let id = Uuid::nil();
        let keys = registry();
        assert_eq!(keys.task(id).redis_key(), format!("app:tasks:{{{id}}}"));
        assert_eq!(
            keys.task_list(id, "limit=5".into()).l1_key(),
            format!("app:task-lists:{{{id}}}#limit=5")
        );
        assert_eq!(
            keys.version_of(keys.task(id).redis_key()),
            format!("app:version:tasks:{{{id}}}")
        );
        assert_eq!(keys.parse(&format!("app:tasks:{{{id}}}")), Some(keys.task(id)));
        assert_eq!(keys.parse("other:tasks:1"), None);
    }

    #[test]
    fn rate_limit_keys_are_bounded_and_distinct_whatever_the_identity() {
        let keys = registry();
        let hostile = ["a:b", "*", "\0", "é", &"x".repeat(10_000), ""];
        let built: Vec<RedisKey> = hostile
            .iter()
            .map(|id| keys.rate_limit("login", id.as_bytes()))
            .collect();
        for key in &built {
            assert_eq!(key.as_str().len(), "app:rl:login:{}".len() + 64, "{key:?}");
        }
        let distinct: std::collections::HashSet<_> = built.iter().collect();
        assert_eq!(distinct.len(), hostile.len());
        assert_ne!(keys.rate_limit("login", b"x"), keys.rate_limit("api", b"x"));
    }

    #[test]
    fn what_one_script_or_transaction_touches_shares_a_cluster_slot_and_ids_spread() {
        use redis::cluster_routing::Slot;
        let keys = registry();
        let ids: Vec<Uuid> = (0..64).map(|_| Uuid::new_v4()).collect();
        for &id in &ids {
            let entries = [
                keys.task(id),
                keys.task_list(id, "limit=5".into()),
                keys.assigned_task_list(id, "limit=5".into()),
                keys.member(id, id),
                keys.auth_token(&[7; 32]),
                keys.daily_metrics(id, "range".into()),
            ];
            for entry in entries {
                let version = keys.version_of(entry.redis_key());
                assert_eq!(Slot::for_key(entry.redis_key()), Slot::for_key(&version), "{version}");
            }
            let identity = id.as_bytes();
            assert_eq!(
                Slot::for_key(keys.rate_limit("auth-ip", identity).as_str()),
                Slot::for_key(keys.rate_limit("api", identity).as_str())
            );
        }
        let slots: std::collections::HashSet<_> =
            ids.iter().map(|&id| Slot::for_key(keys.task(id).redis_key())).collect();
        assert!(slots.len() > 50, "64 tasks on only {} slots", slots.len());
    }

    #[test]
    fn every_namespace_takes_its_ttl_from_the_table() {
        let keys = registry();
        assert_eq!(keys.ttl(Namespace::Tasks).as_secs(), 300);
        assert_eq!(keys.ttl(Namespace::TaskLists).as_secs(), 300);
        assert_eq!(keys.ttl(Namespace::Projects).as_secs(), 600);
        assert_eq!(keys.ttl(Namespace::Workspaces).as_secs(), 1800);
        assert_eq!(keys.ttl(Namespace::DailyMetrics).as_secs(), 900);
        assert_eq!(keys.ttl(Namespace::Users).as_secs(), 3600);
        assert_eq!(keys.ttl(Namespace::AuthTokens).as_secs(), 7200);
    }
}
