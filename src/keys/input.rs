//! Validation of key fields, shared by every way of writing a key (CLI and API), with
//! Appwrite's limits.

use chrono::{DateTime, Utc};

use crate::config::Snapshot;

pub const NAME_MAX: usize = 128;
pub const DESCRIPTION_MAX: usize = 1024;
pub const SCOPES_MAX: usize = 200;

/// A key's editable fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInput {
    pub name: String,
    pub description: String,
    pub scopes: Vec<String>,
    pub expire: Option<DateTime<Utc>>,
}

/// Why key fields were refused; the message is safe to show to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

impl KeyInput {
    /// Checks limits and that every scope is one the config knows; removes duplicate scopes.
    pub fn validate(mut self, snapshot: &Snapshot) -> Result<KeyInput, InputError> {
        let name_len = self.name.chars().count();
        if name_len == 0 || name_len > NAME_MAX {
            return Err(InputError(format!("name must be 1-{NAME_MAX} characters")));
        }
        if self.description.chars().count() > DESCRIPTION_MAX {
            return Err(InputError(format!(
                "description must be at most {DESCRIPTION_MAX} characters"
            )));
        }
        if self.scopes.len() > SCOPES_MAX {
            return Err(InputError(format!("at most {SCOPES_MAX} scopes")));
        }
        let unknown: Vec<&str> = self
            .scopes
            .iter()
            .map(String::as_str)
            .filter(|s| !snapshot.scopes.knows(s))
            .collect();
        if !unknown.is_empty() {
            return Err(InputError(format!(
                "unknown scopes: {} (a key may hold only scopes the config knows)",
                unknown.join(", ")
            )));
        }
        let mut seen = std::collections::HashSet::new();
        self.scopes.retain(|s| seen.insert(s.clone()));
        Ok(self)
    }
}

/// Resolves a requested key id: Appwrite's `unique()` or a valid custom id.
pub fn key_id(requested: Option<&str>) -> Result<String, InputError> {
    match requested {
        None | Some("unique()") => Ok(super::unique_id()),
        Some(id) if super::is_valid_id(id) => Ok(id.to_owned()),
        Some(_) => Err(InputError(
            "keyId must be 1-36 characters of a-z A-Z 0-9 . _ - and must not start with . _ or -"
                .into(),
        )),
    }
}

/// Parses an ISO 8601 / RFC 3339 date, as the API and the CLI accept it.
pub fn parse_expire(value: &str) -> Result<DateTime<Utc>, InputError> {
    DateTime::parse_from_rfc3339(value)
        .map(|d| d.with_timezone(&Utc))
        .map_err(|_| {
            InputError(format!(
                "`{value}` is not an ISO 8601 date such as 2030-01-31T00:00:00Z"
            ))
        })
}
