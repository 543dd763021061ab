//! Checkout links: where the payer's browser goes to pay, built from configuration
//! (providers.md §1.10, §2, §3.6). Amounts leave as each provider expects them.

use base64::{Engine, engine::general_purpose::STANDARD};

use crate::{
    config::{Settings, percent_encode},
    error::AppError,
    payments::model::Provider,
};

/// Whether the provider's keys are configured (a provider whose keys are unset is off).
pub fn enabled(settings: &Settings, provider: Provider) -> bool {
    match provider {
        Provider::Payme => {
            settings.payme.merchant_id.is_some() && settings.payme.secret_key.is_some()
        }
        Provider::Click => {
            settings.click.service_id.is_some()
                && settings.click.merchant_id.is_some()
                && settings.click.secret_key.is_some()
        }
        Provider::Uzum => {
            settings.uzum.service_id.is_some()
                && settings.uzum.login.is_some()
                && settings.uzum.password.is_some()
        }
    }
}

/// Tiyin as Click's som string, exactly: 150000 -> "1500.00".
pub fn som(tiyin: i64) -> String {
    format!("{}.{:02}", tiyin / 100, tiyin % 100)
}

/// The link for one invoice. `return_url` has been validated by the caller.
pub fn url(
    settings: &Settings,
    provider: Provider,
    invoice_id: &str,
    amount_tiyin: i64,
    return_url: Option<&str>,
) -> Result<String, AppError> {
    let off = || AppError::invalid_field("provider", "this provider is not available");
    if !enabled(settings, provider) {
        return Err(off());
    }
    let query = |pairs: &mut Vec<(&str, String)>, extra: Option<(&'static str, &str)>| {
        if let Some((k, v)) = extra {
            pairs.push((k, v.to_owned()));
        }
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    };
    Ok(match provider {
        Provider::Payme => {
            let p = &settings.payme;
            let merchant = p.merchant_id.as_deref().ok_or_else(off)?;
            let mut params = format!(
                "m={merchant};ac.{}={invoice_id};a={amount_tiyin}",
                p.account_field
            );
            if let Some(back) = return_url {
                params.push_str(&format!(";c={back}"));
            }
            format!("{}/{}", p.checkout_url, STANDARD.encode(params))
        }
        Provider::Click => {
            let c = &settings.click;
            let mut pairs = vec![
                ("service_id", c.service_id.clone().ok_or_else(off)?),
                ("merchant_id", c.merchant_id.clone().ok_or_else(off)?),
                ("amount", som(amount_tiyin)),
                ("transaction_param", invoice_id.to_owned()),
            ];
            if let Some(user) = &c.merchant_user_id {
                pairs.push(("merchant_user_id", user.clone()));
            }
            format!(
                "{}?{}",
                c.checkout_url,
                query(&mut pairs, return_url.map(|u| ("return_url", u)))
            )
        }
        Provider::Uzum => {
            let u = &settings.uzum;
            let mut pairs = vec![
                ("serviceId", u.service_id.clone().ok_or_else(off)?),
                ("order_id", invoice_id.to_owned()),
                ("amount", amount_tiyin.to_string()),
            ];
            format!(
                "{}?{}",
                u.checkout_url,
                query(&mut pairs, return_url.map(|u| ("redirectUrl", u)))
            )
        }
    })
}

/// A return URL: http(s), at most 2000 characters, no spaces or control characters.
pub fn validate_return_url(url: &str) -> Result<(), AppError> {
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && url.len() <= 2000
        && url.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(AppError::invalid_field(
            "return_url",
            "must be an http(s) URL without spaces",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn som_strings_are_exact() {
        assert_eq!(som(150_000), "1500.00");
        assert_eq!(som(1), "0.01");
        assert_eq!(som(12_345), "123.45");
    }

    #[test]
    fn the_payme_doc_example_is_reproduced() {
        let mut vars = std::collections::HashMap::new();
        vars.insert(
            "PAYME_MERCHANT_ID".to_owned(),
            "587f72c72cac0d162c722ae2".to_owned(),
        );
        vars.insert("PAYME_SECRET_KEY".to_owned(), "k".to_owned());
        let settings = Settings::from_vars(&vars).expect("settings");
        assert_eq!(
            url(&settings, Provider::Payme, "197", 500, None).expect("url"),
            "https://checkout.paycom.uz/bT01ODdmNzJjNzJjYWMwZDE2MmM3MjJhZTI7YWMub3JkZXJfaWQ9MTk3O2E9NTAw"
        );
        assert!(
            url(&settings, Provider::Click, "197", 500, None).is_err(),
            "click is off"
        );
    }
}
