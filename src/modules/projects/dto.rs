use serde::Deserialize;
use utoipa::ToSchema;
use validator::Validate;

use crate::error::{no_nul, not_blank};
use crate::modules::nullable;

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateProjectRequest {
    #[validate(length(min = 1, max = 200), custom(function = "not_blank"))]
    #[schema(example = "Website relaunch")]
    pub name: String,
    #[validate(length(max = 5000), custom(function = "no_nul"))]
    pub description: Option<String>,
}

/// Absent fields stay as they are; `"description": null` clears the description.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateProjectRequest {
    #[validate(length(min = 1, max = 200), custom(function = "not_blank"))]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "nullable::deserialize")]
    #[validate(length(max = 5000), custom(function = "no_nul"))]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
}
