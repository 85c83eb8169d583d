//! Password hashing with argon2id at OWASP's minimum parameters (19 MiB, 2 passes, 1 lane), run on
//! the blocking pool so hashing never stalls the async workers, with a cap on concurrent hashes so a
//! burst of logins cannot exhaust memory.

use std::sync::Arc;

use argon2::{Algorithm, Argon2, Params, PasswordHasher as _, PasswordVerifier as _, Version};
use tokio::sync::Semaphore;

/// Longest password accepted (bytes). Longer ones are refused before any hashing.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Shortest password `users create` accepts.
pub const MIN_PASSWORD_CHARS: usize = 8;

fn argon2() -> Argon2<'static> {
    // OWASP password storage cheat sheet: argon2id, m=19 MiB, t=2, p=1.
    let params = Params::new(19 * 1024, 2, 1, None).expect("valid argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes and verifies passwords off the async runtime.
#[derive(Clone)]
pub struct PasswordHasher {
    permits: Arc<Semaphore>,
    /// A hash of a random password, verified against when the email is unknown so both answers
    /// take about as long.
    dummy_hash: Arc<String>,
}

impl PasswordHasher {
    /// A hasher allowing `concurrency` hashes at once.
    pub fn new(concurrency: usize) -> Self {
        let random: [u8; 16] = rand::random();
        let dummy = hash_blocking(&format!("{random:?}")).expect("hashing a random password");
        Self {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            dummy_hash: Arc::new(dummy),
        }
    }

    /// Hashes a password into a PHC string.
    pub async fn hash(&self, password: String) -> anyhow::Result<String> {
        let _permit = self.permits.acquire().await?;
        tokio::task::spawn_blocking(move || hash_blocking(&password)).await?
    }

    /// Verifies a password against a stored PHC string; `None` verifies against a dummy hash and
    /// always fails, taking as long as a real check.
    pub async fn verify(&self, password: String, stored: Option<String>) -> anyhow::Result<bool> {
        let _permit = self.permits.acquire().await?;
        let known = stored.is_some();
        let stored = stored.unwrap_or_else(|| self.dummy_hash.as_ref().clone());
        let ok = tokio::task::spawn_blocking(move || verify_blocking(&password, &stored)).await??;
        Ok(ok && known)
    }
}

/// Hashes a password on the current thread.
pub fn hash_blocking(password: &str) -> anyhow::Result<String> {
    let hash = argon2()
        .hash_password(password.as_bytes())
        .map_err(|e| anyhow::anyhow!("password hashing failed: {e}"))?;
    Ok(hash.to_string())
}

fn verify_blocking(password: &str, stored: &str) -> anyhow::Result<bool> {
    match argon2().verify_password(password.as_bytes(), stored) {
        Ok(()) => Ok(true),
        Err(argon2::password_hash::Error::PasswordInvalid) => Ok(false),
        Err(e) => Err(anyhow::anyhow!("stored password hash unusable: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_with_owasp_minimum_parameters() {
        let h = hash_blocking("correct horse battery staple").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_blocking("correct horse battery staple", &h).unwrap());
        assert!(!verify_blocking("wrong", &h).unwrap());
    }
}
