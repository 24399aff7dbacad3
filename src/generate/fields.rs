//! A resource's fields as the command line gives them (`name:string`, `color:enum(red|blue)?`),
//! and what each becomes in SQL, Rust, validation, the OpenAPI schema and the generated tests.

use serde::Serialize;

/// One field, ready for the templates.
#[derive(Debug, Clone, Serialize)]
pub struct Field {
    /// snake_case: the column, the Rust field.
    pub name: String,
    /// camelCase: the JSON property.
    pub json: String,
    pub kind: &'static str,
    pub optional: bool,
    /// The Rust type of the stored value (without `Option`).
    pub rust: String,
    pub sql: String,
    /// A string the handler trims (and refuses when blank).
    pub trimmed: bool,
    /// `#[validate(...)]` arguments, if any.
    pub validate: Option<&'static str>,
    /// `#[schema(...)]` arguments, if any.
    pub schema: Option<&'static str>,
    /// For an enum: its Rust name and (value, variant) pairs.
    pub enum_name: Option<String>,
    pub variants: Vec<(String, String)>,
    /// JSON literals for the generated tests: a valid value, another one, and an invalid one.
    pub example: String,
    pub other_example: String,
    pub invalid_example: String,
    /// How the repository binds it (`&label.name`, or `label.count` for a `Copy` value).
    pub by_reference: bool,
}

/// What is wrong with a field argument, for one line of `generate`'s output.
#[derive(Debug, thiserror::Error)]
#[error("field {argument:?}: {why}")]
pub struct FieldError {
    argument: String,
    why: String,
}

const NOT_BLANK: &str = r#"length(min = 1, max = 200), custom(function = "not_blank")"#;
const STRING_SCHEMA: &str = r#"min_length = 1, max_length = 200, pattern = r"^[^\u0000]*[^\u0000\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$""#;
const TEXT: &str = r#"length(max = 5000), custom(function = "no_nul")"#;
const TEXT_SCHEMA: &str = r#"max_length = 5000, pattern = r"^[^\u0000]*$""#;

/// Names a resource may not take for a field: the columns every resource has.
const RESERVED: [&str; 6] = ["id", "workspace_id", "project_id", "created_at", "updated_at", "type"];

pub fn parse(argument: &str, singular_type: &str) -> Result<Field, FieldError> {
    let fail = |why: &str| FieldError {
        argument: argument.to_owned(),
        why: why.to_owned(),
    };
    let (name, kind) = argument
        .split_once(':')
        .ok_or_else(|| fail("expected name:type, e.g. name:string or color:enum(red|blue)?"))?;
    if !is_snake_case(name) {
        return Err(fail(
            "the name must be snake_case (a-z, 0-9, _), starting with a letter",
        ));
    }
    if RESERVED.contains(&name) {
        return Err(fail("every resource has this column already"));
    }
    let (kind, optional) = match kind.strip_suffix('?') {
        Some(kind) => (kind, true),
        None => (kind, false),
    };
    let mut field = Field {
        name: name.to_owned(),
        json: camel_case(name),
        kind: "",
        optional,
        rust: String::new(),
        sql: String::new(),
        trimmed: false,
        validate: None,
        schema: None,
        enum_name: None,
        variants: Vec::new(),
        example: String::new(),
        other_example: String::new(),
        invalid_example: String::new(),
        by_reference: false,
    };
    let simple =
        |rust: &str, sql: &str, examples: [&str; 3]| (rust.to_owned(), sql.to_owned(), examples.map(str::to_owned));
    let (rust, sql, [example, other, invalid]) = match kind {
        "string" => {
            (field.trimmed, field.validate, field.schema) = (true, Some(NOT_BLANK), Some(STRING_SCHEMA));
            simple("String", "text", [r#""First""#, r#""Second""#, r#""  ""#])
        }
        "text" => {
            (field.validate, field.schema) = (Some(TEXT), Some(TEXT_SCHEMA));
            simple(
                "String",
                "text",
                [r#""Some words""#, r#""Other words""#, r#""a\u{0}b""#],
            )
        }
        "int" => simple("i64", "bigint", ["7", "8", r#""seven""#]),
        "bool" => simple("bool", "boolean", ["true", "false", r#""yes""#]),
        "date" => simple(
            "chrono::NaiveDate",
            "date",
            [r#""2026-01-31""#, r#""2026-02-01""#, r#""2026-02-30""#],
        ),
        "timestamp" => simple(
            "chrono::DateTime<chrono::Utc>",
            "timestamptz",
            [
                r#""2026-01-31T09:30:00Z""#,
                r#""2026-02-01T10:00:00Z""#,
                r#""yesterday""#,
            ],
        ),
        "uuid" => simple(
            "uuid::Uuid",
            "uuid",
            [
                r#""0b8a3c1e-6f3e-4a53-9f1e-2d1f6c7b9a01""#,
                r#""7c9e6679-7425-40de-944b-e07fc1f90ae7""#,
                r#""not-a-uuid""#,
            ],
        ),
        _ => {
            let values = kind
                .strip_prefix("enum(")
                .and_then(|rest| rest.strip_suffix(')'))
                .ok_or_else(|| fail("unknown type: string, text, int, bool, date, timestamp, uuid or enum(a|b|c)"))?;
            let values: Vec<&str> = values.split('|').collect();
            if values.len() < 2 || !values.iter().all(|value| is_snake_case(value)) {
                return Err(fail("an enum takes two or more snake_case values: enum(low|high)"));
            }
            let mut unique = values.clone();
            unique.sort_unstable();
            unique.dedup();
            if unique.len() != values.len() {
                return Err(fail("an enum's values must differ"));
            }
            let name = format!("{singular_type}{}", pascal_case(name));
            field.variants = values.iter().map(|v| (v.to_string(), pascal_case(v))).collect();
            let checked = values.iter().map(|v| format!("'{v}'")).collect::<Vec<_>>().join(", ");
            field.enum_name = Some(name.clone());
            (
                name,
                format!("text CHECK ({} IN ({checked}))", field.name),
                [
                    format!("{:?}", values[0]),
                    format!("{:?}", values[1]),
                    r#""none of these""#.to_owned(),
                ],
            )
        }
    };
    field.kind = match kind {
        "string" => "string",
        "text" => "text",
        "int" => "int",
        "bool" => "bool",
        "date" => "date",
        "timestamp" => "timestamp",
        "uuid" => "uuid",
        _ => "enum",
    };
    field.by_reference = rust == "String";
    field.rust = rust;
    field.sql = if optional { sql } else { format!("{sql} NOT NULL") };
    (field.example, field.other_example, field.invalid_example) = (example, other, invalid);
    Ok(field)
}

pub fn is_snake_case(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.ends_with('_')
        && !name.contains("__")
}

pub fn camel_case(snake: &str) -> String {
    let mut words = snake.split('_');
    let first = words.next().unwrap_or_default().to_owned();
    first + &words.map(pascal_case).collect::<String>()
}

pub fn pascal_case(snake: &str) -> String {
    snake
        .split('_')
        .map(|word| {
            let mut chars = word.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_type_parses_and_a_question_mark_makes_it_optional() {
        let name = parse("name:string", "Label").unwrap();
        assert!(!name.optional && name.trimmed && name.sql == "text NOT NULL" && name.rust == "String");
        let color = parse("color:enum(dark_red|blue)?", "Label").unwrap();
        assert!(color.optional);
        assert_eq!(color.enum_name.as_deref(), Some("LabelColor"));
        assert_eq!(color.variants[0], ("dark_red".to_owned(), "DarkRed".to_owned()));
        assert_eq!(color.sql, "text CHECK (color IN ('dark_red', 'blue'))");
        assert_eq!(parse("due_on:date", "Label").unwrap().json, "dueOn");
        for bad in [
            "name",
            "Name:string",
            "name:float",
            "color:enum(red)",
            "color:enum(a|a)",
            "id:uuid",
        ] {
            assert!(parse(bad, "Label").is_err(), "{bad} was accepted");
        }
    }
}
