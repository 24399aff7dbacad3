use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;
use validator::Validate;

use crate::error::{no_nul, not_blank};

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegisterRequest {
    #[validate(email, length(max = 254))]
    #[schema(max_length = 254, format = Email)]
    #[schema(example = "ada@example.com")]
    pub email: String,
    #[validate(length(min = 8, max = 128), custom(function = "no_nul"))]
    #[schema(min_length = 8, max_length = 128, pattern = r"^[^\u0000]*$")]
    #[schema(example = "correct horse battery")]
    pub password: String,
    #[validate(length(min = 1, max = 100), custom(function = "not_blank"))]
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\u0000]*[^\u0000\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    )]
    #[schema(example = "Ada Lovelace")]
    pub name: String,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoginRequest {
    #[validate(length(min = 1, max = 254), custom(function = "no_nul"))]
    #[schema(min_length = 1, max_length = 254, pattern = r"^[^\u0000]*$")]
    #[schema(example = "demo@nestling.dev")]
    pub email: String,
    #[validate(length(min = 1, max = 128), custom(function = "no_nul"))]
    #[schema(min_length = 1, max_length = 128, pattern = r"^[^\u0000]*$")]
    #[schema(example = "demo-password")]
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoginResponse {
    /// Send as `Authorization: Bearer <token>`.
    pub token: String,
    #[schema(example = "Bearer")]
    pub token_type: String,
    pub expires_at: DateTime<Utc>,
}

/// One session: a token issued at login, until it expires or is ended.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionResponse {
    /// The session's public id (not the token, nor anything derived from it).
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    /// Written at most once a minute: up to a minute behind.
    pub last_used_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Whether this request was made with it.
    pub current: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EndSessionsQuery {
    /// `true`: this session too (the token of this request stops working).
    #[serde(default)]
    pub all: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndedSessions {
    /// Sessions ended.
    pub ended: u64,
}
