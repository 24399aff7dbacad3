use serde::Deserialize;
use utoipa::ToSchema;
use validator::Validate;

use crate::error::not_blank;

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateMeRequest {
    #[validate(length(min = 1, max = 100), custom(function = "not_blank"))]
    #[schema(example = "Ada Lovelace")]
    pub name: String,
}
