//! JWT access tokens: HS256 over `SECRET_KEY`, the algorithm pinned, and `exp`, `iat`, `iss`,
//! `aud`, `sub` and our token-type claim required (RFC 8725).

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::{
    auth::{Role, UserPrincipal},
    error::{AppError, Reason},
};

pub const ISSUER: &str = "crm-server";
pub const AUDIENCE: &str = "crm-api";
const ACCESS: &str = "access";
/// Clock skew tolerated on `exp`/`nbf` (security.md allows at most 30 s).
const LEEWAY_SECONDS: u64 = 5;

/// The claims we sign. Numeric dates are integers: a string `exp` or `nbf` fails to decode.
#[derive(Debug, Serialize, Deserialize)]
pub struct AccessClaims {
    pub sub: String,
    /// The session (refresh-token family) the token belongs to.
    pub sid: String,
    pub role: String,
    /// Always "access": a token minted for another purpose is refused.
    pub typ: String,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
}

pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    pub access_ttl: Duration,
}

impl JwtKeys {
    pub fn new(secret: &SecretString, access_ttl: Duration) -> Self {
        let bytes = secret.expose_secret().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;
        Self {
            encoding: EncodingKey::from_secret(bytes),
            decoding: DecodingKey::from_secret(bytes),
            validation,
            access_ttl,
        }
    }

    pub fn issue(&self, user_id: &str, role: Role, session_id: &str) -> Result<String, AppError> {
        let now = chrono::Utc::now().timestamp();
        let claims = AccessClaims {
            sub: user_id.to_owned(),
            sid: session_id.to_owned(),
            role: role.as_str().to_owned(),
            typ: ACCESS.to_owned(),
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now,
            nbf: now,
            exp: now + self.access_ttl.as_secs() as i64,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AppError::Internal(e.into()))
    }

    /// Checks signature, algorithm and claims; no I/O.
    pub fn verify(&self, token: &str) -> Result<UserPrincipal, AppError> {
        let invalid = || AppError::refused(Reason::TokenInvalid, "invalid access token");
        let data = jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => {
                    AppError::refused(Reason::TokenExpired, "the access token has expired")
                }
                _ => invalid(),
            })?;
        let claims = data.claims;
        if claims.typ != ACCESS || claims.sid.is_empty() {
            return Err(invalid());
        }
        let role = Role::parse(&claims.role).ok_or_else(invalid)?;
        Ok(UserPrincipal {
            id: claims.sub,
            role,
            session_id: claims.sid,
        })
    }
}

#[cfg(test)]
mod tests {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    use hmac::{Hmac, KeyInit, Mac};

    use super::*;

    const SECRET: &str = "unit-test-secret-key-0123456789abcdef";

    fn keys() -> JwtKeys {
        JwtKeys::new(&SecretString::from(SECRET), Duration::from_secs(1800))
    }

    /// Signs arbitrary header and claims JSON, as an attacker with the key (or without) could.
    fn forge(header: serde_json::Value, claims: serde_json::Value, key: &[u8]) -> String {
        let h = URL_SAFE_NO_PAD.encode(header.to_string());
        let c = URL_SAFE_NO_PAD.encode(claims.to_string());
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("key");
        mac.update(format!("{h}.{c}").as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{h}.{c}.{sig}")
    }

    fn good_claims() -> serde_json::Value {
        let now = chrono::Utc::now().timestamp();
        serde_json::json!({
            "sub": "u1", "sid": "s1", "role": "STAFF", "typ": "access",
            "iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + 600, "jti": "j"
        })
    }

    fn reason_of(token: &str) -> Reason {
        keys().verify(token).expect_err("refused").reason()
    }

    #[test]
    fn issued_tokens_verify() {
        let token = keys().issue("u1", Role::Admin, "s1").expect("issue");
        let user = keys().verify(&token).expect("valid");
        assert_eq!(
            (user.id.as_str(), user.role, user.session_id.as_str()),
            ("u1", Role::Admin, "s1")
        );
        let forged_ok = forge(
            serde_json::json!({"alg": "HS256", "typ": "JWT"}),
            good_claims(),
            SECRET.as_bytes(),
        );
        assert!(
            keys().verify(&forged_ok).is_ok(),
            "the forger helper itself is sound"
        );
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(good_claims().to_string())
        );
        assert_eq!(reason_of(&none), Reason::TokenInvalid);
        let hs512 = forge(
            serde_json::json!({"alg": "HS512"}),
            good_claims(),
            SECRET.as_bytes(),
        );
        assert_eq!(reason_of(&hs512), Reason::TokenInvalid);
        let other_key = forge(
            serde_json::json!({"alg": "HS256"}),
            good_claims(),
            b"another key of enough length....",
        );
        assert_eq!(reason_of(&other_key), Reason::TokenInvalid);
    }

    #[test]
    fn claims_are_required_and_checked() {
        let header = serde_json::json!({"alg": "HS256"});
        let sign = |claims: serde_json::Value| forge(header.clone(), claims, SECRET.as_bytes());
        let mut expired = good_claims();
        expired["exp"] = (chrono::Utc::now().timestamp() - 120).into();
        assert_eq!(reason_of(&sign(expired)), Reason::TokenExpired);
        for (claim, value) in [
            ("iss", serde_json::json!("someone-else")),
            ("aud", serde_json::json!("another-api")),
            ("typ", serde_json::json!("refresh")),
            (
                "exp",
                serde_json::json!((chrono::Utc::now().timestamp() + 600).to_string()),
            ),
            (
                "nbf",
                serde_json::json!(chrono::Utc::now().timestamp().to_string()),
            ),
            (
                "nbf",
                serde_json::json!(chrono::Utc::now().timestamp() + 3600),
            ),
            ("role", serde_json::json!("ROOT")),
        ] {
            let mut claims = good_claims();
            claims[claim] = value.clone();
            assert_eq!(
                reason_of(&sign(claims)),
                Reason::TokenInvalid,
                "{claim} = {value}"
            );
        }
        for missing in ["exp", "iat", "iss", "aud", "sub", "typ", "sid"] {
            let mut claims = good_claims();
            claims.as_object_mut().expect("object").remove(missing);
            assert_eq!(
                reason_of(&sign(claims)),
                Reason::TokenInvalid,
                "without {missing}"
            );
        }
    }

    #[test]
    fn opaque_refresh_tokens_are_not_access_tokens() {
        assert_eq!(reason_of(&"ab".repeat(32)), Reason::TokenInvalid);
    }
}
