//! API keys: Appwrite's key model, secrets and their digests, the in-memory cache and the
//! durable store behind it.
//!
//! A secret is `standard_` + 256 lowercase hex characters of CSPRNG output. Only its SHA-256
//! digest is ever stored; the plaintext exists in the create response and nowhere else.

pub mod cache;
pub mod ephemeral;
pub mod input;
pub mod scopes;
pub mod store;
pub mod usage;

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

/// The prefix of every standard API key secret.
pub const STANDARD_PREFIX: &str = "standard_";
/// The prefix of ephemeral (JWT) keys.
pub const EPHEMERAL_PREFIX: &str = "ephemeral_";
/// The prefix of dev key secrets.
pub const DEV_PREFIX: &str = "dev_";
const SECRET_RANDOM_BYTES: usize = 128;

/// A plaintext key secret. Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A fresh `standard_` secret from the operating system's CSPRNG.
    pub fn generate() -> Secret {
        Secret::generate_for(KeyKind::Standard)
    }

    /// A fresh secret of a kind: `standard_` or `dev_` + 256 lowercase hex characters.
    pub fn generate_for(kind: KeyKind) -> Secret {
        let mut bytes = [0u8; SECRET_RANDOM_BYTES];
        getrandom::fill(&mut bytes).expect("the operating system's random source failed");
        let prefix = match kind {
            KeyKind::Standard => STANDARD_PREFIX,
            KeyKind::Dev => DEV_PREFIX,
        };
        Secret(format!("{prefix}{}", hex::encode(bytes)))
    }

    /// Wraps a secret given by an operator (an import, a test).
    pub fn from_plaintext(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn digest(&self) -> Digest {
        Digest::of(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// SHA-256 of a secret: what the store and the cache hold.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(secret: &str) -> Digest {
        Digest(Sha256::digest(secret.as_bytes()).into())
    }
}

impl fmt::Debug for Digest {
    // A digest is not a secret, but a short prefix is all a reader of logs ever needs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({}…)", hex::encode(&self.0[..4]))
    }
}

/// True for an Appwrite custom id: 1–36 of `a-zA-Z0-9._-`, not starting with `.`, `_` or `-`.
pub fn is_valid_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 36
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A new id in Appwrite's `unique()` shape: 20 lowercase hex characters, time-ordered.
pub fn unique_id() -> String {
    let now = Utc::now();
    let mut random = [0u8; 4];
    getrandom::fill(&mut random).expect("the operating system's random source failed");
    let random = hex::encode(random);
    format!(
        "{:08x}{:05x}{}",
        now.timestamp(),
        now.timestamp_subsec_micros(),
        &random[..7]
    )
}

/// API keys and dev keys share a model and a store, and are never interchangeable: each is
/// only ever looked up through its own header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeyKind {
    #[default]
    Standard,
    Dev,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Standard => "standard",
            KeyKind::Dev => "dev",
        }
    }

    pub fn parse(s: &str) -> Option<KeyKind> {
        match s {
            "standard" => Some(KeyKind::Standard),
            "dev" => Some(KeyKind::Dev),
            _ => None,
        }
    }
}

/// The secret a rotation replaced, valid until its grace period ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreviousSecret {
    pub digest: Digest,
    pub until: DateTime<Utc>,
}

/// A key's own abuse limit: at most `limit` requests per `window_secs`, on every route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyRateLimit {
    pub limit: u32,
    #[serde(rename = "window")]
    pub window_secs: u32,
}

/// A stored key, as the store returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub project: String,
    pub kind: KeyKind,
    pub name: String,
    pub description: String,
    pub scopes: Vec<String>,
    pub expire: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub accessed_at: Option<DateTime<Utc>>,
    pub sdks: Vec<String>,
    pub digest: Digest,
    pub previous: Option<PreviousSecret>,
    pub rate_limit: Option<KeyRateLimit>,
}

impl KeyRecord {
    /// Appwrite's key model. `secret` is filled only in the response that created the secret.
    pub fn to_model(&self, secret: Option<&Secret>) -> KeyModel {
        KeyModel {
            id: self.id.clone(),
            created_at: format_date(&self.created_at),
            updated_at: format_date(&self.updated_at),
            name: self.name.clone(),
            description: self.description.clone(),
            expire: self.expire.as_ref().map(format_date).unwrap_or_default(),
            scopes: self.scopes.clone(),
            secret: secret.map(|s| s.expose().to_owned()).unwrap_or_default(),
            accessed_at: self
                .accessed_at
                .as_ref()
                .map(format_date)
                .unwrap_or_default(),
            sdks: self.sdks.clone(),
            rate_limit: self.rate_limit,
        }
    }

    /// Appwrite's dev key model (no scopes: a dev key grants none).
    pub fn to_dev_model(&self, secret: Option<&Secret>) -> DevKeyModel {
        DevKeyModel {
            id: self.id.clone(),
            created_at: format_date(&self.created_at),
            updated_at: format_date(&self.updated_at),
            name: self.name.clone(),
            expire: self.expire.as_ref().map(format_date).unwrap_or_default(),
            secret: secret.map(|s| s.expose().to_owned()).unwrap_or_default(),
            accessed_at: self
                .accessed_at
                .as_ref()
                .map(format_date)
                .unwrap_or_default(),
            sdks: self.sdks.clone(),
        }
    }
}

/// The JSON shape Appwrite gives a key.
#[derive(Debug, Clone, Serialize)]
pub struct KeyModel {
    #[serde(rename = "$id")]
    pub id: String,
    #[serde(rename = "$createdAt")]
    pub created_at: String,
    #[serde(rename = "$updatedAt")]
    pub updated_at: String,
    pub name: String,
    pub description: String,
    /// Empty when the key never expires, as Appwrite sends it.
    pub expire: String,
    pub scopes: Vec<String>,
    pub secret: String,
    #[serde(rename = "accessedAt")]
    pub accessed_at: String,
    pub sdks: Vec<String>,
    /// keygate's addition: the key's own abuse limit, when it has one.
    #[serde(rename = "rateLimit", skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<KeyRateLimit>,
}

/// The JSON shape Appwrite gives a dev key.
#[derive(Debug, Clone, Serialize)]
pub struct DevKeyModel {
    #[serde(rename = "$id")]
    pub id: String,
    #[serde(rename = "$createdAt")]
    pub created_at: String,
    #[serde(rename = "$updatedAt")]
    pub updated_at: String,
    pub name: String,
    pub expire: String,
    pub secret: String,
    #[serde(rename = "accessedAt")]
    pub accessed_at: String,
    pub sdks: Vec<String>,
}

/// Appwrite's date format: ISO 8601 with milliseconds and a numeric offset.
pub fn format_date(date: &DateTime<Utc>) -> String {
    date.to_rfc3339_opts(SecondsFormat::Millis, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_have_appwrite_shape_and_never_debug_print() {
        let secret = Secret::generate();
        let hex_part = secret.expose().strip_prefix(STANDARD_PREFIX).unwrap();
        assert_eq!(hex_part.len(), 256);
        assert!(hex_part
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_ne!(secret, Secret::generate());
        assert!(!format!("{secret:?}").contains(hex_part));
        assert!(!format!("{:?}", secret.digest()).contains(&hex::encode(secret.digest().0)));
    }

    #[test]
    fn ids() {
        for ok in ["a", "key.1", "A_b-c", &"x".repeat(36)] {
            assert!(is_valid_id(ok), "{ok}");
        }
        for bad in ["", "_a", "-a", ".a", "a b", "a/b", &"x".repeat(37), "é"] {
            assert!(!is_valid_id(bad), "{bad}");
        }
        let id = unique_id();
        assert_eq!(id.len(), 20);
        assert!(is_valid_id(&id));
    }
}
