//! This instance's feeds: for each workspace someone here follows, the last number handed on
//! and the streams that follow it. Events arrive from Redis pub/sub and Postgres `NOTIFY` (both
//! are heard: the relay uses whichever works) and from the table (gaps, reconnections, and a
//! catch-up every `EVENTS_CATCH_UP_MS`), and are handed on in order, each number once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{outbox, relay::seconds_since, Event, Inner, BATCH, NOTIFY_CHANNEL};
use crate::config::EventSettings;
use crate::infra::telemetry::Telemetry;

const RETRY_EVERY: Duration = Duration::from_millis(250);
/// A subscription is pinged this often; one that hears nothing (not even a ping) for twice as long
/// is dropped and made again.
const PING_EVERY: Duration = Duration::from_secs(5);
/// What each instance NOTIFYs every `PING_EVERY`, so that a LISTEN that hears nothing is known dead.
const PING: &str = "ping";

pub(super) struct Hub {
    feeds: Mutex<HashMap<Uuid, Feed>>,
    /// Set when the instance shuts down: no new streams.
    ending: std::sync::atomic::AtomicBool,
    streams: Mutex<StreamCounts>,
    next_id: AtomicU64,
    max_streams: usize,
    max_streams_per_user: usize,
    buffer: usize,
    telemetry: Arc<Telemetry>,
}

struct Feed {
    /// The last number handed on.
    cursor: i64,
    followers: Vec<(u64, mpsc::Sender<Arc<Event>>)>,
}

#[derive(Default)]
struct StreamCounts {
    total: usize,
    per_user: HashMap<Uuid, usize>,
}

/// A stream's events: everything after `from`, in order, through `events`. When the stream falls
/// `EVENTS_STREAM_BUFFER` events behind, `events` ends (the client resumes with `Last-Event-ID`).
/// Dropping it frees the stream's place.
pub struct Follow {
    pub events: mpsc::Receiver<Arc<Event>>,
    pub from: i64,
    _place: Place,
}

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("this user has {0} event streams open on this instance already")]
    TooManyForUser(usize),
    #[error("this instance has {0} event streams open already")]
    TooMany(usize),
    #[error("this instance is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A stream's place in the counts and its feed; given back on drop.
struct Place {
    inner: Arc<Inner>,
    id: u64,
    workspace_id: Uuid,
    user_id: Uuid,
}

impl Drop for Place {
    fn drop(&mut self) {
        let hub = &self.inner.hub;
        {
            let mut feeds = hub.feeds.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(feed) = feeds.get_mut(&self.workspace_id) {
                feed.followers.retain(|(id, _)| *id != self.id);
                if feed.followers.is_empty() {
                    feeds.remove(&self.workspace_id);
                }
            }
        }
        let mut streams = hub.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.total -= 1;
        if let Some(count) = streams.per_user.get_mut(&self.user_id) {
            *count -= 1;
            if *count == 0 {
                streams.per_user.remove(&self.user_id);
            }
        }
        hub.telemetry.event_streams.set(streams.total as i64);
    }
}

impl Hub {
    pub(super) fn new(settings: &EventSettings, telemetry: Arc<Telemetry>) -> Self {
        Self {
            feeds: Mutex::default(),
            ending: Default::default(),
            streams: Mutex::default(),
            next_id: AtomicU64::new(0),
            max_streams: settings.max_streams,
            max_streams_per_user: settings.max_streams_per_user,
            buffer: settings.stream_buffer,
            telemetry,
        }
    }

    /// Ends every stream (their channels close once drained) and refuses new ones.
    pub(super) fn end_all(&self) {
        self.ending.store(true, Ordering::Release);
        self.feeds.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn cursors(&self, only: Option<&[Uuid]>) -> Vec<(Uuid, i64)> {
        let feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        feeds
            .iter()
            .filter(|(workspace_id, _)| only.is_none_or(|only| only.contains(workspace_id)))
            .map(|(workspace_id, feed)| (*workspace_id, feed.cursor))
            .collect()
    }

    /// Hands events on to the followers of their workspaces, each number once and in order.
    /// Returns the workspaces where a number was missing (read them from the table).
    fn deliver(&self, events: Vec<Event>) -> Vec<Uuid> {
        let now = chrono::Utc::now();
        let lag = self.telemetry.event_lag.with_label_values(&["delivered"]);
        let mut gaps = Vec::new();
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        for event in events {
            let Some(feed) = feeds.get_mut(&event.workspace_id) else {
                continue;
            };
            if event.seq <= feed.cursor {
                continue;
            }
            if event.seq > feed.cursor + 1 {
                if !gaps.contains(&event.workspace_id) {
                    gaps.push(event.workspace_id);
                }
                continue;
            }
            feed.cursor = event.seq;
            lag.observe(seconds_since(&event, now));
            let event = Arc::new(event);
            // A follower that is gone, or too far behind, is dropped: its stream ends.
            feed.followers
                .retain(|(_, sender)| sender.try_send(event.clone()).is_ok());
        }
        gaps
    }
}

impl Inner {
    pub(super) async fn follow(self: &Arc<Self>, workspace_id: Uuid, user_id: Uuid) -> Result<Follow, FollowError> {
        let hub = &self.hub;
        if hub.ending.load(Ordering::Acquire) {
            return Err(FollowError::ShuttingDown);
        }
        {
            let mut streams = hub.streams.lock().unwrap_or_else(|e| e.into_inner());
            if streams.total >= hub.max_streams {
                return Err(FollowError::TooMany(hub.max_streams));
            }
            let mine = streams.per_user.entry(user_id).or_default();
            if *mine >= hub.max_streams_per_user {
                return Err(FollowError::TooManyForUser(hub.max_streams_per_user));
            }
            *mine += 1;
            streams.total += 1;
            hub.telemetry.event_streams.set(streams.total as i64);
        }
        let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
        // From here on, dropping `place` gives the place back.
        let place = Place {
            inner: self.clone(),
            id,
            workspace_id,
            user_id,
        };
        let known = hub.cursors(Some(&[workspace_id])).first().map(|(_, cursor)| *cursor);
        let head = match known {
            Some(cursor) => cursor,
            None => outbox::head(&*self.db, workspace_id).await?,
        };
        let (sender, events) = mpsc::channel(hub.buffer);
        let mut feeds = hub.feeds.lock().unwrap_or_else(|e| e.into_inner());
        // `end_all` may have run while the head was read.
        if hub.ending.load(Ordering::Acquire) {
            drop(feeds);
            return Err(FollowError::ShuttingDown);
        }
        let feed = feeds.entry(workspace_id).or_insert_with(|| Feed {
            cursor: head,
            followers: Vec::new(),
        });
        feed.followers.push((id, sender));
        Ok(Follow {
            events,
            from: feed.cursor,
            _place: place,
        })
    }

    /// Reads what the feeds (all, or these) have not handed on yet from the table.
    async fn catch_up(&self, only: Option<&[Uuid]>) {
        loop {
            let cursors = self.hub.cursors(only);
            if cursors.is_empty() {
                return;
            }
            let events = match outbox::read_many(&*self.db, &cursors).await {
                Ok(events) => events,
                Err(err) => {
                    log::debug!("events: catching up from the table failed: {err}");
                    return;
                }
            };
            let full = events.len() as i64 == BATCH;
            self.hub.deliver(events);
            if !full {
                return;
            }
        }
    }

    /// A message of the relay: an event, or only its number when it was too large for NOTIFY.
    async fn heard(&self, payload: &str) {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Pointer {
            workspace_id: Uuid,
        }
        let gaps = match serde_json::from_str::<Event>(payload) {
            Ok(event) => self.hub.deliver(vec![event]),
            Err(_) => match serde_json::from_str::<Pointer>(payload) {
                Ok(pointer) => vec![pointer.workspace_id],
                Err(err) => {
                    log::warn!("events: a relayed message is not an event: {err}");
                    return;
                }
            },
        };
        if !gaps.is_empty() {
            self.catch_up(Some(&gaps)).await;
        }
    }
}

pub(super) fn start(inner: Arc<Inner>) {
    tokio::spawn(listen_to_redis(inner.clone()));
    tokio::spawn(listen_to_postgres(inner.clone()));
    tokio::spawn(ping_postgres_listeners(inner.clone()));
    tokio::spawn(async move {
        let mut every = tokio::time::interval(inner.settings.catch_up_every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            inner.catch_up(None).await;
        }
    });
}

async fn listen_to_redis(inner: Arc<Inner>) {
    loop {
        if inner.redis.synced().is_some() {
            if let Err(err) = subscribe_on_redis(&inner).await {
                log::debug!("events: Redis subscription: {err}");
            }
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

async fn subscribe_on_redis(inner: &Inner) -> Result<(), String> {
    let Some(redis) = inner.redis.synced() else {
        return Ok(());
    };
    let pubsub = redis.pubsub().await.map_err(|e| e.to_string())?;
    let (mut sink, mut messages) = pubsub.split();
    let timeout = inner.redis.settings().connect_timeout;
    tokio::time::timeout(timeout, sink.subscribe(inner.redis.keys().event_channel()))
        .await
        .map_err(|_| "subscribe timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    // Whatever was published while we were not subscribed.
    inner.catch_up(None).await;
    let mut ping = tokio::time::interval(PING_EVERY);
    loop {
        tokio::select! {
            message = messages.next() => {
                let message = message.ok_or("subscription closed")?;
                let payload: String = message.get_payload().map_err(|e| e.to_string())?;
                inner.heard(&payload).await;
            }
            _ = ping.tick() => {
                if !inner.redis.is_syncing() {
                    return Ok(());
                }
                let pong = tokio::time::timeout(timeout, sink.ping::<bb8_redis::redis::Value>()).await;
                match pong {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => return Err(format!("ping failed: {err}")),
                    Err(_) => return Err("ping timed out".into()),
                }
            }
        }
    }
}

async fn ping_postgres_listeners(inner: Arc<Inner>) {
    let mut every = tokio::time::interval(PING_EVERY);
    loop {
        every.tick().await;
        let ping = sqlx::query("SELECT pg_notify($1, $2)").bind(NOTIFY_CHANNEL).bind(PING);
        if let Err(err) = inner.db.run(ping.execute(inner.db.pool())).await {
            log::debug!("events: pinging the listeners failed: {err}");
        }
    }
}

async fn listen_to_postgres(inner: Arc<Inner>) {
    // A pool of its own, of one connection: LISTEN holds its connection for good.
    let options = inner.db.pool().connect_options().as_ref().clone();
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(inner.db.statement_timeout())
        .connect_lazy_with(options);
    loop {
        match PgListener::connect_with(&pool).await {
            Ok(mut listener) => {
                match crate::infra::database::within(inner.db.statement_timeout(), listener.listen(NOTIFY_CHANNEL))
                    .await
                {
                    Ok(()) => {
                        inner.catch_up(None).await;
                        loop {
                            // A server cut off without a reset never answers: the pings (ours, or
                            // any instance's) stop, and the listener is dropped and made again.
                            match tokio::time::timeout(PING_EVERY * 2, listener.try_recv()).await {
                                Ok(Ok(Some(notification))) if notification.payload() == PING => {}
                                Ok(Ok(Some(notification))) => inner.heard(notification.payload()).await,
                                // Reconnected: what was sent meanwhile is lost to LISTEN.
                                Ok(Ok(None)) => inner.catch_up(None).await,
                                Ok(Err(err)) => {
                                    log::debug!("events: LISTEN: {err}");
                                    break;
                                }
                                Err(_) => {
                                    log::debug!("events: LISTEN heard nothing, not even a ping: listening afresh");
                                    break;
                                }
                            }
                        }
                    }
                    Err(err) => log::debug!("events: LISTEN failed: {err}"),
                }
            }
            Err(err) => log::debug!("events: LISTEN connection: {err}"),
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}
