use serde::Deserialize;
use utoipa::ToSchema;
use validator::Validate;

use crate::error::not_blank;

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateMeRequest {
    #[validate(length(min = 1, max = 100), custom(function = "not_blank"))]
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\u0000]*[^\u0000\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    )]
    #[schema(example = "Ada Lovelace")]
    pub name: String,
}
