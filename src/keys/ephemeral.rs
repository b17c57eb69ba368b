//! Ephemeral keys: `ephemeral_` + an HS256 JWT `{projectId, scopes, exp}`, verified statelessly
//! on the request path. They are never stored, so they cannot be revoked before they expire;
//! their lifetime is capped at an hour for that reason.

use std::fmt;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::scopes::{ScopeIndex, ScopeSet};
use super::{Secret, EPHEMERAL_PREFIX};
use crate::error::Rejection;

/// Shortest and longest lifetime a caller may ask for, in seconds.
pub const DURATION_MIN: i64 = 1;
pub const DURATION_MAX: i64 = 3600;
/// A signing secret shorter than this is refused at config load.
pub const SECRET_MIN_LEN: usize = 32;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    #[serde(rename = "projectId")]
    project_id: String,
    scopes: Vec<String>,
    exp: i64,
}

/// A verified ephemeral key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EphemeralKey {
    pub project: String,
    pub scopes: ScopeSet,
    pub scope_names: Vec<String>,
    /// Expiry, Unix seconds.
    pub exp: i64,
}

/// Signs and verifies ephemeral keys with the configured secret.
pub struct EphemeralSigner {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for EphemeralSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EphemeralSigner(<redacted>)")
    }
}

impl EphemeralSigner {
    pub fn new(secret: &[u8]) -> EphemeralSigner {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked by `verify` itself, to tell an expired key from a forged one and to
        // refuse a key from its `exp` on, with no leeway.
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        EphemeralSigner {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Mints a key. The caller has already checked the scopes and lifetime.
    pub fn mint(&self, project: &str, scopes: &[String], exp: i64) -> Secret {
        let claims = Claims {
            project_id: project.to_owned(),
            scopes: scopes.to_vec(),
            exp,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing of plain claims cannot fail");
        Secret::from_plaintext(format!("{EPHEMERAL_PREFIX}{token}"))
    }

    /// Verifies a full `ephemeral_…` secret. Forged, malformed or foreign tokens are unknown
    /// keys; a genuine token past its `exp` is an expired key.
    pub fn verify(
        &self,
        secret: &str,
        index: &ScopeIndex,
        now: i64,
    ) -> Result<EphemeralKey, Rejection> {
        let token = secret
            .strip_prefix(EPHEMERAL_PREFIX)
            .ok_or(Rejection::UnknownKey)?;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| Rejection::UnknownKey)?
            .claims;
        if now >= claims.exp {
            return Err(Rejection::KeyExpired);
        }
        Ok(EphemeralKey {
            scopes: index.compile_known(claims.scopes.iter().map(String::as_str)),
            project: claims.project_id,
            scope_names: claims.scopes,
            exp: claims.exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> ScopeIndex {
        let mut index = ScopeIndex::default();
        index.register("users.read");
        index
    }

    #[test]
    fn round_trip_expiry_and_tampering() {
        let signer = EphemeralSigner::new(b"0123456789abcdef0123456789abcdef");
        let now = 1_700_000_000;
        let key = signer.mint("demo", &["users.read".into()], now + 60);
        assert!(key.expose().starts_with("ephemeral_"));
        let verified = signer.verify(key.expose(), &index(), now).unwrap();
        assert_eq!(verified.project, "demo");
        assert_eq!(verified.scopes, index().compile(["users.read"]).unwrap());
        assert_eq!(
            signer.verify(key.expose(), &index(), now + 60),
            Err(Rejection::KeyExpired)
        );
        assert!(signer.verify(key.expose(), &index(), now + 59).is_ok());

        // Another secret, a flipped payload byte, a stripped signature, `alg: none`.
        let other = EphemeralSigner::new(b"another-secret-another-secret-xx");
        assert_eq!(
            other.verify(key.expose(), &index(), now),
            Err(Rejection::UnknownKey)
        );
        let token = key.expose().strip_prefix("ephemeral_").unwrap();
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let mut payload = parts[1].clone().into_bytes();
        payload[5] ^= 1;
        parts[1] = String::from_utf8(payload).unwrap();
        let tampered = format!("ephemeral_{}", parts.join("."));
        assert_eq!(
            signer.verify(&tampered, &index(), now),
            Err(Rejection::UnknownKey)
        );
        let unsigned = format!(
            "ephemeral_{}.{}.",
            "eyJhbGciOiJub25lIn0",
            token.split('.').nth(1).unwrap()
        );
        assert_eq!(
            signer.verify(&unsigned, &index(), now),
            Err(Rejection::UnknownKey)
        );
        assert_eq!(
            signer.verify("ephemeral_garbage", &index(), now),
            Err(Rejection::UnknownKey)
        );
    }
}
