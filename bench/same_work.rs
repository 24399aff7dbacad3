//! The same-work baseline: the benchmarked route (`GET /api/projects/{id}/tasks?limit=20`) as a
//! hand-written actix-web handler with no DI and no middleware, doing the work nestling's L1-hit
//! path does: the bearer token's SHA-256, four lookups in one moka cache configured like
//! nestling's L1 (session, project, membership, task page, under nestling's keys), the expiry
//! check, the project's workspace read from its JSON, the role read from its JSON, a keyed
//! rate-limit check (governor, per user), and the same body with its ETag. A miss (the first
//! request) loads the session and the role from Postgres, and the project and the page from the
//! files `bench/run.sh` saved from nestling: only hits are measured.
//!
//! `/same-response/...` does the same and answers with the response nestling sends: a request id,
//! the RateLimit headers, the cache's status, the `If-None-Match` and `no-cache` checks, and the
//! HTTP metrics (proposed as the L1 yardstick: the app's answer is about 270 bytes of headers
//! longer, and making them is work the route does).
//!
//! Two more routes give the other tiers their yardsticks: `/one-query/...` reads the same page
//! with one query and serializes it, and `/one-get/...` answers the page's bytes from one Redis
//! GET (on `REDIS_URL`), both without authentication.
//!
//! Usage: same_work <page body file> <project body file> <port>; the database is the app's
//! (`DATABASE_URL`, or the dev service).

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use actix_web::web::{self, Bytes};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer};
use governor::clock::DefaultClock;
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use moka::future::Cache;
use nestling::config::Settings;
use nestling::infra::edge::{self, X_REQUEST_ID};
use nestling::infra::redis::keys::KeyRegistry;
use nestling::infra::telemetry::Telemetry;
use nestling::modules::tasks::model::Task;
use nestling::modules::workspaces::model::{InWorkspace, Role};
use prometheus::{Histogram, IntCounter};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Clone)]
struct Entry {
    bytes: Bytes,
    etag: HeaderValue,
    expires_at: Instant,
}

struct State {
    cache: Cache<String, Entry, foldhash::fast::RandomState>,
    keys: KeyRegistry,
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
    /// The cached bytes under `key`, or `load`'s (kept for `ttl`); `None` when nothing is found.
    async fn get_or_fill<F>(&self, key: &str, ttl: Duration, load: F) -> Option<Entry>
    where
        F: std::future::Future<Output = Option<Bytes>>,
    {
        if let Some(entry) = self.cache.get(key).await {
            if entry.expires_at > Instant::now() {
                return Some(entry);
            }
        }
        let bytes = load.await?;
        let digest = Sha256::digest(&bytes);
        let etag = HeaderValue::from_str(&format!("\"{}\"", hex::encode(&digest[..8]))).unwrap();
        let entry = Entry {
            bytes,
            etag,
            expires_at: Instant::now() + ttl,
        };
        self.cache.insert(key.to_owned(), entry.clone()).await;
        Some(entry)
    }
}

async fn list_tasks<const SAME_RESPONSE: bool>(
    state: web::Data<State>,
    project_id: web::Path<Uuid>,
    query: web::Query<ListQuery>,
    request: HttpRequest,
) -> HttpResponse {
    let started = Instant::now();
    let Some(token) = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
    else {
        return HttpResponse::Unauthorized().finish();
    };
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let session_key = state.keys.auth_token(&digest);
    let ttl = |key: &nestling::infra::redis::keys::CacheKey| state.keys.ttl(key.namespace);
    let load_session = async {
        let row: Option<(Uuid, i64)> = sqlx::query_as(
            "SELECT user_id, (extract(epoch FROM expires_at) * 1000)::bigint FROM auth_tokens WHERE token_hash = $1",
        )
        .bind(&digest[..])
        .fetch_optional(&state.db)
        .await
        .ok()?;
        let (user_id, expires_at_ms) = row?;
        let mut bytes = Vec::with_capacity(24);
        bytes.extend_from_slice(user_id.as_bytes());
        bytes.extend_from_slice(&expires_at_ms.to_be_bytes());
        Some(Bytes::from(bytes))
    };
    let Some(session) = state
        .get_or_fill(session_key.l1_key(), ttl(&session_key), load_session)
        .await
    else {
        return HttpResponse::Unauthorized().finish();
    };
    let (user_id, expires_at_ms) = session
        .bytes
        .split_first_chunk::<16>()
        .map(|(id, rest)| (Uuid::from_bytes(*id), i64::from_be_bytes(rest.try_into().unwrap())))
        .unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    if expires_at_ms <= now_ms {
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
    let project_key = state.keys.project(project_id);
    let project = state
        .get_or_fill(project_key.l1_key(), ttl(&project_key), async {
            Some(state.project.clone())
        })
        .await
        .unwrap();
    let Ok(owner) = serde_json::from_slice::<InWorkspace>(&project.bytes) else {
        return HttpResponse::InternalServerError().finish();
    };

    let member_key = state.keys.member(owner.workspace_id, user_id);
    let load_role = async {
        let role: Option<Role> =
            sqlx::query_scalar("SELECT role FROM workspace_members WHERE workspace_id = $1 AND user_id = $2")
                .bind(owner.workspace_id)
                .bind(user_id)
                .fetch_optional(&state.db)
                .await
                .ok()?;
        Some(Bytes::from(serde_json::to_vec(&role?).ok()?))
    };
    let Some(role) = state
        .get_or_fill(member_key.l1_key(), ttl(&member_key), load_role)
        .await
    else {
        return HttpResponse::NotFound().finish();
    };
    if serde_json::from_slice::<Role>(&role.bytes).is_err() {
        return HttpResponse::InternalServerError().finish();
    }

    let variant = format!(
        "status=&assignee=&limit={}&offset={}",
        query.limit.unwrap_or(20),
        query.offset.unwrap_or(0)
    );
    let page_key = state.keys.task_list(project_id, variant);
    let page = state
        .get_or_fill(page_key.l1_key(), ttl(&page_key), async { Some(state.page.clone()) })
        .await
        .unwrap();
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
    let unchanged = !edge::asks_no_cache(headers)
        && headers
            .get(IF_NONE_MATCH)
            .is_some_and(|wanted| edge::etag_matches(wanted.as_bytes(), page.etag.as_bytes()));
    let ttl_left = page.expires_at.saturating_duration_since(Instant::now()).as_secs();
    let mut response = if unchanged {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    response
        .insert_header((CACHE_CONTROL, HeaderValue::from_static("private, no-cache")))
        .insert_header((ETAG, page.etag))
        .insert_header(("cache-status", format!("nestling; hit; ttl={ttl_left}")))
        .insert_header(("x-cache", HeaderValue::from_static("HIT-L1")))
        .insert_header(("ratelimit-policy", state.policy.clone()))
        .insert_header(("ratelimit", format!("\"api-1h\";r={remaining};t=0")))
        .insert_header(("x-ratelimit-limit", state.limit.clone()))
        .insert_header(("x-ratelimit-remaining", HeaderValue::from(remaining)))
        .insert_header(("x-ratelimit-reset", HeaderValue::from(0u32)))
        .insert_header((X_REQUEST_ID, request_id));
    let response = if unchanged {
        response.finish()
    } else {
        response.content_type("application/json").body(page.bytes)
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
    let usage = "usage: same_work <page body file> <project body file> <port>";
    let mut args = std::env::args().skip(1);
    let page = Bytes::from(std::fs::read(args.next().expect(usage))?);
    let project = Bytes::from(std::fs::read(args.next().expect(usage))?);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).expect(usage);
    let mut settings = Settings::from_env().expect("settings");
    // The app's own way to its database (DATABASE_URL, or the dev service), without migrating.
    let db = nestling::infra::database::prepare(&mut settings, false)
        .await
        .expect("the app's database");
    let cache = Cache::builder()
        .max_capacity(settings.cache.l1_max_bytes)
        .weigher(|key: &String, entry: &Entry| u32::try_from(key.len() + entry.bytes.len() + 160).unwrap_or(u32::MAX))
        .time_to_live(settings.ttl.auth_token)
        .support_invalidation_closures()
        .build_with_hasher(foldhash::fast::RandomState::default());
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
        cache,
        keys: KeyRegistry::new(settings.redis.key_prefix.clone(), settings.ttl.clone()),
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
    HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/api/projects/{id}/tasks", web::get().to(list_tasks::<false>))
            .route(
                "/same-response/api/projects/{id}/tasks",
                web::get().to(list_tasks::<true>),
            )
            .route("/one-query/api/projects/{id}/tasks", web::get().to(one_query))
            .route("/one-get/api/projects/{id}/tasks", web::get().to(one_get))
    })
    .bind(("127.0.0.1", port))?
    .run()
    .await
}
