//! The same-work baseline: the benchmarked route (`GET /api/projects/{id}/tasks?limit=20`) as a
//! hand-written actix-web handler with no DI and no middleware, doing the least work a competent
//! engineer would do for nestling's L1-hit answer: the bearer token's SHA-256, then three typed
//! in-process lookups, each filled on a miss and read without decoding on a hit (token hash →
//! session, (user, project) → workspace after the membership check, (project, limit, offset) →
//! page), one clock read for every expiry, a keyed rate-limit check (governor, per user), and the
//! page with its ETag. A miss (the first request) loads the session and the role from Postgres,
//! and the project and the page from the files `bench/run.sh` saved from nestling: only hits are
//! measured.
//!
//! It serves the route on the app's exact path twice, each on a port of its own: the lean answer
//! (body, ETag, cache-control) on the first port, and on the second the answer nestling sends: a
//! request id, the RateLimit headers, the cache's status, the security headers, the
//! `If-None-Match` and `no-cache` checks, gzip and brotli forms made once per page (`Vary`), and the HTTP metrics (the L1 yardstick: that work is
//! the route's; `bench/run.sh` checks the two answers match before it measures). Header names are
//! constants, as nestling's are.
//!
//! Two more routes on the first port give the other tiers their yardsticks: `/one-query/...`
//! reads the same page with one query and serializes it, and `/one-get/...` answers the page's
//! bytes from one Redis GET (on `REDIS_URL`), both without authentication.
//!
//! Usage: same_work <page body file> <project body file> <port> <same-response port>; the
//! database is the app's (`DATABASE_URL`, or the dev service).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    REFERRER_POLICY, VARY, X_CONTENT_TYPE_OPTIONS,
};
use actix_web::web::{self, Bytes};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer};
use governor::clock::DefaultClock;
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use moka::sync::Cache;
use nestling::config::Settings;
use nestling::infra::cache::compressed::Compressed;
use nestling::infra::edge::{self, X_REQUEST_ID};
use nestling::infra::telemetry::Telemetry;
use nestling::modules::tasks::model::Task;
use nestling::modules::workspaces::model::InWorkspace;
use prometheus::{Histogram, IntCounter};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

type FastHash = foldhash::fast::RandomState;

const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

#[derive(Clone, Copy)]
struct Session {
    user_id: Uuid,
    expires_at: Instant,
}

#[derive(Clone)]
struct Page {
    bytes: Bytes,
    etag: HeaderValue,
    expires_at: Instant,
    /// Its gzip and brotli forms, made on first ask (nestling's own type).
    compressed: Arc<Compressed>,
}

struct State {
    sessions: Cache<[u8; 32], Session, FastHash>,
    /// (user, project) → the project's workspace, once the user's membership was found.
    access: Cache<(Uuid, Uuid), Uuid, FastHash>,
    /// (project, limit, offset) → the page.
    pages: Cache<(Uuid, u32, u32), Page, FastHash>,
    page_ttl: Duration,
    limiter: DefaultKeyedRateLimiter<Uuid>,
    /// The same limiter, telling what is left (for the RateLimit headers).
    counting_limiter: RateLimiter<Uuid, DefaultKeyedStateStore<Uuid>, DefaultClock, StateInformationMiddleware>,
    policy: HeaderValue,
    limit: HeaderValue,
    requests: IntCounter,
    duration: Histogram,
    db: PgPool,
    page: Bytes,
    project: Bytes,
    redis: Option<redis::aio::MultiplexedConnection>,
    page_in_redis: String,
}

#[derive(serde::Deserialize)]
struct ListQuery {
    limit: Option<u32>,
    offset: Option<u32>,
}

impl State {
    async fn load_session(&self, digest: &[u8; 32], now: Instant) -> Option<Session> {
        let (user_id, seconds_left): (Uuid, f64) = sqlx::query_as(
            "SELECT user_id, extract(epoch FROM expires_at - now())::float8 FROM auth_tokens WHERE token_hash = $1",
        )
        .bind(&digest[..])
        .fetch_optional(&self.db)
        .await
        .ok()??;
        let session = Session {
            user_id,
            expires_at: now + Duration::from_secs_f64(seconds_left.max(0.0)),
        };
        self.sessions.insert(*digest, session);
        Some(session)
    }

    /// The project's workspace when the user is one of its members.
    async fn load_access(&self, user_id: Uuid, project_id: Uuid) -> Option<Uuid> {
        let owner: InWorkspace = serde_json::from_slice(&self.project).ok()?;
        let _role: String =
            sqlx::query_scalar("SELECT role::text FROM workspace_members WHERE workspace_id = $1 AND user_id = $2")
                .bind(owner.workspace_id)
                .bind(user_id)
                .fetch_optional(&self.db)
                .await
                .ok()??;
        self.access.insert((user_id, project_id), owner.workspace_id);
        Some(owner.workspace_id)
    }

    fn fill_page(&self, key: (Uuid, u32, u32), now: Instant) -> Page {
        let digest = Sha256::digest(&self.page);
        let page = Page {
            bytes: self.page.clone(),
            etag: HeaderValue::from_str(&format!("\"{}\"", hex::encode(&digest[..8]))).unwrap(),
            expires_at: now + self.page_ttl,
            compressed: Arc::default(),
        };
        self.pages.insert(key, page.clone());
        page
    }
}

async fn list_tasks<const SAME_RESPONSE: bool>(
    state: web::Data<State>,
    project_id: web::Path<Uuid>,
    query: web::Query<ListQuery>,
    request: HttpRequest,
) -> HttpResponse {
    let started = Instant::now();
    // The one clock read every expiry below is judged by.
    let now = started;
    let Some(token) = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
    else {
        return HttpResponse::Unauthorized().finish();
    };
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let session = match state.sessions.get(&digest) {
        Some(session) => Some(session),
        None => state.load_session(&digest, now).await,
    };
    let Some(Session { user_id, expires_at }) = session else {
        return HttpResponse::Unauthorized().finish();
    };
    if expires_at <= now {
        return HttpResponse::Unauthorized().finish();
    }
    let remaining = if SAME_RESPONSE {
        match state.counting_limiter.check_key(&user_id) {
            Ok(snapshot) => snapshot.remaining_burst_capacity(),
            Err(_) => return HttpResponse::TooManyRequests().finish(),
        }
    } else if state.limiter.check_key(&user_id).is_err() {
        return HttpResponse::TooManyRequests().finish();
    } else {
        0
    };

    let project_id = project_id.into_inner();
    if state.access.get(&(user_id, project_id)).is_none() && state.load_access(user_id, project_id).await.is_none() {
        return HttpResponse::NotFound().finish();
    }
    let key = (project_id, query.limit.unwrap_or(20), query.offset.unwrap_or(0));
    let page = match state.pages.get(&key) {
        Some(page) if page.expires_at > now => page,
        _ => state.fill_page(key, now),
    };
    if !SAME_RESPONSE {
        return HttpResponse::Ok()
            .insert_header((CONTENT_TYPE, HeaderValue::from_static("application/json")))
            .insert_header((CACHE_CONTROL, HeaderValue::from_static("private, no-cache")))
            .insert_header((ETAG, page.etag))
            .body(page.bytes);
    }
    // What nestling adds to the same answer: a request id, the RateLimit headers, the cache's
    // status, the conditional and no-cache checks, and the HTTP metrics.
    // nestling's own helpers (`infra::edge`), so the checks cost what they cost the app.
    let headers = request.headers();
    let request_id = edge::request_id(headers);
    let coding = edge::preferred_coding(headers);
    let (body, etag, encoding) = match page.compressed.form(coding, &page.bytes, &page.etag, || ()) {
        Some(form) => (form.bytes.clone(), form.etag.clone(), Some(coding.token())),
        None => (page.bytes, page.etag, None),
    };
    let unchanged = !edge::asks_no_cache(headers)
        && headers
            .get(IF_NONE_MATCH)
            .is_some_and(|wanted| edge::etag_matches(wanted.as_bytes(), etag.as_bytes()));
    let ttl_left = page.expires_at.saturating_duration_since(now).as_secs();
    let mut response = if unchanged {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    response
        .insert_header((CACHE_CONTROL, HeaderValue::from_static("private, no-cache")))
        .insert_header((VARY, HeaderValue::from_static("accept-encoding")))
        .insert_header((ETAG, etag))
        .insert_header((CACHE_STATUS, format!("nestling; hit; ttl={ttl_left}")))
        .insert_header((X_CACHE, HeaderValue::from_static("HIT-L1")))
        .insert_header((RATELIMIT_POLICY, state.policy.clone()))
        .insert_header((RATELIMIT, format!("\"api-1h\";r={remaining};t=0")))
        .insert_header((X_RATELIMIT_LIMIT, state.limit.clone()))
        .insert_header((X_RATELIMIT_REMAINING, HeaderValue::from(remaining)))
        .insert_header((X_RATELIMIT_RESET, HeaderValue::from(0u32)))
        .insert_header((X_REQUEST_ID, request_id))
        .insert_header((X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")))
        .insert_header((REFERRER_POLICY, HeaderValue::from_static("no-referrer")));
    if let (Some(encoding), false) = (encoding, unchanged) {
        response.insert_header((CONTENT_ENCODING, HeaderValue::from_static(encoding)));
    }
    let response = if unchanged {
        response.finish()
    } else {
        response.content_type("application/json").body(body)
    };
    state.requests.inc();
    state.duration.observe(started.elapsed().as_secs_f64());
    response
}

/// One query for the page's rows (the app's columns and order), serialized.
async fn one_query(state: web::Data<State>, project_id: web::Path<Uuid>) -> HttpResponse {
    let rows: Result<Vec<Task>, _> = sqlx::query_as(
        "SELECT id, project_id, workspace_id, title, description, status, priority, assignee_id, due_date, \
         completed_at, created_at, updated_at FROM tasks WHERE project_id = $1 ORDER BY created_at, id LIMIT 20",
    )
    .bind(project_id.into_inner())
    .fetch_all(&state.db)
    .await;
    match rows.map(|rows| serde_json::to_vec(&rows)) {
        Ok(Ok(body)) => HttpResponse::Ok().content_type("application/json").body(body),
        _ => HttpResponse::ServiceUnavailable().finish(),
    }
}

/// The page's bytes from one Redis GET.
async fn one_get(state: web::Data<State>) -> HttpResponse {
    let Some(mut connection) = state.redis.clone() else {
        return HttpResponse::ServiceUnavailable().finish();
    };
    let page: redis::RedisResult<Vec<u8>> = redis::cmd("GET")
        .arg(&state.page_in_redis)
        .query_async(&mut connection)
        .await;
    match page {
        Ok(body) => HttpResponse::Ok().content_type("application/json").body(body),
        Err(_) => HttpResponse::ServiceUnavailable().finish(),
    }
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let usage = "usage: same_work <page body file> <project body file> <port> <same-response port>";
    let mut args = std::env::args().skip(1);
    let page = Bytes::from(std::fs::read(args.next().expect(usage))?);
    let project = Bytes::from(std::fs::read(args.next().expect(usage))?);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).expect(usage);
    let same_response_port: u16 = args.next().and_then(|p| p.parse().ok()).expect(usage);
    let mut settings = Settings::from_env().expect("settings");
    // The app's own way to its database (DATABASE_URL, or the dev service), without migrating.
    let db = nestling::infra::database::prepare(&mut settings, false)
        .await
        .expect("the app's database");
    // Bounded like nestling's derived values and L1; entries are judged by their own expiry.
    let sessions = Cache::builder()
        .max_capacity(10_000)
        .time_to_live(settings.ttl.auth_token)
        .build_with_hasher(FastHash::default());
    let access = Cache::builder()
        .max_capacity(10_000)
        .time_to_live(settings.ttl.projects.min(settings.ttl.workspaces))
        .build_with_hasher(FastHash::default());
    let pages = Cache::builder()
        .max_capacity(10_000)
        .build_with_hasher(FastHash::default());
    // The quota nestling's /api policy is given in the benchmark: it decides, it never denies.
    let quota = Quota::per_hour(NonZeroU32::new(1_000_000_000).unwrap());
    let page_in_redis = format!("{}bench:same-work-page", settings.redis.key_prefix);
    let redis = match redis::Client::open(settings.redis.url.as_str()) {
        Ok(client) => client.get_multiplexed_async_connection().await.ok(),
        Err(_) => None,
    };
    if let Some(mut connection) = redis.clone() {
        let _: redis::RedisResult<()> = redis::cmd("SET")
            .arg(&page_in_redis)
            .arg(&page[..])
            .arg("EX")
            .arg(3600)
            .query_async(&mut connection)
            .await;
    }
    let telemetry = Telemetry::new();
    let state = web::Data::new(State {
        sessions,
        access,
        pages,
        page_ttl: settings.ttl.tasks,
        limiter: RateLimiter::keyed(quota),
        counting_limiter: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
        policy: HeaderValue::from_static("\"api-1h\";q=1000000000;w=3600"),
        limit: HeaderValue::from_static("1000000000"),
        requests: telemetry
            .http_requests
            .with_label_values(&["GET", "/api/projects/{id}/tasks", "200"]),
        duration: telemetry
            .http_duration
            .with_label_values(&["GET", "/api/projects/{id}/tasks"]),
        db,
        page,
        project,
        redis,
        page_in_redis,
    });
    let lean = {
        let state = state.clone();
        HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .route("/api/projects/{id}/tasks", web::get().to(list_tasks::<false>))
                .route("/one-query/api/projects/{id}/tasks", web::get().to(one_query))
                .route("/one-get/api/projects/{id}/tasks", web::get().to(one_get))
        })
        .bind(("127.0.0.1", port))?
        .run()
    };
    let same_response = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/api/projects/{id}/tasks", web::get().to(list_tasks::<true>))
    })
    .bind(("127.0.0.1", same_response_port))?
    .run();
    futures_util::future::try_join(lean, same_response).await?;
    Ok(())
}
