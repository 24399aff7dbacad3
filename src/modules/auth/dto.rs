use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use validator::Validate;

use crate::error::{no_nul, not_blank};

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegisterRequest {
    #[validate(email, length(max = 254))]
    #[schema(example = "ada@example.com")]
    pub email: String,
    #[validate(length(min = 8, max = 128), custom(function = "no_nul"))]
    #[schema(example = "correct horse battery")]
    pub password: String,
    #[validate(length(min = 1, max = 100), custom(function = "not_blank"))]
    #[schema(example = "Ada Lovelace")]
    pub name: String,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoginRequest {
    #[validate(length(min = 1, max = 254), custom(function = "no_nul"))]
    #[schema(example = "demo@nestling.dev")]
    pub email: String,
    #[validate(length(min = 1, max = 128), custom(function = "no_nul"))]
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
