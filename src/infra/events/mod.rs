//! Durable events, a container component (`EventBus`): a transactional outbox, a relay, and the
//! feeds that stream each workspace's events to this instance's clients.
//!
//! What it guarantees:
//! - **Recorded with the change.** `record` inserts the event row in the caller's transaction
//!   (`Database::transaction`), so an event exists exactly when its change committed.
//! - **Ordered per workspace, without gaps.** The relay numbers events per workspace in the order
//!   they were inserted, and marks them published in the same commit, so a reader that has seen
//!   number N can read every number below it. A change that follows another (its transaction
//!   began after the other committed) gets the higher number. Writers lock nothing to record, so
//!   writes to one workspace do not wait for each other's commits.
//! - **Published at least once.** The relay (one at a time across the fleet, under a Postgres
//!   advisory lock) numbers unpublished rows and commits, then sends them in order on Redis
//!   pub/sub while this instance keeps the fleet in sync through Redis, else (or when Redis
//!   fails) with Postgres `NOTIFY`. It runs at once after a local commit and every
//!   `EVENTS_RELAY_EVERY_MS`, so an event whose writer died before waking it goes out too.
//! - **In-app subscribers** (`subscribe`) run in a pass of their own (one at a time across the
//!   fleet, like the relay, but apart from it, so a slow subscriber never delays what clients
//!   see), in order per workspace, each event in a transaction of its own: at least once across
//!   the fleet (once, unless an instance dies or freezes between running an event's subscribers
//!   and committing its mark; they must be idempotent). A subscriber that fails, panics or times
//!   out (`EVENTS_HANDLER_TIMEOUT_MS`) is tried three times; after that the failure is
//!   logged (naming the event) and counted (`nestling_event_handler_failures_total`), and the
//!   events behind it go on. Subscribe at start-up, on every instance alike: an event recorded
//!   while nobody subscribed to its type is recorded as handled.
//! - **Streams miss nothing.** Every instance hears both channels and hands each workspace's
//!   events to its streams in order, deduplicated by number. A gap (a message lost while Redis
//!   restarted) is read from the table, and every `EVENTS_CATCH_UP_MS` each followed workspace is
//!   read from the table anyway: pub/sub only makes delivery fast, the table makes it complete.
//!   The prune deletes a prefix of each workspace's rows (never one behind a row still queued),
//!   so what a stream reads has no holes. A LISTEN that hears nothing for two ping periods (each
//!   instance NOTIFYs a ping every 5 s) is made again: a silently cut connection cannot stall it.
//!
//! What it does not:
//! - Keep events forever: rows older than `EVENTS_RETENTION` are pruned; a client further behind
//!   is told to reload (`resync`).
//! - Order across workspaces, or exactly-once delivery to subscribers.
//! - Survive a frozen relay at full speed: the relay's lock is a transaction's, and Postgres ends a
//!   transaction idle for longer than the relay deadline, so another instance takes over after it.

mod hub;
mod outbox;
mod relay;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use shaku::{Component, Interface};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::config::EventSettings;
use crate::infra::database::Database;
use crate::infra::redis::RedisService;
use crate::infra::telemetry::Telemetry;
pub use hub::{Follow, FollowError};

/// One event of a workspace, as recorded, relayed and streamed.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub workspace_id: Uuid,
    /// The workspace's sequence number: 1, 2, 3, … in commit order (the SSE `id:`).
    pub seq: i64,
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub event_type: String,
    pub data: serde_json::Value,
    pub occurred_at: DateTime<Utc>,
}

/// An in-app subscriber: `Err` (or a timeout) makes the relay try again.
pub type Handler = Arc<dyn Fn(Arc<Event>) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

#[async_trait]
pub trait EventBus: Interface {
    /// Records an event of the workspace in the current transaction (`Database::transaction`),
    /// and wakes the relay once it commits (the relay gives it its number).
    async fn record(
        &self,
        workspace_id: Uuid,
        event_type: &'static str,
        data: serde_json::Value,
    ) -> Result<(), sqlx::Error>;
    /// Runs `handler` for every event of these types (see the module header).
    fn subscribe(&self, types: &[&'static str], handler: Handler);
    /// Follows a workspace's events on this instance for `user_id`, within the stream limits.
    async fn follow(&self, workspace_id: Uuid, user_id: Uuid) -> Result<Follow, FollowError>;
    /// The workspace's events after `after`, up to `upto` (inclusive), at most `limit`, in order.
    async fn read(&self, workspace_id: Uuid, after: i64, upto: i64, limit: i64) -> Result<Vec<Event>, sqlx::Error>;
    /// The workspace's last number (0 before its first event).
    async fn head(&self, workspace_id: Uuid) -> Result<i64, sqlx::Error>;
    /// The number of the workspace's latest retained event of this type whose data contains
    /// `data` (JSON containment), if any. One the relay has not numbered yet is waited for (it is
    /// woken), up to a second; after that the workspace's last number stands in for it.
    async fn latest(
        &self,
        workspace_id: Uuid,
        event_type: &str,
        data: serde_json::Value,
    ) -> Result<Option<i64>, sqlx::Error>;
    /// Starts the relay, the listeners and the catch-up on this instance.
    fn start(&self);
    fn settings(&self) -> &EventSettings;
    /// Ends every stream on this instance and refuses new ones (shutting down).
    fn end_streams(&self);
}

pub struct OutboxEventBus {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    db: Arc<dyn Database>,
    redis: Arc<dyn RedisService>,
    settings: EventSettings,
    telemetry: Arc<Telemetry>,
    subscribers: Mutex<Vec<(Vec<&'static str>, Handler)>>,
    /// Wake the relay and the subscriber pass after a local commit.
    relay_wake: Notify,
    handlers_wake: Notify,
    hub: hub::Hub,
}

pub struct OutboxEventBusParameters {
    pub settings: EventSettings,
    pub telemetry: Arc<Telemetry>,
}

crate::container::set_by_the_container!(OutboxEventBusParameters);

impl<M: shaku::Module + shaku::HasComponent<dyn Database> + shaku::HasComponent<dyn RedisService>> Component<M>
    for OutboxEventBus
{
    type Interface = dyn EventBus;
    type Parameters = OutboxEventBusParameters;

    fn build(context: &mut shaku::ModuleBuildContext<M>, params: OutboxEventBusParameters) -> Box<dyn EventBus> {
        let db = <M as shaku::HasComponent<dyn Database>>::build_component(context);
        let redis = <M as shaku::HasComponent<dyn RedisService>>::build_component(context);
        let hub = hub::Hub::new(&params.settings, params.telemetry.clone());
        Box::new(OutboxEventBus {
            inner: Arc::new(Inner {
                db,
                redis,
                settings: params.settings,
                telemetry: params.telemetry,
                subscribers: Mutex::new(Vec::new()),
                relay_wake: Notify::new(),
                handlers_wake: Notify::new(),
                hub,
            }),
        })
    }
}

#[async_trait]
impl EventBus for OutboxEventBus {
    async fn record(
        &self,
        workspace_id: Uuid,
        event_type: &'static str,
        data: serde_json::Value,
    ) -> Result<(), sqlx::Error> {
        let subscribed = !self.inner.subscribers_of(event_type).is_empty();
        outbox::insert(&*self.inner.db, workspace_id, event_type, &data, subscribed).await?;
        let inner = self.inner.clone();
        let wake = move || inner.relay_wake.notify_one();
        crate::infra::database::transaction::after_commit(wake).await;
        Ok(())
    }

    fn subscribe(&self, types: &[&'static str], handler: Handler) {
        let mut subscribers = self.inner.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subscribers.push((types.to_vec(), handler));
    }

    async fn follow(&self, workspace_id: Uuid, user_id: Uuid) -> Result<Follow, FollowError> {
        self.inner.follow(workspace_id, user_id).await
    }

    async fn read(&self, workspace_id: Uuid, after: i64, upto: i64, limit: i64) -> Result<Vec<Event>, sqlx::Error> {
        outbox::read(&*self.inner.db, workspace_id, after, upto, limit).await
    }

    async fn head(&self, workspace_id: Uuid) -> Result<i64, sqlx::Error> {
        outbox::head(&*self.inner.db, workspace_id).await
    }

    async fn latest(
        &self,
        workspace_id: Uuid,
        event_type: &str,
        data: serde_json::Value,
    ) -> Result<Option<i64>, sqlx::Error> {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        loop {
            match outbox::latest(&*self.inner.db, workspace_id, event_type, &data).await? {
                None => return Ok(None),
                Some(Some(seq)) => return Ok(Some(seq)),
                Some(None) if std::time::Instant::now() >= deadline => {
                    return outbox::head(&*self.inner.db, workspace_id).await.map(Some)
                }
                Some(None) => {
                    self.inner.relay_wake.notify_one();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    fn start(&self) {
        tokio::spawn(relay::run(self.inner.clone()));
        tokio::spawn(relay::run_subscribers(self.inner.clone()));
        hub::start(self.inner.clone());
    }

    fn settings(&self) -> &EventSettings {
        &self.inner.settings
    }

    fn end_streams(&self) {
        self.inner.hub.end_all();
    }
}

impl Inner {
    /// The subscribers of an event type, in the order they subscribed.
    fn subscribers_of(&self, event_type: &str) -> Vec<Handler> {
        let subscribers = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subscribers
            .iter()
            .filter(|(types, _)| types.contains(&event_type))
            .map(|(_, handler)| handler.clone())
            .collect()
    }

    fn has_subscribers(&self) -> bool {
        self.subscriber_count() > 0
    }

    fn subscriber_count(&self) -> usize {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The Postgres channel of relayed events (NOTIFY), per database.
const NOTIFY_CHANNEL: &str = "nestling_events";
/// NOTIFY takes payloads under 8000 bytes: a larger event travels as its number only.
const NOTIFY_MAX_PAYLOAD: usize = 7900;
/// Rows one relay pass or one catch-up read takes at most.
const BATCH: i64 = 500;
/// Attempts an in-app subscriber gets per event.
const HANDLER_ATTEMPTS: u32 = 3;
/// How often the relay prunes old rows.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
