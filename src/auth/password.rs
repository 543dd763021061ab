//! Argon2id password hashing (OWASP: m = 19 MiB, t = 2, p = 1) on the blocking pool, behind a
//! semaphore: a login flood queues here instead of taking every core from the other RPCs.

use std::{sync::Arc, time::Duration};

use argon2::{
    Algorithm, Argon2, Params, Version,
    password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash},
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

use crate::error::AppError;

/// How long a hash may wait for its turn before the caller is told to come back later.
const QUEUE_WAIT: Duration = Duration::from_secs(10);

fn argon2() -> Argon2<'static> {
    // Params::new only fails on out-of-range values; these are the documented defaults.
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or(Params::DEFAULT);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

pub struct Passwords {
    permits: Arc<Semaphore>,
    /// Verified against when the login names nobody, so both failures cost the same.
    dummy_hash: String,
}

impl Passwords {
    /// `concurrency` hashes at most run at once: half the cores, at least one.
    pub async fn new() -> Result<Self, AppError> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let permits = Arc::new(Semaphore::new((cores / 2).max(1)));
        let dummy_hash = tokio::task::spawn_blocking(|| hash_now(b"not a real password: dummy"))
            .await
            .map_err(|e| AppError::Internal(e.into()))??;
        Ok(Self {
            permits,
            dummy_hash,
        })
    }

    pub async fn hash(&self, password: &SecretString) -> Result<String, AppError> {
        let password = password.expose_secret().as_bytes().to_vec();
        self.run(move || hash_now(&password)).await?
    }

    /// True when `password` matches `phc`; with no hash (unknown user) a dummy is checked and
    /// the answer is false.
    pub async fn verify(
        &self,
        password: &SecretString,
        phc: Option<String>,
    ) -> Result<bool, AppError> {
        let known = phc.is_some();
        let phc = phc.unwrap_or_else(|| self.dummy_hash.clone());
        let password = password.expose_secret().as_bytes().to_vec();
        let matched = self
            .run(move || {
                PasswordHash::new(&phc)
                    .map(|parsed| argon2().verify_password(&password, &parsed).is_ok())
                    .unwrap_or(false)
            })
            .await?;
        Ok(known && matched)
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AppError> {
        let permit = tokio::time::timeout(QUEUE_WAIT, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| AppError::Unavailable("password hashing queue is full".into()))?
            .map_err(|e| AppError::Internal(e.into()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|e| AppError::Internal(e.into()))
    }
}

fn hash_now(password: &[u8]) -> Result<String, AppError> {
    argon2()
        .hash_password(password)
        .map(|h| h.to_string())
        .map_err(|e| AppError::Internal(anyhow::anyhow!("argon2: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_argon2id_with_owasp_parameters_and_verify() {
        let passwords = Passwords::new().await.expect("init");
        let secret = SecretString::from("correct horse battery");
        let phc = passwords.hash(&secret).await.expect("hash");
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(
            passwords
                .verify(&secret, Some(phc.clone()))
                .await
                .expect("verify")
        );
        let wrong = SecretString::from("wrong horse battery");
        assert!(!passwords.verify(&wrong, Some(phc)).await.expect("verify"));
        assert!(!passwords.verify(&secret, None).await.expect("dummy"));
    }
}
