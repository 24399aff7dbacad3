//! The one error type, `AppError`, and the JSON envelope every error path answers with
//! (NestJS-compatible keys plus a stable `code`), including extractor and routing failures.

use std::collections::BTreeMap;

use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

pub type AppResult<T> = Result<T, AppError>;

impl From<crate::infra::jobs::JobError> for AppError {
    fn from(err: crate::infra::jobs::JobError) -> Self {
        match err {
            crate::infra::jobs::JobError::Database(err) => err.into(),
            other => AppError::internal(other.to_string()),
        }
    }
}

/// Request bodies larger than this are refused with 413.
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("validation failed")]
    Validation(BTreeMap<String, Vec<String>>),
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{message}")]
    Unauthorized { code: &'static str, message: &'static str },
    #[error("{0}")]
    Forbidden(&'static str),
    /// `entity` names what was not found; it becomes the code `<entity>_not_found`.
    #[error("{entity} not found")]
    NotFound { entity: &'static str },
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// An `Idempotency-Key` whose first request is still being answered.
    #[error("a request with this Idempotency-Key is still in progress: retry in {retry_after_secs} s")]
    IdempotencyKeyInFlight { retry_after_secs: u64 },
    /// 422: well-formed, but cannot be processed as sent (an `Idempotency-Key` reused with
    /// another request).
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    #[error("this path does not accept the {method} method")]
    MethodNotAllowed {
        method: actix_web::http::Method,
        /// The `Allow` header: the path's methods, as the OpenAPI document lists them.
        allow: &'static str,
    },
    #[error("request body is larger than {BODY_LIMIT_BYTES} bytes")]
    PayloadTooLarge,
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("too many requests: retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("the server is busy: retry in {retry_after_secs} s")]
    ServiceBusy { retry_after_secs: u64 },
    /// Something with a fleet-wide cap on how many may run at once is at its cap (429).
    #[error("{message}: retry in {retry_after_secs} s")]
    AtCapacity {
        code: &'static str,
        message: &'static str,
        retry_after_secs: u64,
    },
    /// The store of locks and semaphores did not answer: nothing was done (503).
    #[error("locks are unavailable")]
    LocksUnavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("database unavailable")]
    DatabaseUnavailable(#[source] sqlx::Error),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The envelope of every error response.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    #[schema(example = 404)]
    pub status_code: u16,
    #[schema(example = "Not Found")]
    pub error: String,
    #[schema(example = "task not found")]
    pub message: String,
    #[schema(example = "task_not_found")]
    pub code: String,
    /// Field → messages for validation failures; null otherwise.
    #[schema(value_type = Option<Object>)]
    pub details: Option<BTreeMap<String, Vec<String>>>,
}

impl AppError {
    pub fn not_found(entity: &'static str) -> Self {
        Self::NotFound { entity }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::Conflict {
            code,
            message: message.into(),
        }
    }

    pub fn internal(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Internal(err.into())
    }

    /// One field, one message: for rules that need the database (e.g. "assignee is not a member").
    pub fn invalid_field(field: &str, message: &str) -> Self {
        Self::Validation(BTreeMap::from([(field.to_owned(), vec![message.to_owned()])]))
    }

    pub fn code(&self) -> String {
        match self {
            Self::Validation(_) => "validation_failed".into(),
            Self::BadRequest { code, .. }
            | Self::Unauthorized { code, .. }
            | Self::Conflict { code, .. }
            | Self::Unprocessable { code, .. }
            | Self::AtCapacity { code, .. } => (*code).into(),
            Self::IdempotencyKeyInFlight { .. } => "idempotency_key_in_flight".into(),
            Self::Forbidden(_) => "forbidden".into(),
            Self::NotFound { entity } => format!("{entity}_not_found"),
            Self::MethodNotAllowed { .. } => "method_not_allowed".into(),
            Self::PayloadTooLarge => "payload_too_large".into(),
            Self::UnsupportedMediaType(_) => "unsupported_media_type".into(),
            Self::RateLimited { .. } => "rate_limited".into(),
            Self::ServiceBusy { .. } => "server_busy".into(),
            Self::LocksUnavailable(_) => "locks_unavailable".into(),
            Self::DatabaseUnavailable(_) => "database_unavailable".into(),
            Self::Internal(_) => "internal_error".into(),
        }
    }

    pub fn body(&self) -> ErrorBody {
        let status = self.status_code();
        let details = match self {
            Self::Validation(fields) => Some(fields.clone()),
            _ => None,
        };
        ErrorBody {
            status_code: status.as_u16(),
            error: status.canonical_reason().unwrap_or("Error").to_owned(),
            // 5xx messages are generic by construction: the variants' Display never includes the cause.
            message: self.to_string(),
            code: self.code(),
            details,
        }
    }
}

impl ResponseError for AppError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Validation(_) | Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::Conflict { .. } | Self::IdempotencyKeyInFlight { .. } => StatusCode::CONFLICT,
            Self::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RateLimited { .. } | Self::AtCapacity { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::ServiceBusy { .. } | Self::DatabaseUnavailable(_) | Self::LocksUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if self.status_code().is_server_error() {
            log::error!("{}: {}", self.code(), error_chain(self));
        }
        let mut response = HttpResponse::build(self.status_code());
        if let Self::Unauthorized { .. } = self {
            response.insert_header(("WWW-Authenticate", "Bearer"));
        }
        match self {
            Self::RateLimited { retry_after_secs }
            | Self::ServiceBusy { retry_after_secs }
            | Self::IdempotencyKeyInFlight { retry_after_secs }
            | Self::AtCapacity { retry_after_secs, .. } => {
                response.insert_header(("Retry-After", retry_after_secs.to_string()));
            }
            Self::DatabaseUnavailable(_) | Self::LocksUnavailable(_) => {
                response.insert_header(("Retry-After", "1"));
            }
            Self::MethodNotAllowed { allow, .. } => {
                response.insert_header(("Allow", *allow));
            }
            _ => {}
        }
        response.json(self.body())
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl From<sqlx::Error> for AppError {
    fn from(err: sqlx::Error) -> Self {
        use sqlx::Error::*;
        match &err {
            PoolTimedOut | PoolClosed | Io(_) | Tls(_) | Protocol(_) | WorkerCrashed => Self::DatabaseUnavailable(err),
            Database(db) => match db.code().as_deref() {
                // Strings with characters Postgres cannot store (NUL) are the client's fault.
                Some("22021" | "22P05") => {
                    Self::bad_request("invalid_text", "text contains characters that cannot be stored")
                }
                // A date the parser accepts but Postgres cannot store (e.g. year -4800).
                Some("22008") => Self::bad_request("invalid_date", "date is outside the supported range"),
                // Cannot connect / shutting down / too many connections / the server cancelled the
                // statement (its statement_timeout, pg_cancel_backend).
                Some(code)
                    if code.starts_with("08") || code.starts_with("57P") || code == "53300" || code == "57014" =>
                {
                    Self::DatabaseUnavailable(err)
                }
                // A row referenced by the write went away meanwhile (a project deleted while a task
                // is created in it): what is missing is a 404, the same the write would get later.
                Some("23503") => Self::NotFound {
                    entity: referenced_entity(db.constraint()),
                },
                _ => Self::Internal(err.into()),
            },
            _ => Self::Internal(err.into()),
        }
    }
}

impl From<validator::ValidationErrors> for AppError {
    fn from(errors: validator::ValidationErrors) -> Self {
        let mut fields = BTreeMap::new();
        for (field, errs) in errors.field_errors() {
            let messages = errs
                .iter()
                .map(|e| e.message.as_ref().map(|m| m.to_string()).unwrap_or_else(|| describe(e)))
                .collect();
            fields.insert(camel_case(&field), messages);
        }
        Self::Validation(fields)
    }
}

fn describe(error: &validator::ValidationError) -> String {
    let param = |name: &str| error.params.get(name).map(|v| v.to_string());
    match error.code.as_ref() {
        "length" => match (param("min"), param("max")) {
            (Some(min), Some(max)) => format!("must be between {min} and {max} characters"),
            (Some(min), None) => format!("must be at least {min} characters"),
            (None, Some(max)) => format!("must be at most {max} characters"),
            _ => "has an invalid length".into(),
        },
        "range" => match (param("min"), param("max")) {
            (Some(min), Some(max)) => format!("must be between {min} and {max}"),
            _ => "is out of range".into(),
        },
        "email" => "must be a valid email address".into(),
        other => other.replace('_', " "),
    }
}

/// `assignee_id` → `assigneeId`: the field names clients see.
pub fn camel_case(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Validator rule for required names and titles: whitespace alone is not a name (we store trimmed text).
pub fn not_blank(value: &str) -> Result<(), validator::ValidationError> {
    no_nul(value)?;
    if value.trim().is_empty() {
        return Err(validator::ValidationError::new("blank").with_message("must not be blank".into()));
    }
    Ok(())
}

/// Validator rule for every free-text field: Postgres cannot store NUL, so it is a 400, not a 500.
pub fn no_nul(value: &str) -> Result<(), validator::ValidationError> {
    if value.contains('\0') {
        return Err(validator::ValidationError::new("nul").with_message("must not contain NUL characters".into()));
    }
    Ok(())
}

/// Extractor configuration: malformed bodies, paths and queries answer with the envelope too.
pub fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(BODY_LIMIT_BYTES)
        .error_handler(|err, _req: &HttpRequest| json_error(err).into())
}

/// A JSON request body that must be an object. `web::Json<T>` alone would also read a struct
/// from an array (serde accepts both forms), so `["x"]` would be a valid workspace.
pub struct JsonBody<T>(pub T);

impl<T> JsonBody<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for JsonBody<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: serde::de::DeserializeOwned + 'static> actix_web::FromRequest for JsonBody<T> {
    type Error = actix_web::Error;
    type Future = futures_util::future::LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        use actix_web::HttpMessage;
        let handed_on = req.extensions_mut().remove::<JsonObject>();
        let parse = handed_on.is_none().then(|| JsonObject::parse(req, payload));
        Box::pin(async move {
            let object = match (handed_on, parse) {
                (Some(object), _) => object,
                (None, Some(parse)) => parse.await?,
                (None, None) => unreachable!("parsed when not handed on"),
            };
            serde_json::from_value(serde_json::Value::Object(object.0))
                .map(JsonBody)
                .map_err(|err| AppError::bad_request("invalid_body", err.to_string()).into())
        })
    }
}

/// The request's JSON object, read once: decompressed, size- and type-checked (`json_config`),
/// and refused when a key repeats. A middleware that needs the body (the login limit reads the
/// email) parses it and hands it on in the request's extensions, where `JsonBody` takes it: the
/// limiter and the handler read the same object, never two readings of the same bytes.
pub struct JsonObject(pub serde_json::Map<String, serde_json::Value>);

impl JsonObject {
    pub fn parse(
        req: &HttpRequest,
        payload: &mut actix_web::dev::Payload,
    ) -> impl std::future::Future<Output = Result<JsonObject, actix_web::Error>> + 'static {
        use actix_web::FromRequest;
        let parse = web::Json::<UniqueKeys>::from_request(req, payload);
        async move { Ok(JsonObject(parse.await?.into_inner().0)) }
    }

    /// Leaves the object for the handler's `JsonBody`.
    pub fn hand_on(self, req: &HttpRequest) {
        use actix_web::HttpMessage;
        req.extensions_mut().insert(self);
    }
}

/// Prefix of the error a repeated key raises (serde_json would keep the last value silently, so
/// two readers of one body could each take a different one).
const REPEATED_KEY: &str = "repeated key: ";

/// A JSON object whose objects, at any depth, have no repeated key.
struct UniqueKeys(serde_json::Map<String, serde_json::Value>);

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match deserializer.deserialize_map(UniqueKeysVisitor)? {
            serde_json::Value::Object(object) => Ok(UniqueKeys(object)),
            _ => unreachable!("deserialize_map visits a map"),
        }
    }
}

struct UniqueKeysValue(serde_json::Value);

impl<'de> serde::Deserialize<'de> for UniqueKeysValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueKeysVisitor).map(UniqueKeysValue)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(UniqueKeysValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(serde_json::Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let UniqueKeysValue(value) = map.next_value()?;
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("{REPEATED_KEY}{key}")));
            }
            object.insert(key, value);
        }
        Ok(serde_json::Value::Object(object))
    }
}

fn json_error(err: JsonPayloadError) -> AppError {
    match err {
        JsonPayloadError::ContentType => {
            AppError::UnsupportedMediaType("request body must be JSON (Content-Type: application/json)".into())
        }
        JsonPayloadError::Overflow { .. } | JsonPayloadError::OverflowKnownLength { .. } => AppError::PayloadTooLarge,
        JsonPayloadError::Deserialize(e) if e.is_data() => match repeated_key(&e) {
            Some(key) => AppError::invalid_field(&key, "appears more than once in the object"),
            None => AppError::bad_request("invalid_body", e.to_string()),
        },
        JsonPayloadError::Deserialize(e) => AppError::bad_request("malformed_json", e.to_string()),
        other => AppError::bad_request("invalid_body", other.to_string()),
    }
}

/// The key a `REPEATED_KEY` error names (serde_json appends " at line L column C").
fn repeated_key(err: &serde_json::Error) -> Option<String> {
    let message = err.to_string();
    let key = message.strip_prefix(REPEATED_KEY)?;
    Some(key[..key.rfind(" at line ").unwrap_or(key.len())].to_owned())
}

pub fn path_config() -> web::PathConfig {
    web::PathConfig::default().error_handler(|err: PathError, _req| {
        AppError::bad_request("invalid_path", format!("invalid path parameter: {err}")).into()
    })
}

pub fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|err: QueryPayloadError, _req| {
        AppError::bad_request("invalid_query", format!("invalid query parameter: {err}")).into()
    })
}

/// Fallback for unknown routes.
pub async fn route_not_found() -> AppError {
    AppError::not_found("route")
}

/// Fallback of every resource for methods it has no route for.
pub async fn method_not_allowed(req: HttpRequest) -> AppError {
    AppError::MethodNotAllowed {
        method: req.method().clone(),
        allow: req
            .match_pattern()
            .map_or("", |path| crate::openapi::allowed_methods(&path)),
    }
}

impl actix_web::Responder for AppError {
    type Body = actix_web::body::BoxBody;
    fn respond_to(self, _req: &HttpRequest) -> HttpResponse {
        self.error_response()
    }
}

/// The entity a foreign key points at, from its constraint name (`<table>_<column>_fkey`).
fn referenced_entity(constraint: Option<&str>) -> &'static str {
    let column = constraint.unwrap_or_default();
    if column.ends_with("project_id_fkey") {
        "project"
    } else if column.ends_with("workspace_id_fkey") {
        "workspace"
    } else if ["user_id_fkey", "assignee_id_fkey", "created_by_fkey"]
        .iter()
        .any(|c| column.ends_with(c))
    {
        "user"
    } else {
        "resource"
    }
}

/// Whether `err` is a unique violation of the named constraint (or unique index).
pub fn is_unique_violation(err: &sqlx::Error, constraint: &str) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation() && db.constraint() == Some(constraint))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_never_show_their_cause() {
        let err = AppError::internal("password=hunter2 leaked in a driver message");
        let body = err.body();
        assert_eq!(body.status_code, 500);
        assert_eq!(body.message, "internal error");
        assert_eq!(body.code, "internal_error");
    }

    #[test]
    fn validation_details_use_json_field_names() {
        assert_eq!(camel_case("assignee_id"), "assigneeId");
        assert_eq!(camel_case("title"), "title");
    }
}
