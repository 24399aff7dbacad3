use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use shaku::HasComponent;
use uuid::Uuid;

use super::model::{MEMBER_ADDED, MEMBER_REMOVED, WORKSPACE_DELETED};
use crate::container::AppModule;
use crate::error::{AppError, AppResult, ErrorBody};
use crate::infra::events::{Event, EventBus, Follow, FollowError};
use crate::modules::auth::service::AuthService;
use crate::modules::auth::AuthUser;
use crate::modules::resource;
use crate::modules::workspaces::service::WorkspaceService;

/// Mounted under `/api/workspaces`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/{id}/events").route(web::get().to(stream_events)));
}

/// Events read from the table per round trip when a stream catches up.
const PAGE: i64 = 500;
/// What a reconnecting client waits before it tries again (the SSE `retry:` field).
const RECONNECT_AFTER: &[u8] = b"retry: 1000\n\n";
const HEARTBEAT: &[u8] = b": keep-alive\n\n";

/// The workspace's events as Server-Sent Events, to its members: `id:` is the workspace's
/// sequence number, `event:` the type (`task.created`, `task.updated`, `task.deleted`,
/// `project.created`, `project.updated`, `project.deleted`, `member.added`, `member.removed`,
/// `workspace.updated`, `workspace.deleted`), `data:` the event as JSON
/// (`{"workspaceId","seq","type","data","occurredAt"}`). A client that reconnects with
/// `Last-Event-ID` gets what it missed, in order; one further behind than `EVENTS_RETENTION` first
/// gets a `resync` event (reload the state, then follow on). The stream ends when the caller
/// stops being a member or their token ends (within `EVENTS_RECHECK_MS`), and after
/// `workspace.deleted`. Send the token in the `Authorization` header (use a fetch-based SSE
/// client: a token in the URL would end up in logs).
#[utoipa::path(
    get, path = "/api/workspaces/{id}/events", tag = "events", operation_id = "stream_workspace_events", security(("bearer" = [])),
    params(
        ("id" = Uuid, Path, description = "Workspace id"),
        ("Last-Event-ID" = Option<i64>, Header, description = "The last `id:` received: the stream starts after it"),
    ),
    responses(
        (status = 200, description = "An endless `text/event-stream`", content_type = "text/event-stream", body = String),
        (status = 400, description = "`Last-Event-ID` is not a whole number ≥ 0", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 429, description = "Too many streams open for this user or on this instance (`too_many_streams`)", body = ErrorBody),
    )
)]
pub async fn stream_events(req: HttpRequest, me: AuthUser, id: web::Path<Uuid>) -> AppResult<HttpResponse> {
    let module = req
        .app_data::<Arc<AppModule>>()
        .ok_or_else(|| AppError::internal("AppModule missing from app data"))?;
    let workspaces: Arc<dyn WorkspaceService> = module.resolve();
    let auth: Arc<dyn AuthService> = module.resolve();
    let events: Arc<dyn EventBus> = module.resolve();
    let settings = events.settings().clone();
    let workspace_id = *id;
    workspaces.require_member(me.id, workspace_id).await?;
    let last_event_id = last_event_id(&req)?;
    // A member reads from when they (last) joined, not the workspace's history before that: with
    // a `Last-Event-ID` from before it, and without one while the events recorded just before
    // they joined are still being numbered.
    let joined = events
        .latest(workspace_id, MEMBER_ADDED, serde_json::json!({ "userId": me.id }))
        .await?;
    let not_before = joined.map(|joined| joined - 1);
    let follow = events.follow(workspace_id, me.id).await.map_err(|err| match err {
        FollowError::Database(err) => AppError::from(err),
        FollowError::ShuttingDown => AppError::ServiceBusy { retry_after_secs: 1 },
        too_many => {
            log::debug!("events: stream refused: {too_many}");
            AppError::AtCapacity {
                code: "too_many_streams",
                message: "too many event streams are open",
                retry_after_secs: 5,
            }
        }
    })?;
    let start = match (last_event_id, not_before) {
        (Some(id), Some(floor)) => Some(id.max(floor)),
        (Some(id), None) => Some(id),
        (None, floor) => floor.filter(|floor| *floor > follow.from),
    };
    let start = match start {
        None => Start::Live,
        // Ahead of this instance's feed: it may lag (another instance served the client). The
        // workspace's last number tells a lagging feed from an id that is not this stream's.
        Some(id) if id > follow.from => {
            let head = events.head(workspace_id).await?;
            if id <= head {
                Start::After(id)
            } else {
                Start::Resync { client: id, head }
            }
        }
        Some(id) => Start::After(id),
    };
    let stream = EventStream::new(
        follow,
        start,
        Checks {
            events,
            auth,
            workspaces,
            user_id: me.id,
            token: me.token,
            workspace_id,
        },
        settings.heartbeat,
        settings.recheck_every,
    );
    let body = futures_util::stream::unfold(stream, |mut stream| async move {
        let chunk = stream.next_chunk().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), stream))
    });
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream")))
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-cache")))
        // nginx would otherwise buffer the stream.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

fn last_event_id(req: &HttpRequest) -> AppResult<Option<i64>> {
    let Some(value) = req.headers().get("last-event-id") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|value| value.trim().parse::<i64>().ok())
        .filter(|id| *id >= 0)
        .map(Some)
        .ok_or_else(|| AppError::BadRequest {
            code: "invalid_last_event_id",
            message: "Last-Event-ID must be a whole number >= 0 (an id this stream sent)".into(),
        })
}

/// Where a stream starts.
enum Start {
    /// With the next event.
    Live,
    /// After the client's `Last-Event-ID`: what it missed is read from the table first.
    After(i64),
    /// The client's id is beyond the workspace's last number (not an id of this stream): reload.
    Resync { client: i64, head: i64 },
}

/// What a stream needs besides its events: who it is for, and how to check they still may.
struct Checks {
    events: Arc<dyn EventBus>,
    auth: Arc<dyn AuthService>,
    workspaces: Arc<dyn WorkspaceService>,
    user_id: Uuid,
    token: String,
    workspace_id: Uuid,
}

impl Checks {
    /// Whether the token still works and its user is still a member. Trouble reaching the
    /// stores is not a "no": the stream goes on (the member-removed event still ends it).
    async fn still_allowed(&self) -> bool {
        let gone = |err: &AppError| matches!(err, AppError::Unauthorized { .. } | AppError::NotFound { .. });
        match self.auth.authenticate(&self.token).await {
            Ok(user_id) if user_id == self.user_id => {}
            Ok(_) => return false,
            Err(err) if gone(&err) => return false,
            Err(_) => return true,
        }
        let membership = self.workspaces.require_member(self.user_id, self.workspace_id).await;
        !matches!(membership, Err(err) if gone(&err))
    }
}

/// One client's stream: what it has sent (`last_sent`), what is ready to send (`pending`), and
/// how far it still has to read from the table (`catch_up_to`).
struct EventStream {
    follow: Follow,
    checks: Checks,
    last_sent: i64,
    catch_up_to: Option<i64>,
    pending: VecDeque<Bytes>,
    heartbeat: tokio::time::Interval,
    recheck: tokio::time::Interval,
    ended: bool,
}

impl EventStream {
    fn new(follow: Follow, start: Start, checks: Checks, heartbeat: Duration, recheck: Duration) -> Self {
        let every = |period| tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut stream = Self {
            last_sent: follow.from,
            catch_up_to: None,
            follow,
            checks,
            pending: VecDeque::from([Bytes::from_static(RECONNECT_AFTER)]),
            heartbeat: every(heartbeat),
            recheck: every(recheck),
            ended: false,
        };
        match start {
            Start::Live => {}
            Start::After(id) if id < stream.last_sent => {
                stream.catch_up_to = Some(stream.last_sent);
                stream.last_sent = id;
            }
            // The feed lags behind the client: what it hands on up to `id` is skipped.
            Start::After(id) => stream.last_sent = id,
            Start::Resync { client, head } => {
                stream.pending.push_back(resync(client, head + 1));
                stream.last_sent = stream.last_sent.max(head);
            }
        }
        stream
    }

    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if let Some(chunk) = self.pending.pop_front() {
                return Some(chunk);
            }
            if self.ended {
                return None;
            }
            if let Some(upto) = self.catch_up_to {
                self.read_page(upto).await;
                continue;
            }
            tokio::select! {
                event = self.follow.events.recv() => match event {
                    Some(event) => self.take(&event),
                    // Fell `EVENTS_STREAM_BUFFER` behind: the client resumes with Last-Event-ID.
                    None => self.ended = true,
                },
                _ = self.heartbeat.tick() => self.pending.push_back(Bytes::from_static(HEARTBEAT)),
                _ = self.recheck.tick() => {
                    if !self.checks.still_allowed().await {
                        self.ended = true;
                    }
                }
            }
        }
    }

    fn take(&mut self, event: &Event) {
        if event.seq <= self.last_sent {
            return;
        }
        if event.seq > self.last_sent + 1 {
            // Numbers this stream has not seen: read them, this one included, from the table.
            self.catch_up_to = Some(event.seq);
            return;
        }
        self.send(event);
    }

    fn send(&mut self, event: &Event) {
        self.last_sent = event.seq;
        let json = serde_json::to_string(event).expect("an event serialises");
        self.pending.push_back(Bytes::from(format!(
            "id: {}\nevent: {}\ndata: {json}\n\n",
            event.seq, event.event_type
        )));
        let ends = match event.event_type.as_str() {
            MEMBER_REMOVED => {
                event.data.get("userId").and_then(|id| id.as_str()) == Some(&self.checks.user_id.to_string())
            }
            WORKSPACE_DELETED => true,
            _ => false,
        };
        if ends {
            self.ended = true;
            self.catch_up_to = None;
        }
    }

    async fn read_page(&mut self, upto: i64) {
        let (workspace_id, after) = (self.checks.workspace_id, self.last_sent);
        let events = match self.checks.events.read(workspace_id, after, upto, PAGE).await {
            Ok(events) => events,
            Err(err) => {
                // The client reconnects with its Last-Event-ID and reads them then.
                log::debug!("events: a stream could not read its backlog: {err}");
                self.ended = true;
                return;
            }
        };
        for event in &events {
            if self.ended {
                break;
            }
            if event.seq > self.last_sent + 1 {
                // Pruned (older than EVENTS_RETENTION): the client cannot get these any more.
                self.pending.push_back(resync(self.last_sent, event.seq));
            }
            self.send(event);
        }
        if events.is_empty() && self.last_sent < upto {
            self.pending.push_back(resync(self.last_sent, upto + 1));
            self.last_sent = upto;
        }
        if self.last_sent >= upto || events.is_empty() {
            self.catch_up_to = None;
        }
    }
}

/// Tells the client that events after `last_event_id` and before `first_available` cannot be sent:
/// reload what it shows, then follow on.
fn resync(last_event_id: i64, first_available: i64) -> Bytes {
    Bytes::from(format!(
        "event: resync\ndata: {{\"lastEventId\":{last_event_id},\"firstAvailable\":{first_available}}}\n\n"
    ))
}
