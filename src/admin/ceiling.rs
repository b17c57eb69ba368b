//! The delegation ceiling, in one place: a key may grant, and manage, only what it holds itself.
//!
//! - requested scopes ⊆ the caller's scopes (implicit scopes included: every key has them anyway);
//! - requested expiry ≤ the caller's expiry (no expiry counts as the latest possible);
//! - the caller may touch only keys whose scopes ⊆ its own, and may rotate only keys that
//!   expire no later than it does (a rotation hands out the target's secret);
//! - same project (enforced by the decision before any of this runs).
//!
//! A request beyond the ceiling is refused whole, never narrowed. The CLI does not pass through
//! here: the operator on the store is the root of trust.

use crate::error::Rejection;
use crate::keys::scopes::{ScopeIndex, ScopeSet};
use crate::keys::{KeyRateLimit, KeyRecord};

/// What the calling key holds.
#[derive(Debug, Clone, Copy)]
pub struct Ceiling {
    pub scopes: ScopeSet,
    /// Unix seconds; `None` never expires.
    pub expire: Option<i64>,
    /// The caller's own abuse limit: a key it makes may not run faster.
    pub rate_limit: Option<KeyRateLimit>,
}

impl Ceiling {
    /// Checks a grant of `scopes` until `expire` (Unix seconds, `None` = never).
    pub fn check_grant(
        &self,
        index: &ScopeIndex,
        scopes: &[String],
        expire: Option<i64>,
    ) -> Result<(), Rejection> {
        let beyond: Vec<&str> = scopes
            .iter()
            .map(String::as_str)
            .filter(|name| !self.holds(index, name))
            .collect();
        if !beyond.is_empty() {
            return Err(Rejection::ScopesExceeded(beyond.join(", ")));
        }
        self.check_expire(expire)
    }

    /// Checks the abuse limit of a key the caller makes: a limited caller may only make keys
    /// limited at the same rate or slower.
    pub fn check_rate(&self, requested: Option<KeyRateLimit>) -> Result<(), Rejection> {
        let Some(own) = self.rate_limit else {
            return Ok(());
        };
        match requested {
            // limit/window ≤ own.limit/own.window, without division.
            Some(r)
                if u64::from(r.limit) * u64::from(own.window_secs)
                    <= u64::from(own.limit) * u64::from(r.window_secs) =>
            {
                Ok(())
            }
            _ => Err(Rejection::RateLimitExceedsCaller),
        }
    }

    /// Checks that the caller may update or delete `target`.
    pub fn check_target(&self, index: &ScopeIndex, target: &KeyRecord) -> Result<(), Rejection> {
        // A scope the config no longer knows cannot be proven to be held: refuse.
        if target.scopes.iter().all(|name| self.holds(index, name)) {
            Ok(())
        } else {
            Err(Rejection::TargetForbidden)
        }
    }

    /// Checks that the caller may rotate `target`: manage it, and hold a secret at least as
    /// long-lived as the one it would receive.
    pub fn check_rotate(&self, index: &ScopeIndex, target: &KeyRecord) -> Result<(), Rejection> {
        self.check_target(index, target)?;
        self.check_expire(target.expire.map(|e| e.timestamp()))
            .map_err(|_| Rejection::TargetForbidden)
    }

    fn holds(&self, index: &ScopeIndex, name: &str) -> bool {
        index
            .compile([name])
            .is_ok_and(|set| set.is_subset(&self.scopes))
    }

    fn check_expire(&self, expire: Option<i64>) -> Result<(), Rejection> {
        match (self.expire, expire) {
            (None, _) => Ok(()),
            (Some(own), Some(requested)) if requested <= own => Ok(()),
            _ => Err(Rejection::ExpireExceeded),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{Digest, KeyKind};
    use chrono::{TimeZone, Utc};

    fn index() -> ScopeIndex {
        let mut index = ScopeIndex::default();
        for name in ["a", "b", "c"] {
            index.register(name);
        }
        index
    }

    fn target(scopes: &[&str], expire: Option<i64>) -> KeyRecord {
        KeyRecord {
            id: "t".into(),
            project: "p".into(),
            kind: KeyKind::Standard,
            name: "t".into(),
            description: String::new(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            expire: expire.map(|e| Utc.timestamp_opt(e, 0).unwrap()),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            accessed_at: None,
            sdks: vec![],
            digest: Digest([0; 32]),
            previous: None,
            rate_limit: None,
        }
    }

    #[test]
    fn grants_within_and_beyond() {
        let index = index();
        let ceiling = Ceiling {
            scopes: index.compile(["a", "b"]).unwrap(),
            expire: Some(1000),
            rate_limit: None,
        };
        assert!(ceiling
            .check_grant(&index, &["a".into()], Some(1000))
            .is_ok());
        assert_eq!(
            ceiling.check_grant(&index, &["a".into(), "c".into()], Some(10)),
            Err(Rejection::ScopesExceeded("c".into()))
        );
        assert_eq!(
            ceiling.check_grant(&index, &[], Some(1001)),
            Err(Rejection::ExpireExceeded)
        );
        assert_eq!(
            ceiling.check_grant(&index, &[], None),
            Err(Rejection::ExpireExceeded)
        );
        let forever = Ceiling {
            expire: None,
            ..ceiling
        };
        assert!(forever.check_grant(&index, &[], None).is_ok());
    }

    #[test]
    fn rates() {
        let limited = Ceiling {
            scopes: ScopeSet::EMPTY,
            expire: None,
            rate_limit: Some(KeyRateLimit {
                limit: 10,
                window_secs: 60,
            }),
        };
        let rate = |limit, window_secs| Some(KeyRateLimit { limit, window_secs });
        assert!(limited.check_rate(rate(10, 60)).is_ok());
        assert!(limited.check_rate(rate(1, 60)).is_ok());
        assert!(limited.check_rate(rate(20, 120)).is_ok());
        assert!(limited.check_rate(rate(11, 60)).is_err());
        assert!(limited.check_rate(None).is_err());
        let free = Ceiling {
            rate_limit: None,
            ..limited
        };
        assert!(free.check_rate(None).is_ok());
    }

    #[test]
    fn targets() {
        let index = index();
        let ceiling = Ceiling {
            scopes: index.compile(["a", "b"]).unwrap(),
            expire: Some(1000),
            rate_limit: None,
        };
        assert!(ceiling.check_target(&index, &target(&["a"], None)).is_ok());
        assert_eq!(
            ceiling.check_target(&index, &target(&["a", "c"], None)),
            Err(Rejection::TargetForbidden)
        );
        assert_eq!(
            ceiling.check_target(&index, &target(&["unknown"], None)),
            Err(Rejection::TargetForbidden)
        );
        assert!(ceiling
            .check_rotate(&index, &target(&["a"], Some(999)))
            .is_ok());
        assert_eq!(
            ceiling.check_rotate(&index, &target(&["a"], None)),
            Err(Rejection::TargetForbidden)
        );
    }
}
