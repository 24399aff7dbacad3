use async_trait::async_trait;
use chrono::Utc;
use rand::RngCore;
use sha2::{Digest, Sha256};
use shaku::{Component, Interface};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

use super::dto::{LoginRequest, LoginResponse, RegisterRequest, SessionResponse};
use super::last_use::{LastUse, Writer};
use super::password::PasswordHasher;
use super::repository::TokenRepository;
use crate::error::{is_unique_violation, AppError, AppResult};
use crate::infra::cache::{CacheService, Derived};
use crate::infra::redis::keys::CacheKey;
use crate::modules::users::model::User;
use crate::modules::users::repository::{UserRepository, EMAIL_UNIQUE};

const INVALID_CREDENTIALS: AppError = AppError::Unauthorized {
    code: "invalid_credentials",
    message: "email or password is wrong",
};
const INVALID_TOKEN: AppError = AppError::Unauthorized {
    code: "invalid_token",
    message: "token is invalid or expired",
};

#[async_trait]
pub trait AuthService: Interface {
    async fn register(&self, request: RegisterRequest) -> AppResult<User>;
    async fn login(&self, request: LoginRequest) -> AppResult<LoginResponse>;
    async fn logout(&self, token: &str) -> AppResult<()>;
    /// The id of the user behind a bearer token; 401 when it is unknown or expired.
    async fn authenticate(&self, token: &str) -> AppResult<Uuid>;
    /// The user's live sessions, newest first; `current` marks the one of `token`.
    async fn sessions(&self, user_id: Uuid, token: &str) -> AppResult<Vec<SessionResponse>>;
    /// Ends one of the user's sessions on every instance; 404 for an unknown id or another user's.
    async fn end_session(&self, user_id: Uuid, id: Uuid) -> AppResult<()>;
    /// Ends every session of the user on every instance, but the one of `keep`; returns how many.
    async fn end_sessions(&self, user_id: Uuid, keep: Option<&str>) -> AppResult<u64>;
}

#[derive(Component)]
#[shaku(interface = AuthService)]
pub struct Auth {
    #[shaku(inject)]
    users: Arc<dyn UserRepository>,
    #[shaku(inject)]
    tokens: Arc<dyn TokenRepository>,
    #[shaku(inject)]
    cache: Arc<dyn CacheService>,
    #[shaku(inject)]
    passwords: Arc<dyn PasswordHasher>,
    token_ttl: Duration,
    /// Token SHA-256 → its session: every request authenticates, and this spares it the
    /// session's key and lookup. Logout ends it on every instance, as it ends the cache entry.
    #[shaku(default)]
    sessions: Derived<[u8; 32], Session>,
    /// `AUTH_TOKEN_SLIDING`: a token used in the last half of its life is extended.
    sliding: bool,
    #[shaku(default)]
    last_use: LastUse,
}

/// What the cache keeps for a token: whose it is and until when (Unix ms). Read on every request,
/// so it is 24 fixed-width bytes (user id, then big-endian expiry), not JSON.
#[derive(Clone)]
pub struct Session {
    user_id: Uuid,
    expires_at_ms: i64,
    /// Where this token's next write of its last use is timed (see `LastUse`); not cached.
    last_use_slot: u32,
}

impl Session {
    fn encode(user_id: Uuid, expires_at_ms: i64) -> bytes::Bytes {
        let mut bytes = Vec::with_capacity(24);
        bytes.extend_from_slice(user_id.as_bytes());
        bytes.extend_from_slice(&expires_at_ms.to_be_bytes());
        bytes.into()
    }

    fn decodes(bytes: &[u8]) -> bool {
        bytes.len() == 24
    }

    fn from_bytes(bytes: &[u8], last_use_slot: u32) -> AppResult<Self> {
        let (user_id, expires_at_ms) = bytes
            .split_first_chunk::<16>()
            .and_then(|(id, rest)| Some((Uuid::from_bytes(*id), i64::from_be_bytes(rest.try_into().ok()?))))
            .ok_or_else(|| AppError::internal(format!("cached session has {} bytes, not 24", bytes.len())))?;
        Ok(Self {
            user_id,
            expires_at_ms,
            last_use_slot,
        })
    }
}

/// Tokens are 32 random bytes, hex-encoded; only their SHA-256 is stored.
fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[async_trait]
impl AuthService for Auth {
    async fn register(&self, request: RegisterRequest) -> AppResult<User> {
        let email = request.email.trim().to_lowercase();
        let hash = self.passwords.hash(request.password).await?;
        self.users
            .create(&email, request.name.trim(), &hash)
            .await
            .map_err(|err| {
                if is_unique_violation(&err, EMAIL_UNIQUE) {
                    AppError::conflict("email_taken", "a user with this email already exists")
                } else {
                    err.into()
                }
            })
    }

    async fn login(&self, request: LoginRequest) -> AppResult<LoginResponse> {
        let credentials = self.users.find_credentials(request.email.trim()).await?;
        let (user_id, stored) = match credentials {
            Some((id, hash)) => (Some(id), Some(hash)),
            None => (None, None),
        };
        let valid = self.passwords.verify(request.password, stored).await?;
        let user_id = match (valid, user_id) {
            (true, Some(id)) => id,
            _ => return Err(INVALID_CREDENTIALS),
        };
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let token = hex::encode(bytes);
        let expires_at = Utc::now() + self.token_ttl;
        self.tokens.insert(&token_hash(&token), user_id, expires_at).await?;
        Ok(LoginResponse {
            token,
            token_type: "Bearer".into(),
            expires_at,
        })
    }

    async fn logout(&self, token: &str) -> AppResult<()> {
        let hash = token_hash(token);
        // Every instance drops it from L1 too: a revoked token stops working everywhere at once.
        let stale = vec![self.cache.keys().auth_token(&hash)];
        Ok(self
            .cache
            .write(stale, self.tokens.delete(&hash), |_| Vec::new())
            .await?)
    }

    async fn authenticate(&self, token: &str) -> AppResult<Uuid> {
        // Anything that is not 64 hex characters cannot be one of ours: skip the lookups.
        if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(INVALID_TOKEN);
        }
        let hash = token_hash(token);
        let session = match self.sessions.get(self.cache.as_ref(), &hash) {
            Some(session) => session,
            None => self.session(&hash).await?,
        };
        // The cache entry may outlive the token: its own expiry decides.
        let now_ms = Utc::now().timestamp_millis();
        if session.expires_at_ms <= now_ms {
            return Err(INVALID_TOKEN);
        }
        let slot = session.last_use_slot;
        self.last_use.used(&hash, slot, now_ms, || self.last_use_writer());
        Ok(session.user_id)
    }

    async fn sessions(&self, user_id: Uuid, token: &str) -> AppResult<Vec<SessionResponse>> {
        let current = token_hash(token);
        let stored = self.tokens.sessions(user_id).await?;
        Ok(stored
            .into_iter()
            .map(|session| SessionResponse {
                current: session.token_hash == current,
                id: session.id,
                created_at: session.created_at,
                last_used_at: session.last_used_at,
                expires_at: session.expires_at,
            })
            .collect())
    }

    async fn end_session(&self, user_id: Uuid, id: Uuid) -> AppResult<()> {
        // The key is known before the delete: should its outcome be unknown (a timeout while the
        // COMMIT is on the wire), the token is still dropped from every cache.
        let hash = self
            .tokens
            .session_hash(user_id, id)
            .await?
            .ok_or(AppError::not_found("session"))?;
        let stale = self.token_keys(&[hash]);
        let ended = self
            .cache
            .write(stale, self.tokens.delete_session(user_id, id), |_| Vec::new())
            .await?;
        ended.map(|_| ()).ok_or(AppError::not_found("session"))
    }

    async fn end_sessions(&self, user_id: Uuid, keep: Option<&str>) -> AppResult<u64> {
        let keep = keep.map(token_hash);
        let keep = keep.as_ref().map(|hash| hash.as_slice());
        let mut known = self.tokens.hashes(user_id).await?;
        known.retain(|hash| Some(hash.as_slice()) != keep);
        // Known before (see `end_session`), and what the delete returns: a login in between too.
        let ended = self
            .cache
            .write(
                self.token_keys(&known),
                self.tokens.delete_all(user_id, keep),
                |ended| self.token_keys(ended),
            )
            .await?;
        Ok(ended.len() as u64)
    }
}

impl Auth {
    fn last_use_writer(&self) -> Writer {
        Writer {
            tokens: self.tokens.clone(),
            cache: self.cache.clone(),
            extend_by: self.sliding.then_some(self.token_ttl),
        }
    }

    /// The cache keys of stored token hashes: every instance drops them, and the sessions
    /// derived from them, as logout does.
    fn token_keys(&self, hashes: &[Vec<u8>]) -> Vec<CacheKey> {
        hashes
            .iter()
            .filter_map(|hash| <[u8; 32]>::try_from(hash.as_slice()).ok())
            .map(|hash| self.cache.keys().auth_token(&hash))
            .collect()
    }

    /// The token's session from the cache (or Postgres), kept in `sessions`.
    async fn session(&self, hash: &[u8; 32]) -> AppResult<Session> {
        let key = self.cache.keys().auth_token(hash);
        let stamp = self.cache.stamp(&key);
        let load = async {
            let found = self.tokens.find_user(hash).await?;
            Ok(found.map(|(user_id, expires_at)| Session::encode(user_id, expires_at.timestamp_millis())))
        };
        let found = self.cache.get_or_load_found(key, Box::pin(load), Session::decodes);
        let bytes = found.await?.ok_or(INVALID_TOKEN)?.bytes;
        let session = Session::from_bytes(&bytes, self.last_use.slot(hash))?;
        self.sessions.keep(*hash, session.clone(), stamp);
        Ok(session)
    }
}
