//! Click SHOP API wire format (providers.md §2): raw request fields, the MD5 `sign_string`,
//! error codes with their notes, and som strings converted exactly to tiyin.

use std::collections::HashMap;

use md5::{Digest, Md5};
use serde_json::{Value, json};

pub const SUCCESS: i32 = 0;
pub const SIGN_FAILED: i32 = -1;
pub const BAD_AMOUNT: i32 = -2;
pub const ACTION_NOT_FOUND: i32 = -3;
pub const ALREADY_PAID: i32 = -4;
pub const USER_NOT_FOUND: i32 = -5;
pub const TX_NOT_FOUND: i32 = -6;
/// "Failed to update": our side failed; Click retries.
pub const UPDATE_FAILED: i32 = -7;
pub const BAD_REQUEST: i32 = -8;
pub const CANCELLED: i32 = -9;

pub fn note(code: i32) -> &'static str {
    match code {
        SUCCESS => "Success",
        SIGN_FAILED => "SIGN CHECK FAILED!",
        BAD_AMOUNT => "Incorrect parameter amount",
        ACTION_NOT_FOUND => "Action not found",
        ALREADY_PAID => "Already paid",
        USER_NOT_FOUND => "User does not exist",
        TX_NOT_FOUND => "Transaction does not exist",
        BAD_REQUEST => "Error in request from click",
        CANCELLED => "Transaction cancelled",
        _ => "Failed to update user",
    }
}

/// The request's fields exactly as received (form-encoded or JSON), for hashing.
pub type Fields = HashMap<String, String>;

/// Form-encoded or JSON, whatever the content type says; `None` when it is neither.
pub fn parse_fields(body: &[u8]) -> Option<Fields> {
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) {
        return Some(
            map.into_iter()
                .filter_map(|(k, v)| {
                    let raw = match v {
                        Value::String(s) => s,
                        Value::Number(n) => n.to_string(),
                        Value::Null => return None,
                        other => other.to_string(),
                    };
                    Some((k, raw))
                })
                .collect(),
        );
    }
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()
        .map(|pairs| pairs.into_iter().collect())
}

/// `md5(click_trans_id + service_id + secret + merchant_trans_id [+ merchant_prepare_id] +
/// amount + action + sign_time)`, lowercase hex, over the raw strings.
pub fn sign(fields: &Fields, secret: &str, with_prepare_id: bool) -> String {
    let get = |k: &str| fields.get(k).map(String::as_str).unwrap_or_default();
    let mut text = String::new();
    text.push_str(get("click_trans_id"));
    text.push_str(get("service_id"));
    text.push_str(secret);
    text.push_str(get("merchant_trans_id"));
    if with_prepare_id {
        text.push_str(get("merchant_prepare_id"));
    }
    text.push_str(get("amount"));
    text.push_str(get("action"));
    text.push_str(get("sign_time"));
    hex::encode(Md5::digest(text.as_bytes()))
}

/// "1500.00" -> 150000 tiyin, exactly; `None` for anything that is not a non-negative
/// decimal with at most two fractional digits (trailing zeros beyond are tolerated).
pub fn som_to_tiyin(amount: &str) -> Option<i64> {
    let (whole, frac) = amount.split_once('.').unwrap_or((amount, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let (cents, rest) = frac.split_at(frac.len().min(2));
    if rest.bytes().any(|b| b != b'0') {
        return None;
    }
    let cents: i64 = format!("{cents:0<2}").parse().ok()?;
    whole
        .parse::<i64>()
        .ok()?
        .checked_mul(100)?
        .checked_add(cents)
}

pub fn answer(fields: &Fields, code: i32, extra: Option<(&str, Value)>) -> Value {
    let click_trans_id: Value = fields
        .get("click_trans_id")
        .and_then(|v| v.parse::<i64>().ok())
        .map_or(Value::Null, Value::from);
    let mut body = json!({
        "click_trans_id": click_trans_id,
        "merchant_trans_id": fields.get("merchant_trans_id"),
        "error": code,
        "error_note": note(code),
    });
    if let Some((k, v)) = extra {
        body[k] = v;
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(action: &str, prepare: Option<&str>) -> Fields {
        let mut f: Fields = [
            ("click_trans_id", "2139474541"),
            ("service_id", "12345"),
            ("merchant_trans_id", "INV-42"),
            ("amount", "150000.00"),
            ("action", action),
            ("sign_time", "2024-05-01 10:15:30"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        if let Some(p) = prepare {
            f.insert("merchant_prepare_id".into(), p.into());
        }
        f
    }

    #[test]
    fn the_documented_test_vectors_are_reproduced() {
        assert_eq!(
            sign(&vector("0", None), "TEST_SECRET", false),
            "1751814f18d085b9bdc4ff2042280493"
        );
        assert_eq!(
            sign(&vector("1", Some("7")), "TEST_SECRET", true),
            "5f6307a15feb4a71b706d735e7763838"
        );
    }

    #[test]
    fn som_strings_convert_exactly() {
        assert_eq!(som_to_tiyin("1500.00"), Some(150_000));
        assert_eq!(som_to_tiyin("1500"), Some(150_000));
        assert_eq!(som_to_tiyin("1500.5"), Some(150_050));
        assert_eq!(som_to_tiyin("0.01"), Some(1));
        assert_eq!(som_to_tiyin("1500.000"), Some(150_000));
        for bad in ["1500.001", "-1", "", "1e3", "12,50", "abc", "."] {
            assert_eq!(som_to_tiyin(bad), None, "{bad}");
        }
    }

    #[test]
    fn bodies_parse_as_form_or_json() {
        let form =
            parse_fields(b"click_trans_id=1&amount=1000.00&sign_time=2024-05-01+10%3A15%3A30")
                .expect("form");
        assert_eq!(form["sign_time"], "2024-05-01 10:15:30");
        let json = parse_fields(br#"{"click_trans_id": 1, "amount": "1000.00"}"#).expect("json");
        assert_eq!(
            (json["click_trans_id"].as_str(), json["amount"].as_str()),
            ("1", "1000.00")
        );
    }
}
