//! Field rules shared by every domain (people's names, phones, emails, passwords), and the
//! collector that reports all failed fields of a request at once.

use crate::error::{AppError, FieldViolation};

/// Collects one violation per failed field.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn check(&mut self, field: &str, result: Result<(), String>) {
        if let Err(description) = result {
            self.0.push(FieldViolation::new(field, description));
        }
    }

    /// `VALIDATION_FAILED` naming every failed field, or `Ok` when none failed.
    pub fn into_result(self) -> Result<(), AppError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(AppError::Validation(self.0))
        }
    }
}

/// Trims and folds runs of white space into one space.
pub fn collapse_spaces(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn validate_full_name(name: &str) -> Result<(), String> {
    let chars = name.chars().count();
    if !(2..=200).contains(&chars) {
        return Err("must be 2 to 200 characters".into());
    }
    if name.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// Removes the separators people type (spaces, dashes, dots, parentheses).
pub fn normalize_phone(phone: &str) -> String {
    phone
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect()
}

/// E.164: `+`, a non-zero digit, then 7 to 14 more digits.
pub fn validate_phone(phone: &str) -> Result<(), String> {
    let digits = phone.strip_prefix('+').unwrap_or("");
    let valid = (8..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0');
    if valid {
        Ok(())
    } else {
        Err("must be an E.164 number such as +998901234567".into())
    }
}

pub fn validate_email(email: &str) -> Result<(), String> {
    let bad = || Err("must be an email address such as name@example.uz".to_owned());
    if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad();
    }
    let Some((local, domain)) = email.rsplit_once('@') else {
        return bad();
    };
    let domain_ok = domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..");
    if local.is_empty() || local.len() > 64 || local.contains('@') || !domain_ok {
        return bad();
    }
    Ok(())
}

pub const PASSWORD_CHARS: std::ops::RangeInclusive<usize> = 8..=128;

/// 8 to 128 characters (OWASP ASVS), checked before any hashing.
pub fn validate_password(password: &str) -> Result<(), String> {
    if PASSWORD_CHARS.contains(&password.chars().count()) {
        Ok(())
    } else {
        Err("must be 8 to 128 characters".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_must_be_e164_after_removing_separators() {
        for ok in ["+998901234567", "+998 90 123-45-67", "+1 (415) 555-2671"] {
            assert_eq!(validate_phone(&normalize_phone(ok)), Ok(()), "{ok}");
        }
        for bad in [
            "998901234567",
            "+0998901234567",
            "+99890",
            "+99890123456789012",
            "+99890abc4567",
            "",
        ] {
            assert!(validate_phone(&normalize_phone(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn emails_need_a_local_part_and_a_dotted_domain() {
        assert!(validate_email("a.b@example.uz").is_ok());
        for bad in [
            "plain",
            "@example.uz",
            "a@b",
            "a@.uz",
            "a b@example.uz",
            "a@example..uz",
        ] {
            assert!(validate_email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_trimmed_and_counted_in_characters() {
        assert_eq!(collapse_spaces("  Aziz   Karimov "), "Aziz Karimov");
        assert!(validate_full_name("Ли").is_ok());
        assert!(validate_full_name("A").is_err());
        assert!(validate_full_name(&"я".repeat(200)).is_ok());
        assert!(validate_full_name(&"я".repeat(201)).is_err());
    }

    #[test]
    fn passwords_are_counted_in_characters() {
        assert!(validate_password("1234567").is_err());
        assert!(validate_password("12345678").is_ok());
        assert!(validate_password(&"я".repeat(128)).is_ok());
        assert!(validate_password(&"я".repeat(129)).is_err());
    }
}
