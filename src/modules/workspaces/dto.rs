use serde::Deserialize;
use utoipa::ToSchema;
use validator::Validate;

use super::model::Role;
use crate::error::{no_nul, not_blank};

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateWorkspaceRequest {
    #[validate(length(min = 1, max = 100), custom(function = "not_blank"))]
    #[schema(example = "Acme")]
    pub name: String,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateWorkspaceRequest {
    #[validate(length(min = 1, max = 100), custom(function = "not_blank"))]
    pub name: String,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddMemberRequest {
    #[validate(length(min = 1, max = 254), custom(function = "no_nul"))]
    #[schema(example = "grace@example.com")]
    pub email: String,
    /// Defaults to `member`.
    pub role: Option<Role>,
}
