//! `Cors`: what browsers need to call the API from pages on other origins, with actix-cors.
//! Mounted app-wide inside `Edge` (its answers carry the request id and the security headers)
//! and outside every scope, so a preflight is answered before authentication and rate limiting
//! and costs no token. Refusals use the error envelope.
//!
//! Off (no `CORS_ALLOWED_ORIGINS`, the default), responses carry no CORS headers, so browsers
//! refuse other origins, and every preflight is refused here: a request then costs one method
//! comparison and no boxed future.

use actix_cors::{CorsError, CorsMiddleware};
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::header::{self, HeaderName};
use actix_web::http::Method;
use actix_web::ResponseError;
use futures_util::future::{ready, Either, LocalBoxFuture, Ready};
use futures_util::{FutureExt, TryFutureExt};

use crate::config::CorsSettings;
use crate::error::AppError;
use crate::infra::edge::X_REQUEST_ID;

/// The methods the API's routes answer to.
const METHODS: [Method; 4] = [Method::GET, Method::POST, Method::PATCH, Method::DELETE];

/// The request headers the app reads. (`Idempotency-Key` is not among them: nothing reads it.)
const REQUEST_HEADERS: [HeaderName; 6] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::IF_NONE_MATCH,
    // `no-cache` reads past the cache (see `edge`).
    header::CACHE_CONTROL,
    X_REQUEST_ID,
    // Allowed ahead of the idempotency keys of writes, so browsers need no new CORS policy then.
    HeaderName::from_static("idempotency-key"),
];

/// The response headers a page may read besides the safelisted ones: the rate limit's, the
/// cache's, and the request id to quote in a bug report.
const EXPOSED_HEADERS: [HeaderName; 10] = [
    HeaderName::from_static("ratelimit"),
    HeaderName::from_static("ratelimit-policy"),
    HeaderName::from_static("x-ratelimit-limit"),
    HeaderName::from_static("x-ratelimit-remaining"),
    HeaderName::from_static("x-ratelimit-reset"),
    header::RETRY_AFTER,
    header::ETAG,
    HeaderName::from_static("cache-status"),
    HeaderName::from_static("x-cache"),
    X_REQUEST_ID,
];

/// The CORS policy of `CorsSettings`. Built per worker (actix-cors is not `Send`).
pub struct Cors {
    policy: Option<actix_cors::Cors>,
}

impl Cors {
    pub fn new(settings: &CorsSettings) -> Self {
        if !settings.enabled() {
            return Self { policy: None };
        }
        let mut policy = actix_cors::Cors::default()
            .allowed_methods(METHODS)
            .allowed_headers(REQUEST_HEADERS)
            .expose_headers(EXPOSED_HEADERS)
            .max_age(settings.max_age.as_secs() as usize);
        if settings.any_origin {
            policy = policy.allow_any_origin().send_wildcard();
        }
        for origin in &settings.allowed_origins {
            policy = policy.allowed_origin(origin);
        }
        if settings.allow_credentials {
            policy = policy.supports_credentials();
        }
        Self { policy: Some(policy) }
    }
}

impl<S, B> Transform<S, ServiceRequest> for Cors
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Transform = CorsService<S>;
    type InitError = ();
    type Future = LocalBoxFuture<'static, Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        match &self.policy {
            None => ready(Ok(CorsService::Off(service))).boxed_local(),
            Some(policy) => policy.new_transform(service).map_ok(CorsService::On).boxed_local(),
        }
    }
}

/// On: actix-cors (its answers' refusals put in the envelope). Off: straight through, without
/// a boxed future of its own, but for preflights, which are refused.
pub enum CorsService<S> {
    On(CorsMiddleware<S>),
    Off(S),
}

type Answer<B> = Result<ServiceResponse<EitherBody<B>>, actix_web::Error>;
type Mapped<B> = fn(ServiceResponse<EitherBody<B>>) -> ServiceResponse<EitherBody<B>>;
type Passed<B> = fn(ServiceResponse<B>) -> ServiceResponse<EitherBody<B>>;

impl<S, B> Service<ServiceRequest> for CorsService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Future = Either<
        futures_util::future::MapOk<LocalBoxFuture<'static, Answer<B>>, Mapped<B>>,
        Either<Ready<Answer<B>>, futures_util::future::MapOk<S::Future, Passed<B>>>,
    >;

    fn poll_ready(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        match self {
            Self::On(service) => service.poll_ready(cx),
            Self::Off(service) => service.poll_ready(cx),
        }
    }

    fn call(&self, req: ServiceRequest) -> Self::Future {
        match self {
            Self::On(service) => Either::Left(service.call(req).map_ok(in_envelope::<B> as Mapped<B>)),
            Self::Off(_) if is_preflight(&req) => {
                let refused = req.error_response(refusal(&CorsError::OriginNotAllowed));
                Either::Right(Either::Left(ready(Ok(refused.map_into_right_body()))))
            }
            Self::Off(service) => Either::Right(Either::Right(
                service
                    .call(req)
                    .map_ok(ServiceResponse::map_into_left_body as Passed<B>),
            )),
        }
    }
}

/// `OPTIONS` with `Access-Control-Request-Method`, as actix-cors tells a preflight.
fn is_preflight(req: &ServiceRequest) -> bool {
    req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// actix-cors answers a refused preflight in plain text: the envelope instead.
fn in_envelope<B>(response: ServiceResponse<EitherBody<B>>) -> ServiceResponse<EitherBody<B>> {
    let refused = response.response().error().and_then(|err| err.as_error::<CorsError>());
    match refused.map(refusal) {
        None => response,
        Some(err) => {
            let (req, _) = response.into_parts();
            ServiceResponse::new(req, err.error_response()).map_into_right_body()
        }
    }
}

fn refusal(err: &CorsError) -> AppError {
    let code = match err {
        CorsError::OriginNotAllowed => "cors_origin_not_allowed",
        CorsError::MethodNotAllowed => "cors_method_not_allowed",
        CorsError::HeadersNotAllowed => "cors_headers_not_allowed",
        _ => "cors_invalid_preflight",
    };
    let message = match err {
        CorsError::OriginNotAllowed => "this origin may not call the API from a browser".to_owned(),
        other => other.to_string(),
    };
    AppError::bad_request(code, message)
}
