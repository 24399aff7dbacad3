//! `Idempotent`: wraps a resource whose POST or PATCH creates or changes something
//! (`resource(..).route(..).wrap(Idempotent)`). Requests without an `Idempotency-Key`, other
//! methods and unauthenticated requests pass through untouched.

use std::cell::OnceCell;
use std::rc::Rc;
use std::sync::Arc;

use actix_web::body::{to_bytes, BoxBody, MessageBody};
use actix_web::dev::{forward_ready, Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::header::CONTENT_TYPE;
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use futures_util::future::{ready, LocalBoxFuture, Ready};
use shaku::HasComponent;

use super::{fingerprint, key_of, Claim, IdempotencyStore, Recorded, HEADER, REPLAYED_HEADER};
use crate::container::AppModule;
use crate::error::{AppError, JsonObject};
use crate::infra::cache::{invalidating_after_commit, CacheService};
use crate::infra::caller::Caller;

/// The middleware (see the module header of `infra::idempotency`).
#[derive(Debug, Clone, Copy)]
pub struct Idempotent;

impl<S, B> Transform<S, ServiceRequest> for Idempotent
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<BoxBody>;
    type Error = actix_web::Error;
    type Transform = IdempotentMiddleware<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(IdempotentMiddleware {
            service: Rc::new(service),
            resolved: Rc::new(OnceCell::new()),
        }))
    }
}

pub struct IdempotentMiddleware<S> {
    service: Rc<S>,
    /// The container's components, resolved once per worker.
    resolved: Rc<OnceCell<Resolved>>,
}

struct Resolved {
    store: Arc<dyn IdempotencyStore>,
    caller: Arc<dyn Caller>,
    cache: Arc<dyn CacheService>,
}

impl<S, B> Service<ServiceRequest> for IdempotentMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<BoxBody>;
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, mut req: ServiceRequest) -> Self::Future {
        if self.resolved.get().is_none() {
            if let Some(module) = req.app_data::<Arc<AppModule>>() {
                let _ = self.resolved.set(Resolved {
                    store: module.resolve(),
                    caller: module.resolve(),
                    cache: module.resolve(),
                });
            }
        }
        let service = self.service.clone();
        let resolved = self.resolved.clone();
        Box::pin(async move {
            // Only on the writes the resource serves: any other method is answered 405 as without
            // a key.
            let applies = matches!(*req.method(), Method::POST | Method::PATCH)
                && req.headers().contains_key(HEADER)
                && req.match_pattern().is_some_and(|pattern| {
                    crate::openapi::allowed_methods(&pattern)
                        .split(", ")
                        .any(|method| method == req.method().as_str())
                });
            let (Some(Resolved { store, caller, cache }), true) = (resolved.get(), applies) else {
                return service.call(req).await.map(ServiceResponse::map_into_boxed_body);
            };
            let Some(user_id) = caller.user_id(req.request()).await else {
                return service.call(req).await.map(ServiceResponse::map_into_boxed_body);
            };
            let key = match key_of(req.request()) {
                Ok(Some(key)) => key,
                Ok(None) => return service.call(req).await.map(ServiceResponse::map_into_boxed_body),
                Err(err) => return Ok(req.error_response(err)),
            };
            // The body is read once, here, and handed on to the handler's `JsonBody`.
            let (request, payload) = req.parts_mut();
            let object = match JsonObject::parse(request, payload).await {
                Ok(object) => object,
                Err(err) => return Ok(req.error_response(err)),
            };
            let fingerprint = fingerprint(req.method().as_str(), req.path(), &object.0);
            object.hand_on(req.request());

            let claim = match store.claim(user_id, &key, fingerprint).await {
                Ok(Claim::Open(claim)) => claim,
                Ok(Claim::Replay(recorded)) => return Ok(req.into_response(replay(recorded))),
                Ok(Claim::Reused) => {
                    let reused = AppError::Unprocessable {
                        code: "idempotency_key_reused",
                        message: format!("this {HEADER} was used for another request (method, path or body)"),
                    };
                    return Ok(req.error_response(reused));
                }
                Ok(Claim::InFlight) => {
                    return Ok(req.error_response(AppError::IdempotencyKeyInFlight { retry_after_secs: 1 }))
                }
                Err(err) => return Ok(req.error_response(err)),
            };

            let (outcome, stale) = invalidating_after_commit(claim.transaction.scope(service.call(req))).await;
            // The writes' keys go again once the transaction has ended, whichever way: a read
            // made before the commit may have cached what the write replaced.
            let invalidate_again = || async {
                if !stale.is_empty() {
                    cache.invalidate(stale.clone()).await;
                }
            };
            let response = match outcome {
                Ok(response) if !response.status().is_server_error() => response,
                // A 5xx is not recorded: the transaction rolls back, and the key may be used again.
                other => {
                    store.abandon(claim).await;
                    invalidate_again().await;
                    return other.map(ServiceResponse::map_into_boxed_body);
                }
            };
            let (request, response) = response.into_parts();
            let (head, body) = response.into_parts();
            let body = match to_bytes(body).await {
                Ok(body) => body,
                Err(err) => {
                    store.abandon(claim).await;
                    invalidate_again().await;
                    let err: Box<dyn std::error::Error> = err.into();
                    let err = AppError::internal(err.to_string());
                    return Ok(ServiceResponse::new(request, err.error_response()));
                }
            };
            let answer = Recorded {
                status: head.status().as_u16(),
                content_type: head
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|value| value.to_str().ok())
                    .map(str::to_owned),
                body: body.clone(),
            };
            let committed = store.complete(claim, &answer).await;
            invalidate_again().await;
            let response = match committed {
                Ok(()) => head.set_body(body).map_into_boxed_body(),
                // Whether the commit landed is unknown: no answer claims success. A retry with
                // the key gets the recorded answer if it did, or runs afresh if it did not.
                Err(err) => err.error_response(),
            };
            Ok(ServiceResponse::new(request, response))
        })
    }
}

/// The recorded answer, as first sent, marked as a replay.
fn replay(recorded: Recorded) -> HttpResponse {
    let status = StatusCode::from_u16(recorded.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = HttpResponse::build(status);
    if let Some(content_type) = recorded.content_type {
        response.insert_header((CONTENT_TYPE, content_type));
    }
    response.insert_header((REPLAYED_HEADER, "true")).body(recorded.body)
}
