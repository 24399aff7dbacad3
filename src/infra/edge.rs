//! `Edge`: the one app-wide middleware, around every request (errors included):
//! - `X-Request-Id`: kept when the client sends a sane one, generated otherwise, echoed on every
//!   response so the request log line and the client agree;
//! - HTTP metrics: counts and times each request by its route pattern (`/api/tasks/{id}`), so the
//!   label set stays small whatever ids clients send;
//! - HTTP caching: `Cache-Control: no-cache` reads everything fresh from Postgres (`X-Cache:
//!   BYPASS`) and leaves the cache as it is; a GET whose `If-None-Match` names the answer's `ETag`
//!   gets `304 Not Modified` without the body. The handler still runs, so authentication and
//!   authorization are checked as for any read;
//! - security headers: `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer` and, in
//!   production, `Strict-Transport-Security` (what helmet gives NestJS apps).
//!
//! One middleware rather than three: each layer of actix middleware costs the cached read a boxed
//! future and a copy of the inner ones (BENCHMARKS.md, [6/6]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{forward_ready, Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use futures_util::future::{ready, LocalBoxFuture, Ready};
use prometheus::{Histogram, IntCounter};

use crate::infra::cache::bypassing_cache;
use crate::infra::cache::compressed::Coding;
use crate::infra::telemetry::Telemetry;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

const NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
const NO_REFERRER: HeaderValue = HeaderValue::from_static("no-referrer");
/// A year, subdomains included: browsers then refuse plain HTTP to this host.
const HSTS: HeaderValue = HeaderValue::from_static("max-age=31536000; includeSubDomains");

pub struct Edge {
    telemetry: Arc<Telemetry>,
    hsts: bool,
}

impl Edge {
    /// `hsts`: send `Strict-Transport-Security` (production, served over HTTPS by its proxy).
    pub fn new(telemetry: Arc<Telemetry>, hsts: bool) -> Self {
        Self { telemetry, hsts }
    }
}

impl<S, B> Transform<S, ServiceRequest> for Edge
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B, ()>>;
    type Error = actix_web::Error;
    type Transform = EdgeService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(EdgeService {
            service: Rc::new(service),
            hsts: self.hsts,
            metrics: Rc::new(RouteMetrics {
                telemetry: self.telemetry.clone(),
                children: RefCell::default(),
            }),
        }))
    }
}

pub struct EdgeService<S> {
    service: Rc<S>,
    hsts: bool,
    metrics: Rc<RouteMetrics>,
}

/// The HTTP metrics' children, per worker: `with_label_values` hashes the labels under a lock
/// shared by all workers, on every request. Route patterns, methods and statuses are few.
struct RouteMetrics {
    telemetry: Arc<Telemetry>,
    children: RefCell<HashMap<(&'static str, StatusCode), ByRoute>>,
}

/// Per route pattern: its request counter (for one method and status) and latency histogram.
type ByRoute = HashMap<String, (IntCounter, Histogram)>;

impl RouteMetrics {
    fn record(&self, method: &'static str, response: &ServiceResponse<impl MessageBody>, started: Instant) {
        let status = response.status();
        let route = response.request().match_pattern();
        let route = route.as_deref().unwrap_or("unmatched");
        let mut children = self.children.borrow_mut();
        let by_route = children.entry((method, status)).or_default();
        if !by_route.contains_key(route) {
            let requests = self
                .telemetry
                .http_requests
                .with_label_values(&[method, route, status.as_str()]);
            let duration = self.telemetry.http_duration.with_label_values(&[method, route]);
            by_route.insert(route.to_owned(), (requests, duration));
        }
        let (requests, duration) = &by_route[route];
        requests.inc();
        duration.observe(started.elapsed().as_secs_f64());
    }
}

impl<S, B> Service<ServiceRequest> for EdgeService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B, ()>>;
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let started = Instant::now();
        let headers = req.headers();
        let request_id = request_id(headers);
        let no_cache = asks_no_cache(headers);
        let method = method_label(req.method());
        let if_none_match = match *req.method() {
            Method::GET | Method::HEAD => headers.get(header::IF_NONE_MATCH).cloned(),
            _ => None,
        };
        let service = self.service.clone();
        let metrics = self.metrics.clone();
        let hsts = self.hsts;
        Box::pin(async move {
            let mut response = if no_cache {
                bypassing_cache(service.call(req)).await?
            } else {
                service.call(req).await?
            };
            // Handler and extractor errors arrive here as responses already: they get these too.
            let headers = response.headers_mut();
            headers.insert(X_REQUEST_ID, request_id);
            headers.insert(header::X_CONTENT_TYPE_OPTIONS, NOSNIFF);
            headers.insert(header::REFERRER_POLICY, NO_REFERRER);
            if hsts {
                headers.insert(header::STRICT_TRANSPORT_SECURITY, HSTS);
            }
            let unchanged = if_none_match.is_some_and(|wanted| {
                response.status() == StatusCode::OK
                    && response
                        .headers()
                        .get(header::ETAG)
                        .is_some_and(|etag| etag_matches(wanted.as_bytes(), etag.as_bytes()))
            });
            let response = if unchanged {
                let (req, response) = response.into_parts();
                let mut not_modified = response.set_body(());
                *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
                // A 304 describes the representation by its validators and `Vary`, not its body.
                not_modified.headers_mut().remove(header::CONTENT_TYPE);
                not_modified.headers_mut().remove(header::CONTENT_ENCODING);
                ServiceResponse::new(req, not_modified).map_into_right_body()
            } else {
                response.map_into_left_body()
            };
            metrics.record(method, &response, started);
            Ok(response)
        })
    }
}

/// The client's `X-Request-Id` when it sends a sane one, else a new one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(&X_REQUEST_ID)
        .filter(|value| is_sane_request_id(value.as_bytes()))
        .cloned()
        .unwrap_or_else(new_request_id)
}

/// Whether `Cache-Control` carries `no-cache`.
pub fn asks_no_cache(headers: &HeaderMap) -> bool {
    headers
        .get(header::CACHE_CONTROL)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .split(',')
                .any(|directive| directive.trim().eq_ignore_ascii_case("no-cache"))
        })
}

fn is_sane_request_id(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= 128 && value.iter().all(|b| b.is_ascii_graphic())
}

/// A random UUID, formatted without going through `Display`.
fn new_request_id() -> HeaderValue {
    let mut buffer = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
    HeaderValue::from_str(id).expect("a UUID is a valid header value")
}

/// The method as a label: the standard ones by name, anything a client invents as `other`, so
/// that label values stay a fixed set.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The coding a cached read is sent in: brotli or gzip, whichever `Accept-Encoding` rates higher
/// (brotli on a tie: smaller), else the body as it is. `*` stands for codings not named. A client
/// that refuses `identity` still gets it when it accepts neither (RFC 9110 §12.5.3 allows that
/// over a 406). By hand rather than actix's `AcceptEncoding::negotiate`: that one allocates on
/// every request and breaks ties by list order, so browsers (`gzip, deflate, br`) would get gzip.
pub fn preferred_coding(headers: &HeaderMap) -> Coding {
    let Some(accept) = headers.get(header::ACCEPT_ENCODING) else {
        return Coding::Identity;
    };
    let (mut brotli, mut gzip, mut any) = (None, None, None);
    for item in accept.as_bytes().split(|b| *b == b',') {
        let mut parts = item.split(|b| *b == b';');
        let coding = parts.next().unwrap_or_default().trim_ascii();
        let quality = parts
            .find_map(|param| {
                let param = param.trim_ascii();
                let value = param.strip_prefix(b"q=").or_else(|| param.strip_prefix(b"Q="))?;
                Some(thousandths(value))
            })
            .unwrap_or(1000);
        if coding.eq_ignore_ascii_case(b"br") {
            brotli = Some(quality);
        } else if coding.eq_ignore_ascii_case(b"gzip") || coding.eq_ignore_ascii_case(b"x-gzip") {
            gzip = Some(quality);
        } else if coding == b"*" {
            any = Some(quality);
        }
    }
    let brotli = brotli.or(any).unwrap_or(0);
    let gzip = gzip.or(any).unwrap_or(0);
    if brotli > 0 && brotli >= gzip {
        Coding::Brotli
    } else if gzip > 0 {
        Coding::Gzip
    } else {
        Coding::Identity
    }
}

/// A qvalue (`0.5`, `1`, `0.125`) in thousandths; anything else counts as 0 (not acceptable).
fn thousandths(value: &[u8]) -> u16 {
    let (whole, fraction) = match value.iter().position(|b| *b == b'.') {
        Some(dot) => (&value[..dot], &value[dot + 1..]),
        None => (value, &b""[..]),
    };
    if fraction.len() > 3 || !fraction.iter().all(u8::is_ascii_digit) {
        return 0;
    }
    let mut parts = 0;
    for (i, digit) in fraction.iter().enumerate() {
        parts += u16::from(digit - b'0') * [100, 10, 1][i];
    }
    match whole {
        b"1" if parts == 0 => 1000,
        b"0" => parts,
        _ => 0,
    }
}

/// `If-None-Match` (a list of entity tags, or `*`) against our ETag, by weak comparison
/// (RFC 9110 §13.1.2).
pub fn etag_matches(if_none_match: &[u8], etag: &[u8]) -> bool {
    fn opaque(tag: &[u8]) -> &[u8] {
        tag.strip_prefix(b"W/").unwrap_or(tag)
    }
    let ours = opaque(etag);
    if_none_match
        .split(|b| *b == b',')
        .map(|tag| tag.trim_ascii())
        .any(|tag| tag == b"*" || opaque(tag) == ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coding(accept: Option<&'static str>) -> Coding {
        let mut headers = HeaderMap::new();
        if let Some(accept) = accept {
            headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(accept));
        }
        preferred_coding(&headers)
    }

    #[test]
    fn accept_encoding_picks_the_coding_the_client_rates_highest() {
        let cases = [
            (None, Coding::Identity),
            (Some(""), Coding::Identity),
            (Some("gzip, deflate, br, zstd"), Coding::Brotli),
            (Some("gzip"), Coding::Gzip),
            (Some("GZIP"), Coding::Gzip),
            (Some("br;q=0.5, gzip;q=0.8"), Coding::Gzip),
            (Some("gzip;q=0.5, br;q=0.5"), Coding::Brotli),
            (Some("br;q=0, gzip"), Coding::Gzip),
            (Some("gzip;q=0, br;q=0"), Coding::Identity),
            (Some("*"), Coding::Brotli),
            (Some("*;q=0.1, br;q=0"), Coding::Gzip),
            (Some("identity"), Coding::Identity),
            (Some("deflate, identity;q=0"), Coding::Identity),
            (Some("br;q=2"), Coding::Identity),
            (Some("br;q=0.0001"), Coding::Identity),
            (Some("br ; q=0.001"), Coding::Brotli),
            (Some("gzip;q=1.000"), Coding::Gzip),
        ];
        for (accept, expected) in cases {
            assert_eq!(coding(accept), expected, "Accept-Encoding: {accept:?}");
        }
    }
}
