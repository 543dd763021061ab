//! The application as the domain sees it, and the validation of a submit (api.md rules).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::{
    applications::catalog::CatalogSnapshot,
    error::AppError,
    validate::{
        Violations, collapse_spaces, normalize_phone, validate_email, validate_full_name,
        validate_phone,
    },
};

pub const MAX_ANSWERS: usize = 50;
pub const MAX_ANSWER_KEY_CHARS: usize = 64;
pub const MAX_ANSWER_VALUE_CHARS: usize = 2000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    Uz,
    Ru,
    En,
}

impl Language {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "uz" => Some(Self::Uz),
            "ru" => Some(Self::Ru),
            "en" => Some(Self::En),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Uz => "uz",
            Self::Ru => "ru",
            Self::En => "en",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplicationStatus {
    New,
    InReview,
    Accepted,
    Rejected,
    Withdrawn,
}

impl ApplicationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "NEW",
            Self::InReview => "IN_REVIEW",
            Self::Accepted => "ACCEPTED",
            Self::Rejected => "REJECTED",
            Self::Withdrawn => "WITHDRAWN",
        }
    }

    /// The allowed transitions: NEW -> IN_REVIEW -> ACCEPTED/REJECTED, and NEW or IN_REVIEW
    /// -> WITHDRAWN.
    pub fn can_move_to(self, to: Self) -> bool {
        use ApplicationStatus::*;
        matches!(
            (self, to),
            (New, InReview) | (InReview, Accepted | Rejected) | (New | InReview, Withdrawn)
        )
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::New,
            Self::InReview,
            Self::Accepted,
            Self::Rejected,
            Self::Withdrawn,
        ]
        .into_iter()
        .find(|status| status.as_str() == s)
    }
}

/// A submit as received from any transport, before validation. Its JSON form is the legacy
/// REST body: absent fields are empty, and `from_submit` reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct SubmitInput {
    pub full_name: String,
    pub phone: String,
    pub email: Option<String>,
    pub telegram_user_id: Option<i64>,
    pub telegram_username: Option<String>,
    pub program_code: Option<String>,
    pub language: String,
    pub answers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Application {
    pub id: String,
    pub full_name: String,
    pub phone: String,
    pub email: Option<String>,
    pub telegram_user_id: Option<i64>,
    pub telegram_username: Option<String>,
    pub program_code: Option<String>,
    pub language: Language,
    pub answers: BTreeMap<String, String>,
    pub source: String,
    pub status: ApplicationStatus,
    pub note: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Application {
    /// Validates a submit against api.md's rules, reporting every failed field at once.
    pub fn from_submit(
        input: SubmitInput,
        source: &str,
        catalog: &CatalogSnapshot,
        now: DateTime<Utc>,
    ) -> Result<Self, AppError> {
        let mut violations = Violations::default();
        let mut check = |field: &str, result: Result<(), String>| violations.check(field, result);

        let full_name = collapse_spaces(&input.full_name);
        check("full_name", validate_full_name(&full_name));
        let phone = normalize_phone(&input.phone);
        check("phone", validate_phone(&phone));
        let email = input
            .email
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty());
        if let Some(email) = &email {
            check("email", validate_email(email));
        }
        if let Some(id) = input.telegram_user_id {
            check(
                "telegram_user_id",
                (id > 0)
                    .then_some(())
                    .ok_or_else(|| "must be a positive Telegram user id".to_owned()),
            );
        }
        let telegram_username = input
            .telegram_username
            .map(|u| u.trim().trim_start_matches('@').to_owned())
            .filter(|u| !u.is_empty());
        if let Some(username) = &telegram_username {
            check("telegram_username", validate_telegram_username(username));
        }
        let program_code = input
            .program_code
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty());
        if let Some(code) = &program_code {
            check(
                "program_code",
                catalog
                    .is_active(code)
                    .then_some(())
                    .ok_or_else(|| format!("{code:?} is not an active program")),
            );
        }
        let language = Language::parse(input.language.trim());
        check(
            "language",
            language
                .map(|_| ())
                .ok_or_else(|| "must be one of uz, ru, en".to_owned()),
        );
        check("answers", validate_answers(&input.answers));

        violations.into_result()?;
        match language {
            Some(language) => Ok(Self {
                id: uuid::Uuid::now_v7().to_string(),
                full_name,
                phone,
                email,
                telegram_user_id: input.telegram_user_id,
                telegram_username,
                program_code,
                language,
                answers: input.answers,
                source: source.to_owned(),
                status: ApplicationStatus::New,
                note: String::new(),
                created_at: now,
                updated_at: now,
            }),
            None => Err(AppError::invalid_field(
                "language",
                "must be one of uz, ru, en",
            )),
        }
    }
}

/// Telegram usernames: 5 to 32 of `[A-Za-z0-9_]` (a leading `@` is dropped before this).
fn validate_telegram_username(username: &str) -> Result<(), String> {
    let valid = (5..=32).contains(&username.len())
        && username
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err("must be 5 to 32 letters, digits or underscores".into())
    }
}

fn validate_answers(answers: &BTreeMap<String, String>) -> Result<(), String> {
    if answers.len() > MAX_ANSWERS {
        return Err(format!("at most {MAX_ANSWERS} answers"));
    }
    for (key, value) in answers {
        let key_chars = key.chars().count();
        if key_chars == 0 || key_chars > MAX_ANSWER_KEY_CHARS {
            return Err(format!(
                "keys must be 1 to {MAX_ANSWER_KEY_CHARS} characters"
            ));
        }
        if value.chars().count() > MAX_ANSWER_VALUE_CHARS {
            return Err(format!(
                "the answer to {key:?} is longer than {MAX_ANSWER_VALUE_CHARS} characters"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_documented_transitions_are_allowed() {
        use ApplicationStatus::*;
        let all = [New, InReview, Accepted, Rejected, Withdrawn];
        let allowed: Vec<_> = all
            .iter()
            .flat_map(|a| all.iter().map(move |b| (*a, *b)))
            .filter(|(a, b)| a.can_move_to(*b))
            .collect();
        assert_eq!(
            allowed,
            [
                (New, InReview),
                (New, Withdrawn),
                (InReview, Accepted),
                (InReview, Rejected),
                (InReview, Withdrawn)
            ]
        );
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        for s in ["NEW", "IN_REVIEW", "ACCEPTED", "REJECTED", "WITHDRAWN"] {
            assert_eq!(ApplicationStatus::parse(s).map(|x| x.as_str()), Some(s));
        }
        assert_eq!(ApplicationStatus::parse("new"), None);
    }
}
