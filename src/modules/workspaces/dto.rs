use serde::Deserialize;
use utoipa::ToSchema;
use validator::Validate;

use super::model::Role;
use crate::error::{no_nul, not_blank};

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateWorkspaceRequest {
    #[validate(length(min = 1, max = 100), custom(function = "not_blank"))]
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\u0000]*[^\u0000\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    )]
    #[schema(example = "Acme")]
    pub name: String,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateWorkspaceRequest {
    #[validate(length(min = 1, max = 100), custom(function = "not_blank"))]
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\u0000]*[^\u0000\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    )]
    pub name: String,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddMemberRequest {
    #[validate(length(min = 1, max = 254), custom(function = "no_nul"))]
    #[schema(min_length = 1, max_length = 254, pattern = r"^[^\u0000]*$")]
    #[schema(example = "grace@example.com")]
    pub email: String,
    /// Defaults to `member`.
    pub role: Option<Role>,
}
