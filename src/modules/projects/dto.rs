use serde::Deserialize;
use utoipa::ToSchema;
use validator::Validate;

use crate::error::{no_nul, not_blank};
use crate::modules::nullable;

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateProjectRequest {
    #[validate(length(min = 1, max = 200), custom(function = "not_blank"))]
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000]*[^\u0000\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    )]
    #[schema(example = "Website relaunch")]
    pub name: String,
    #[validate(length(max = 5000), custom(function = "no_nul"))]
    #[schema(max_length = 5000, pattern = r"^[^\u0000]*$")]
    pub description: Option<String>,
}

/// Absent fields stay as they are; `"description": null` clears the description.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateProjectRequest {
    #[validate(length(min = 1, max = 200), custom(function = "not_blank"))]
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000]*[^\u0000\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    )]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "nullable::deserialize")]
    #[validate(length(max = 5000), custom(function = "no_nul"))]
    #[schema(max_length = 5000, pattern = r"^[^\u0000]*$")]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
}
