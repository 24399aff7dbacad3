//! `RateLimit`: the middleware a route group is wrapped in (`scope.wrap(RateLimit::api())`).
//! It works out the identities, asks the `RateLimiter` once, answers 429 in the error envelope
//! with `Retry-After` when denied, and puts the RateLimit headers on every response.
//!
//! For `/api` the identity is the user behind a valid bearer token (kept in the request's
//! extensions, so `AuthUser` does not authenticate twice), else the client IP. For login and
//! register it is the client IP and the email of the JSON body (read here, then handed on).

use std::cell::OnceCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::rc::Rc;
use std::sync::Arc;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{forward_ready, Payload, Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::{HttpMessage, HttpRequest, ResponseError};
use bytes::{Bytes, BytesMut};
use futures_util::future::{ready, LocalBoxFuture, Ready};
use futures_util::StreamExt;
use shaku::HasComponent;
use smallvec::SmallVec;

use super::{Identity, RateLimiter, RouteGroup};
use crate::container::AppModule;
use crate::error::{AppError, BODY_LIMIT_BYTES};
use crate::modules::auth::extractor::{bearer_token, AuthUser, RefusedToken};
use crate::modules::auth::service::AuthService;

/// Wraps a scope or resource in the policies of a route group.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    group: RouteGroup,
}

impl RateLimit {
    /// The `/api` policy: per user, else per client IP.
    pub fn api() -> Self {
        Self { group: RouteGroup::Api }
    }

    /// Login and register: per client IP and per email, exact across instances.
    pub fn credentials() -> Self {
        Self {
            group: RouteGroup::Credentials,
        }
    }
}

impl<S, B> Transform<S, ServiceRequest> for RateLimit
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Transform = RateLimitMiddleware<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(RateLimitMiddleware {
            service: Rc::new(service),
            group: self.group,
            resolved: Rc::new(OnceCell::new()),
        }))
    }
}

pub struct RateLimitMiddleware<S> {
    service: Rc<S>,
    group: RouteGroup,
    /// The container's limiter and auth service, resolved once per worker: no shared `Arc`
    /// counts touched per request.
    resolved: Rc<OnceCell<Resolved>>,
}

struct Resolved {
    limiter: Arc<dyn RateLimiter>,
    auth: Arc<dyn AuthService>,
}

impl<S, B> Service<ServiceRequest> for RateLimitMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, mut req: ServiceRequest) -> Self::Future {
        if self.resolved.get().is_none() {
            if let Some(module) = req.app_data::<Arc<AppModule>>() {
                let _ = self.resolved.set(Resolved {
                    limiter: module.resolve(),
                    auth: module.resolve(),
                });
            }
        }
        let service = self.service.clone();
        let resolved = self.resolved.clone();
        let group = self.group;
        Box::pin(async move {
            let Some(Resolved { limiter, auth }) = resolved.get() else {
                return service.call(req).await.map(ServiceResponse::map_into_left_body);
            };
            // Login and register stay limited whatever the switch says.
            if group == RouteGroup::Api && !limiter.enabled() {
                return service.call(req).await.map(ServiceResponse::map_into_left_body);
            }
            let ip = |req: &ServiceRequest| Identity::Ip(client_ip(req.request(), limiter.trust_proxy_hops()));
            let mut identities: SmallVec<[Identity; 2]> = SmallVec::new();
            match group {
                RouteGroup::Api => {
                    let user = authenticated_user(&req, auth.as_ref()).await;
                    identities.push(user.unwrap_or_else(|| ip(&req)));
                }
                RouteGroup::Credentials => {
                    identities.push(ip(&req));
                    match body_email(&mut req).await {
                        Ok(Some(email)) => identities.push(email),
                        Ok(None) => {}
                        Err(err) => return Ok(req.error_response(err).map_into_right_body()),
                    }
                }
            }
            let decision = limiter.check(group, &identities).await;
            if !decision.allowed {
                let retry_after_secs = decision.retry_after_secs();
                let mut response = AppError::RateLimited { retry_after_secs }.error_response();
                limiter.headers(group, &decision, response.headers_mut());
                return Ok(req.into_response(response).map_into_right_body());
            }
            let mut response = service.call(req).await?;
            limiter.headers(group, &decision, response.headers_mut());
            Ok(response.map_into_left_body())
        })
    }
}

/// The user behind a valid bearer token, remembered for the `AuthUser` extractor (as is a
/// refused token, so it is not looked up twice).
async fn authenticated_user(req: &ServiceRequest, auth: &dyn AuthService) -> Option<Identity> {
    let token = bearer_token(req.request())?.to_owned();
    match auth.authenticate(&token).await {
        Ok(id) => {
            req.extensions_mut().insert(AuthUser { id, token });
            Some(Identity::User(id))
        }
        Err(AppError::Unauthorized { code, message }) => {
            req.extensions_mut().insert(RefusedToken { code, message });
            None
        }
        // Anything else (the database is down) the extractor meets again and answers.
        Err(_) => None,
    }
}

/// The `email` of a JSON body, if it has one; the body is handed on to the handler unchanged.
async fn body_email(req: &mut ServiceRequest) -> Result<Option<Identity>, AppError> {
    let mut payload = req.take_payload();
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|err| AppError::bad_request("invalid_body", err.to_string()))?;
        if body.len() + chunk.len() > BODY_LIMIT_BYTES {
            return Err(AppError::PayloadTooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    let body: Bytes = body.freeze();
    req.set_payload(Payload::from(body.clone()));
    #[derive(serde::Deserialize)]
    struct WithEmail {
        email: Option<serde_json::Value>,
    }
    let email = serde_json::from_slice::<WithEmail>(&body).ok().and_then(|b| b.email);
    Ok(match email {
        Some(serde_json::Value::String(email)) => Some(Identity::email(&email)),
        _ => None,
    })
}

/// The client's address: the TCP peer, unless `trusted_hops` proxies stand in front of the app;
/// then the address the outermost trusted proxy saw, from `X-Forwarded-For` (each proxy appends
/// the address it got the request from, so it is the `trusted_hops`-th entry from the right).
/// IPv6 clients count per /64, the block one host usually holds.
pub fn client_ip(req: &HttpRequest, trusted_hops: usize) -> IpAddr {
    let peer = req
        .peer_addr()
        .map(|addr| addr.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let client = if trusted_hops == 0 {
        peer
    } else {
        let entries: Vec<&str> = req
            .headers()
            .get_all("x-forwarded-for")
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect();
        entries
            .len()
            .checked_sub(trusted_hops)
            .and_then(|index| entries.get(index))
            .or(entries.first())
            .and_then(|entry| entry.parse().ok())
            .unwrap_or(peer)
    };
    normalize(client)
}

fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let segments = v6.segments();
                IpAddr::V6(Ipv6Addr::new(
                    segments[0],
                    segments[1],
                    segments[2],
                    segments[3],
                    0,
                    0,
                    0,
                    0,
                ))
            }
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn the_client_ip_is_the_peer_unless_proxy_hops_are_trusted() {
        let peer = "10.0.0.9:5000".parse().unwrap();
        let cases: [(&str, usize, &[&str], &str); 7] = [
            ("no proxy trusted: the header is ignored", 0, &["1.2.3.4"], "10.0.0.9"),
            ("one hop: the last entry", 1, &["6.6.6.6, 1.2.3.4"], "1.2.3.4"),
            (
                "two hops: the second from the right",
                2,
                &["6.6.6.6, 1.2.3.4, 10.0.0.1"],
                "1.2.3.4",
            ),
            (
                "several header lines are one list",
                2,
                &["6.6.6.6, 1.2.3.4", "10.0.0.1"],
                "1.2.3.4",
            ),
            ("fewer entries than hops: the first", 3, &["1.2.3.4"], "1.2.3.4"),
            ("garbage: the peer", 1, &["not an address"], "10.0.0.9"),
            ("IPv6 counts per /64", 1, &["2001:db8:1:2:aaaa::1"], "2001:db8:1:2::"),
        ];
        for (what, hops, header, expected) in cases {
            let mut request = TestRequest::default().peer_addr(peer);
            for line in header {
                request = request.append_header(("x-forwarded-for", *line));
            }
            let ip = client_ip(&request.to_http_request(), hops);
            assert_eq!(ip, expected.parse::<IpAddr>().unwrap(), "{what}");
        }
    }
}
