//! `RateLimit`: the middleware a route group is wrapped in (`scope.wrap(RateLimit::api())`).
//! It works out the identities, asks the `RateLimiter` once, answers 429 in the error envelope
//! with `Retry-After` when denied, and puts the RateLimit headers on every response.
//!
//! For `/api` the identity is the user behind the request's credentials, as the `Caller` the
//! auth feature implements finds it (and leaves for the handler, which does not authenticate
//! twice), else the client IP. For login and
//! register it is the client IP and the email of the JSON body, parsed here once and handed on to
//! the handler (`JsonObject`), so both read the same email. A login or register that succeeds
//! gives its email token back (only failures count against an account), and an address an
//! account logged in from before is let through that account's email quota (README, "Rate
//! limiting": lockout without lockout-by-anyone).

use std::cell::OnceCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{forward_ready, Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::{HttpRequest, ResponseError};
use futures_util::future::{ready, LocalBoxFuture, Ready};
use ipnet::IpNet;
use shaku::HasComponent;
use smallvec::SmallVec;

use super::{Identity, RateLimiter, RouteGroup};
use crate::container::AppModule;
use crate::error::{AppError, JsonObject};
use crate::infra::caller::Caller;

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
    /// The container's limiter and caller, resolved once per worker: no shared `Arc`
    /// counts touched per request.
    resolved: Rc<OnceCell<Resolved>>,
}

struct Resolved {
    limiter: Arc<dyn RateLimiter>,
    caller: Arc<dyn Caller>,
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
                    caller: module.resolve(),
                });
            }
        }
        let service = self.service.clone();
        let resolved = self.resolved.clone();
        let group = self.group;
        Box::pin(async move {
            let Some(Resolved { limiter, caller }) = resolved.get() else {
                return service.call(req).await.map(ServiceResponse::map_into_left_body);
            };
            // Login and register stay limited whatever the switch says; their other methods are
            // answered 405 and read no body.
            if (group == RouteGroup::Api && !limiter.enabled())
                || (group == RouteGroup::Credentials && req.method() != actix_web::http::Method::POST)
            {
                return service.call(req).await.map(ServiceResponse::map_into_left_body);
            }
            let ip = |req: &ServiceRequest| Identity::Ip(client_ip(req.request(), limiter.trusted_proxies()));
            let mut identities: SmallVec<[Identity; 2]> = SmallVec::new();
            let mut email = None;
            match group {
                RouteGroup::Api => {
                    let user = caller.user_id(req.request()).await.map(Identity::User);
                    identities.push(user.unwrap_or_else(|| ip(&req)));
                }
                RouteGroup::Credentials => {
                    identities.push(ip(&req));
                    let (request, payload) = req.parts_mut();
                    let object = match JsonObject::parse(request, payload).await {
                        Ok(object) => object,
                        Err(err) => return Ok(req.error_response(err).map_into_right_body()),
                    };
                    email = object
                        .0
                        .get("email")
                        .and_then(serde_json::Value::as_str)
                        .map(Identity::email);
                    identities.extend(email);
                    object.hand_on(req.request());
                }
            }
            let mut decision = limiter.check(group, &identities).await;
            if let Some(email) = email.filter(|_| !decision.allowed) {
                // Strangers' failures do not lock the owner out: an address this account logged in
                // from before has the email quota to itself.
                if limiter.is_known_address(&email, &identities[0]).await {
                    identities[1] = Identity::email_at(&email, &identities[0]);
                    decision = limiter.check(group, &identities).await;
                }
            }
            if !decision.allowed {
                let retry_after_secs = decision.retry_after_secs();
                let mut response = AppError::RateLimited { retry_after_secs }.error_response();
                limiter.headers(group, &decision, response.headers_mut());
                return Ok(req.into_response(response).map_into_right_body());
            }
            let mut response = service.call(req).await?;
            if let Some(email) = email.filter(|_| response.status().is_success()) {
                // Only failures count against an account.
                limiter.give_back(group, &decision, &identities, 1).await;
                limiter.remember_address(&email, &identities[0]).await;
            }
            limiter.headers(group, &decision, response.headers_mut());
            Ok(response.map_into_left_body())
        })
    }
}

/// The client's address, found as Express's `trust proxy` list finds it: start from the TCP peer
/// and, while the address in hand is a trusted proxy, step to the entry that proxy appended to
/// `X-Forwarded-For` (right to left). The first address that is not trusted is the client (when
/// every entry is trusted, the leftmost). So an untrusted peer's header is never read, and what a
/// client wrote left of the entry a trusted proxy appended is never reached. An entry that is not
/// an address ends the walk at the proxy that passed it on. IPv6 clients count per /64, the block
/// one host usually holds.
pub fn client_ip(req: &HttpRequest, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|network| network.contains(ip));
    let mut client = req
        .peer_addr()
        .map(|addr| unmapped(addr.ip()))
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    if is_trusted(&client) {
        let lines: SmallVec<[Option<&str>; 2]> = req
            .headers()
            .get_all("x-forwarded-for")
            .map(|value| value.to_str().ok())
            .collect();
        // Header lines are one list, in order; a line that is not text ends the walk too.
        let entries = lines
            .into_iter()
            .rev()
            .map_while(|line| line)
            .flat_map(|line| line.rsplit(','));
        for entry in entries {
            let entry = entry.trim();
            let hop = entry
                .parse::<IpAddr>()
                .or_else(|_| entry.parse::<SocketAddr>().map(|addr| addr.ip()));
            let Ok(hop) = hop else { break };
            client = unmapped(hop);
            if !is_trusted(&client) {
                break;
            }
        }
    }
    normalize(client)
}

/// An IPv4 client reaching an IPv6 socket shows as `::ffff:a.b.c.d`: it is that IPv4 address.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
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
    fn the_client_ip_is_the_first_untrusted_address_walking_back_from_the_peer() {
        const PEER: &str = "10.0.0.9:5000";
        // (what, TRUST_PROXY, peer, X-Forwarded-For lines, client)
        let cases: &[(&str, &str, &str, &[&str], &str)] = &[
            (
                "nothing trusted: the header is ignored",
                "",
                PEER,
                &["1.2.3.4"],
                "10.0.0.9",
            ),
            (
                "an untrusted peer: its header is ignored",
                "10.1.0.0/16, 127.0.0.1",
                PEER,
                &["1.2.3.4"],
                "10.0.0.9",
            ),
            (
                "a trusted peer: the entry it appended",
                "10.0.0.0/8",
                PEER,
                &["6.6.6.6, 1.2.3.4"],
                "1.2.3.4",
            ),
            ("one trusted address", "10.0.0.9", PEER, &["1.2.3.4"], "1.2.3.4"),
            (
                "trusted hops are skipped from the right",
                "10.0.0.0/8",
                PEER,
                &["6.6.6.6, 1.2.3.4, 10.0.0.1"],
                "1.2.3.4",
            ),
            (
                "a trusted address the client wrote left of itself is never reached",
                "10.0.0.0/8",
                PEER,
                &["10.0.0.5, 1.2.3.4"],
                "1.2.3.4",
            ),
            (
                "several header lines are one list",
                "10.0.0.0/8",
                PEER,
                &["6.6.6.6, 1.2.3.4", "10.0.0.1"],
                "1.2.3.4",
            ),
            (
                "every entry trusted: the leftmost",
                "10.0.0.0/8",
                PEER,
                &["10.0.0.2, 10.0.0.1"],
                "10.0.0.2",
            ),
            (
                "a trusted peer without the header: the peer",
                "10.0.0.0/8",
                PEER,
                &[],
                "10.0.0.9",
            ),
            (
                "garbage: the proxy that passed it on",
                "10.0.0.0/8",
                PEER,
                &["1.2.3.4, not an address"],
                "10.0.0.9",
            ),
            (
                "garbage further left: the trusted hop right of it",
                "10.0.0.0/8",
                PEER,
                &["1.2.3.4, garbage, 10.0.0.1"],
                "10.0.0.1",
            ),
            ("an entry with a port", "10.0.0.0/8", PEER, &["1.2.3.4:5678"], "1.2.3.4"),
            (
                "IPv6 counts per /64",
                "10.0.0.0/8",
                PEER,
                &["[2001:db8:1:2:aaaa::1]:443"],
                "2001:db8:1:2::",
            ),
            (
                "an IPv4 peer on an IPv6 socket is its IPv4 address",
                "10.0.0.0/8",
                "[::ffff:10.0.0.9]:5000",
                &["1.2.3.4"],
                "1.2.3.4",
            ),
            (
                "an IPv6 proxy",
                "fd00::/8",
                "[fd00::2]:5000",
                &["2001:db8::7"],
                "2001:db8::",
            ),
        ];
        for (what, trusted, peer, header, expected) in cases {
            let trusted: Vec<IpNet> = trusted
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| {
                    item.parse()
                        .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                        .unwrap()
                })
                .collect();
            let mut request = TestRequest::default().peer_addr(peer.parse().unwrap());
            for line in *header {
                request = request.append_header(("x-forwarded-for", *line));
            }
            let ip = client_ip(&request.to_http_request(), &trusted);
            assert_eq!(ip, expected.parse::<IpAddr>().unwrap(), "{what}");
        }
    }
}
