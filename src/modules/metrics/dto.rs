use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// At most 366 days, `from` ≤ `to`.
#[derive(Debug, Clone, Copy, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DailyMetricsQuery {
    /// First day, `YYYY-MM-DD` (UTC).
    #[param(value_type = String, format = Date, example = "2026-11-01")]
    pub from: NaiveDate,
    /// Last day, inclusive.
    #[param(value_type = String, format = Date, example = "2026-11-30")]
    pub to: NaiveDate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DailyMetric {
    #[schema(value_type = String, format = Date)]
    pub date: NaiveDate,
    pub created: i64,
    pub completed: i64,
    pub open_at_end_of_day: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DailyMetrics {
    pub workspace_id: Uuid,
    #[schema(value_type = String, format = Date)]
    pub from: NaiveDate,
    #[schema(value_type = String, format = Date)]
    pub to: NaiveDate,
    pub days: Vec<DailyMetric>,
}

/// What a rebuild wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsRebuild {
    pub workspace_id: Uuid,
    /// First day stored: the earliest day of a task (null when the workspace has none).
    #[schema(value_type = Option<String>, format = Date)]
    pub from: Option<NaiveDate>,
    /// Last day stored: today (UTC).
    #[schema(value_type = Option<String>, format = Date)]
    pub to: Option<NaiveDate>,
    /// Days stored.
    pub days: i64,
    /// The fencing token the rebuild wrote under: higher than every earlier rebuild's.
    pub fence: i64,
}
