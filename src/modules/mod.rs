//! Feature modules: each owns its routes (controller), rules (service), SQL (repository) and DTOs.

pub mod admin;
pub mod auth;
pub mod cache_policy;
pub mod events;
pub mod health;
pub mod maintenance;
pub mod metrics;
pub mod projects;
pub mod tasks;
pub mod users;
pub mod workspaces;
// @generate: modules

use actix_web::web::{self, ServiceConfig};

use crate::infra::rate_limit::middleware::RateLimit;

/// The routing table. Routes are grouped in scopes by their static prefix: actix tries a request
/// against each pattern in turn (a regex per dynamic path), and a scope skips its whole group
/// with one prefix comparison. On the benchmark's task list this alone took throughput from
/// about 32k to about 50k req/s (BENCHMARKS.md). A scope answers unknown paths below it with the
/// app's `route_not_found`; each feature mounts its resources relative to its scope.
///
/// Every `/api` scope is wrapped in the `/api` rate-limit policy (`RateLimit::api()`); login and
/// register carry the credentials policy instead (see `auth::configure`); `/health*`, `/metrics`,
/// `/docs` and `/admin` are not limited.
pub fn configure(cfg: &mut ServiceConfig) {
    cfg.configure(health::configure)
        .service(web::scope("/api/auth").configure(auth::configure))
        .service(
            web::scope("/api/users/me")
                .wrap(RateLimit::api())
                .configure(users::configure),
        )
        .service(
            web::scope("/api/workspaces")
                .wrap(RateLimit::api())
                // @generate: workspace-children
                .configure(workspaces::configure)
                .configure(projects::configure_in_workspace)
                .configure(metrics::configure)
                .configure(events::configure),
        )
        .service(
            web::scope("/api/projects")
                .wrap(RateLimit::api())
                // @generate: project-children
                .configure(tasks::configure_in_project)
                .configure(projects::configure),
        )
        .service(
            web::scope("/api/tasks")
                .wrap(RateLimit::api())
                .configure(tasks::configure),
        )
        // @generate: scopes
        .service(web::scope("/admin").configure(admin::configure))
        .configure(cache_policy::configure);
}

/// The app's job kinds and schedules, registered on every instance at start-up (before the
/// workers start), whether it serves HTTP or only runs workers.
pub fn register_jobs(module: &crate::container::AppModule, settings: &crate::config::JobSettings) {
    use shaku::HasComponent;
    let jobs: std::sync::Arc<dyn crate::infra::jobs::JobQueue> = module.resolve();
    jobs.register(
        metrics::jobs::rebuild_kind(),
        metrics::jobs::rebuild_handler(module.resolve()),
    );
    jobs.register(maintenance::purge_kind(), maintenance::purge_handler(module.resolve()));
    let reminders = tasks::reminders::Reminders {
        tasks: module.resolve(),
        events: module.resolve(),
        db: module.resolve(),
    };
    jobs.register(tasks::reminders::kind(), tasks::reminders::handler(reminders));
    let schedules = [
        (maintenance::PURGE, &settings.purge_schedule),
        (tasks::reminders::DUE_REMINDERS, &settings.due_reminders_schedule),
    ];
    for (kind, cron) in schedules {
        // Checked when the settings were read: a bad expression never gets here.
        if let Err(err) = jobs.schedule(kind, cron) {
            log::error!("jobs: cannot schedule {kind}: {err}");
        }
    }
}

/// One path with all its methods; a method it has no route for answers 405 with the envelope.
pub fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(crate::error::method_not_allowed))
}

/// `limit` / `offset` paging shared by list endpoints.
pub mod paging {
    use serde::{Deserialize, Serialize};
    use utoipa::ToSchema;

    pub const DEFAULT_LIMIT: i64 = 50;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Paging {
        pub limit: i64,
        pub offset: i64,
    }

    /// One page of items; `nextOffset` is null on the last page.
    #[derive(Debug, Serialize, Deserialize, ToSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct Page<T> {
        pub items: Vec<T>,
        pub limit: i64,
        pub offset: i64,
        pub next_offset: Option<i64>,
    }

    impl<T> Page<T> {
        /// `rows` was fetched with `limit + 1`: the extra row only tells whether a next page exists.
        pub fn from_rows(mut rows: Vec<T>, paging: Paging) -> Self {
            let more = rows.len() as i64 > paging.limit;
            rows.truncate(paging.limit as usize);
            Page {
                items: rows,
                limit: paging.limit,
                offset: paging.offset,
                next_offset: more.then_some(paging.offset + paging.limit),
            }
        }
    }
}

/// PATCH fields that distinguish "absent" (leave as is) from `null` (clear): `Option<Option<T>>`
/// with `#[serde(default, deserialize_with = "nullable::deserialize")]`.
pub mod nullable {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

/// Whole numbers in request bodies: JSON Schema counts `7.0` as an integer and a client may send
/// it so, where serde's `i64` wants `7`. Accepted when it has no fractional part and fits; with
/// `#[serde(deserialize_with = "whole_number::deserialize")]` (or `optional` for `Option<i64>`,
/// `nullable` for a PATCH's `Option<Option<i64>>`, each with `default`).
pub mod whole_number {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer};
    use serde_json::Number;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        whole(Number::deserialize(d)?)
    }

    pub fn optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        Option::<Number>::deserialize(d)?.map(whole).transpose()
    }

    pub fn nullable<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
        optional(d).map(Some)
    }

    fn whole<E: Error>(number: Number) -> Result<i64, E> {
        // 2^63 as f64: the first value past i64::MAX.
        const OUT_OF_RANGE: f64 = 9_223_372_036_854_775_808.0;
        number
            .as_i64()
            .or_else(|| {
                number
                    .as_f64()
                    .filter(|f| f.fract() == 0.0 && (-OUT_OF_RANGE..OUT_OF_RANGE).contains(f))
                    .map(|f| f as i64)
            })
            .ok_or_else(|| E::custom(format!("expected a whole number from -2^63 to 2^63-1, got {number}")))
    }

    #[cfg(test)]
    mod tests {
        #[derive(serde::Deserialize)]
        struct Body {
            #[serde(deserialize_with = "super::deserialize")]
            n: i64,
        }

        #[test]
        fn integral_floats_are_whole_numbers_and_fractions_are_not() {
            let n = |json: &str| serde_json::from_str::<Body>(json).map(|body| body.n).ok();
            assert_eq!(n(r#"{"n": 7}"#), Some(7));
            assert_eq!(n(r#"{"n": -1022.0}"#), Some(-1022));
            assert_eq!(n(r#"{"n": 1.5}"#), None);
            assert_eq!(n(r#"{"n": 1e300}"#), None);
            assert_eq!(n(r#"{"n": "7"}"#), None);
        }
    }
}

/// A cacheable read as an HTTP response: the cached JSON bytes as they are, or their gzip or
/// brotli form kept with the entry (`Accept-Encoding`; `Vary` says so), with an `ETag` per form,
/// `Cache-Control: private, no-cache` (clients keep it but revalidate: a 304 costs no body),
/// the cache's view in `Cache-Status` (RFC 9211) and, for familiarity, `X-Cache` (`HIT-L1`,
/// `HIT-L2`, `MISS`, `BYPASS`).
pub fn cached_response(cached: crate::infra::cache::Cached) -> CachedResponse {
    CachedResponse(cached)
}

/// See `cached_response`: a responder, because the form depends on the request.
pub struct CachedResponse(crate::infra::cache::Cached);

impl actix_web::Responder for CachedResponse {
    type Body = actix_web::body::BoxBody;

    fn respond_to(self, req: &actix_web::HttpRequest) -> actix_web::HttpResponse {
        use crate::infra::cache::CacheTier;
        use crate::infra::edge::preferred_coding;
        use crate::infra::telemetry::Telemetry;
        use actix_web::http::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_ENCODING, ETAG, VARY};
        const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
        const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
        let cached = self.0;
        let status = match cached.tier {
            CacheTier::HitL1 => format!("nestling; hit; ttl={}", cached.ttl.as_secs()),
            CacheTier::HitL2 => format!("nestling; hit; ttl={}; detail=redis", cached.ttl.as_secs()),
            CacheTier::Miss => "nestling; fwd=miss; stored".to_owned(),
            CacheTier::Bypass => "nestling; fwd=request".to_owned(),
        };
        let mut response = actix_web::HttpResponse::Ok();
        response
            .content_type("application/json")
            .insert_header((CACHE_CONTROL, HeaderValue::from_static("private, no-cache")))
            .insert_header((VARY, HeaderValue::from_static("accept-encoding")))
            .insert_header((CACHE_STATUS, status))
            .insert_header((X_CACHE, HeaderValue::from_static(cached.tier.header_value())));
        let coding = preferred_coding(req.headers());
        let count = || {
            if let Some(telemetry) = req.app_data::<std::sync::Arc<Telemetry>>() {
                telemetry.cache_compressions.with_label_values(&[coding.token()]).inc();
            }
        };
        match cached.compressed.form(coding, &cached.bytes, &cached.etag, count) {
            Some(form) => response
                .insert_header((CONTENT_ENCODING, HeaderValue::from_static(coding.token())))
                .insert_header((ETAG, form.etag.clone()))
                .body(form.bytes.clone()),
            None => response.insert_header((ETAG, cached.etag)).body(cached.bytes),
        }
    }
}

/// Serializes a value for the cache (the bytes the response will carry).
pub fn to_json_bytes<T: serde::Serialize>(value: &T) -> crate::error::AppResult<bytes::Bytes> {
    serde_json::to_vec(value)
        .map(bytes::Bytes::from)
        .map_err(crate::error::AppError::internal)
}

/// Reads a value back from cached bytes (for the few services that need a field of it).
pub fn from_json_bytes<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> crate::error::AppResult<T> {
    serde_json::from_slice(bytes).map_err(crate::error::AppError::internal)
}
