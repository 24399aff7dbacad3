use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// The one form accounts are matched by: trimmed, NFKC, then Unicode case folding (so `İ`, `ß`,
/// `ẞ`, a final sigma and full-width letters match their other spellings), then NFKC again. The
/// login limiter, every lookup and the unique index (`users.email_key`) all use it; Postgres
/// `lower()` would not do (it follows the database's locale and disagrees with Rust on `İ`).
pub fn email_key(email: &str) -> String {
    use caseless::Caseless;
    use unicode_normalization::UnicodeNormalization;
    email.trim().nfkc().default_case_fold().nfkc().collect()
}

/// A user as the API shows it (the password hash never leaves the repository).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::email_key;

    #[test]
    fn every_spelling_of_an_email_has_one_key() {
        let cases = [
            ("upper case", "Ada@Example.COM", "ada@example.com"),
            ("surrounding spaces", "  ada@example.com\t", "ada@example.com"),
            ("full-width letters", "ａｄａ@example.com", "ada@example.com"),
            ("Kelvin sign", "\u{212A}im@example.com", "kim@example.com"),
            ("long s", "\u{17F}am@example.com", "sam@example.com"),
            ("sharp s folds to ss", "stra\u{DF}e@example.com", "strasse@example.com"),
            ("capital sharp s", "STRA\u{1E9E}E@example.com", "strasse@example.com"),
            (
                "final sigma",
                "\u{3BF}\u{3C2}@example.com",
                "\u{3BF}\u{3C3}@example.com",
            ),
            (
                "capital sigma",
                "\u{39F}\u{3A3}@example.com",
                "\u{3BF}\u{3C3}@example.com",
            ),
            ("dotted capital I", "\u{130}nci@example.com", "i\u{307}nci@example.com"),
            (
                "composed and decomposed e-acute",
                "e\u{301}mile@example.com",
                "\u{E9}mile@example.com",
            ),
        ];
        for (what, spelling, key) in cases {
            assert_eq!(email_key(spelling), email_key(key), "{what}");
            assert_eq!(
                email_key(spelling),
                email_key(&email_key(spelling)),
                "{what}: the key is its own key"
            );
        }
        assert_ne!(
            email_key("i@example.com"),
            email_key("\u{130}@example.com"),
            "İ is not i"
        );
    }
}
