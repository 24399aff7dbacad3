//! `Idempotency-Key` (draft-ietf-httpapi-idempotency-key-header) on the writes wrapped in
//! `Idempotent`: a client may send a POST or PATCH again, after a timeout or a dropped
//! connection, and the write happens once.
//!
//! How (Stripe's design, Postgres only): the request runs in one Postgres transaction that the
//! middleware opens (`infra::database::transaction`), under a transaction-scoped advisory lock
//! on (user, key). Repository writes join that transaction, and the answer (status, Content-Type,
//! body) is inserted into `idempotency_keys` in it after the handler has serialised it; then it
//! commits. So the domain rows and the record of the answer commit together or not at all.
//!
//! Guarantees, per (user, key), for writes that go through `Database::writer`/`begin`:
//! - exactly one effect: a duplicate while the first is running gets `409`
//!   `idempotency_key_in_flight` with `Retry-After` (the lock is held); one after its commit gets
//!   the recorded answer byte for byte, with `Idempotent-Replayed: true`, on any instance;
//! - the same key with another method, path or body gets `422` `idempotency_key_reused`;
//! - a request that answered `5xx`, or whose commit failed, or whose process died, left nothing:
//!   its transaction rolled back (Postgres drops the lock with the connection), so the key can be
//!   retried. Answers below 500 are recorded and replayed, errors included;
//! - records live `IDEMPOTENCY_TTL` (24 h by default); older ones are ignored, overwritten, and
//!   pruned (at most 1,000 rows a minute per instance, after a recorded answer).
//!
//! Not guaranteed: effects outside Postgres (cache invalidations run again after the commit;
//! e-mails or calls to other services would run again after a rollback); writes that bypass
//! `Database::writer`/`begin` (they commit on their own). Without a key, nothing changes.
//! Each request with a key holds a pooled connection until it answers, so at most half the pool
//! serves such requests at once (the reads they make need the other half); one that waits
//! longer than `DATABASE_ACQUIRE_TIMEOUT_MS` for its turn answers `503` `server_busy`.

mod middleware;
mod store;

pub use middleware::Idempotent;
pub use store::{Claim, IdempotencyStore, OpenClaim, PgIdempotencyStore, PgIdempotencyStoreParameters, Recorded};

use actix_web::HttpRequest;

use crate::error::AppError;

/// The request header.
pub const HEADER: &str = "Idempotency-Key";
/// The header a replayed answer carries.
pub const REPLAYED_HEADER: &str = "Idempotent-Replayed";
/// Longest key accepted.
pub const MAX_KEY_LENGTH: usize = 255;

/// The key from the header: 1 to 255 printable ASCII characters, else `400`
/// `invalid_idempotency_key`. `None` when the header is absent.
pub fn key_of(req: &HttpRequest) -> Result<Option<String>, AppError> {
    let mut values = req.headers().get_all(HEADER);
    let Some(value) = values.next() else { return Ok(None) };
    let invalid = |why: &str| {
        AppError::bad_request(
            "invalid_idempotency_key",
            format!("{HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters{why}"),
        )
    };
    if values.next().is_some() {
        return Err(invalid(", sent once"));
    }
    let key = value.as_bytes();
    if key.is_empty() || key.len() > MAX_KEY_LENGTH || !key.iter().all(|b| (b' '..=b'~').contains(b)) {
        return Err(invalid(""));
    }
    Ok(Some(String::from_utf8_lossy(key).into_owned()))
}

/// What makes two requests "the same": method, path and the body as parsed (keys sorted, so
/// spacing and key order do not matter), hashed.
pub fn fingerprint(method: &str, path: &str, body: &serde_json::Map<String, serde_json::Value>) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(method.as_bytes());
    hash.update([0]);
    hash.update(path.as_bytes());
    hash.update([0]);
    // serde_json's map is ordered by key: this is a canonical form of the object.
    hash.update(serde_json::to_vec(body).unwrap_or_default());
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn keys_are_one_to_255_printable_ascii_characters() {
        let long = "k".repeat(MAX_KEY_LENGTH);
        let too_long = "k".repeat(MAX_KEY_LENGTH + 1);
        // (what, header value, accepted)
        let cases: &[(&str, &[u8], bool)] = &[
            ("a UUID", b"0b6f3c9e-6d1a-4c1e-9a51-0f0c7c3f1e2a", true),
            ("punctuation and inner spaces", b"order 42/retry#1~", true),
            ("255 characters", long.as_bytes(), true),
            ("256 characters", too_long.as_bytes(), false),
            ("empty", b"", false),
            ("a tab", b"a\tb", false),
            ("non-ASCII bytes", "clé".as_bytes(), false),
        ];
        for (what, value, accepted) in cases {
            let value = actix_web::http::header::HeaderValue::from_bytes(value).unwrap();
            let req = TestRequest::default().insert_header((HEADER, value)).to_http_request();
            assert_eq!(key_of(&req).is_ok(), *accepted, "{what}");
        }
        let twice = TestRequest::default()
            .append_header((HEADER, "a"))
            .append_header((HEADER, "a"))
            .to_http_request();
        assert!(key_of(&twice).is_err(), "sent twice");
        assert!(
            matches!(key_of(&TestRequest::default().to_http_request()), Ok(None)),
            "absent"
        );
    }

    #[test]
    fn the_fingerprint_ignores_key_order_but_not_values_method_or_path() {
        let object = |json: &str| serde_json::from_str::<serde_json::Map<_, _>>(json).unwrap();
        let base = fingerprint("POST", "/api/workspaces", &object(r#"{"a":1,"b":"x"}"#));
        assert_eq!(
            base,
            fingerprint("POST", "/api/workspaces", &object(r#"{ "b": "x", "a": 1 }"#))
        );
        assert_ne!(
            base,
            fingerprint("POST", "/api/workspaces", &object(r#"{"a":2,"b":"x"}"#))
        );
        assert_ne!(
            base,
            fingerprint("PATCH", "/api/workspaces", &object(r#"{"a":1,"b":"x"}"#))
        );
        assert_ne!(
            base,
            fingerprint("POST", "/api/workspace", &object(r#"{"a":1,"b":"x"}"#))
        );
    }
}
