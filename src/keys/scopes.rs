//! Scope sets compiled to fixed-size bitsets, and the per-config index from scope name to bit.
//!
//! Scope names are free strings; a config knows a bounded set of them ([`MAX_SCOPES`]), so every
//! set the hot path touches is a `Copy` value of one cache line and the authorization check is a
//! handful of AND instructions.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

const WORDS: usize = 8;
/// The most distinct scope names one config may know.
pub const MAX_SCOPES: usize = WORDS * 64;

#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ScopeSet([u64; WORDS]);

impl ScopeSet {
    pub const EMPTY: ScopeSet = ScopeSet([0; WORDS]);

    fn insert(&mut self, bit: usize) {
        self.0[bit / 64] |= 1 << (bit % 64);
    }

    pub fn contains_bit(&self, bit: usize) -> bool {
        self.0[bit / 64] & (1 << (bit % 64)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    pub fn intersects(&self, other: &ScopeSet) -> bool {
        self.0.iter().zip(other.0.iter()).any(|(a, b)| a & b != 0)
    }

    pub fn is_subset(&self, other: &ScopeSet) -> bool {
        self.0.iter().zip(other.0.iter()).all(|(a, b)| a & !b == 0)
    }

    #[must_use]
    pub fn union(mut self, other: &ScopeSet) -> ScopeSet {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a |= b;
        }
        self
    }

    fn bits(&self) -> impl Iterator<Item = usize> + '_ {
        (0..MAX_SCOPES).filter(|bit| self.contains_bit(*bit))
    }
}

impl fmt::Debug for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.bits()).finish()
    }
}

/// A scope name the config does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope `{0}`")]
pub struct UnknownScope(pub String);

/// Maps the scope names one config knows to bit positions. Built once per config snapshot.
///
/// A reloaded config's index starts from the previous one ([`ScopeIndex::succeeding`]): a name
/// keeps its bit for the life of the process, so scope sets compiled under the old config (the
/// key cache's) never change meaning. Names the new config no longer knows keep their bit but
/// leave the `current` mask, so they can neither be granted nor required.
#[derive(Debug, Clone, Default)]
pub struct ScopeIndex {
    names: Vec<Arc<str>>,
    bits: HashMap<Arc<str>, usize>,
    current: ScopeSet,
}

impl ScopeIndex {
    /// An empty index for the next config, keeping every bit `previous` assigned.
    pub fn succeeding(previous: &ScopeIndex) -> ScopeIndex {
        ScopeIndex {
            names: previous.names.clone(),
            bits: previous.bits.clone(),
            current: ScopeSet::EMPTY,
        }
    }

    /// Registers a name, returning `None` when the index is full.
    pub(crate) fn register(&mut self, name: &str) -> Option<usize> {
        let bit = match self.bits.get(name) {
            Some(bit) => *bit,
            None => {
                if self.names.len() == MAX_SCOPES {
                    return None;
                }
                let name: Arc<str> = Arc::from(name);
                let bit = self.names.len();
                self.names.push(name.clone());
                self.bits.insert(name, bit);
                bit
            }
        };
        self.current.insert(bit);
        Some(bit)
    }

    /// True when this index assigned bits that the previous one did not have: sets compiled
    /// under the previous index may lack them and should be compiled again.
    pub fn grew_since(&self, previous: &ScopeIndex) -> bool {
        self.names.len() > previous.names.len()
    }

    /// Number of scope names this config knows.
    pub fn len(&self) -> usize {
        self.names().count()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    pub fn knows(&self, name: &str) -> bool {
        self.bits
            .get(name)
            .is_some_and(|bit| self.current.contains_bit(*bit))
    }

    /// Every scope name this config knows, in the order the configs introduced them.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names
            .iter()
            .enumerate()
            .filter(|(bit, _)| self.current.contains_bit(*bit))
            .map(|(_, n)| &**n)
    }

    /// Compiles names into a set; a name this config does not know is an error.
    pub fn compile<'a, I>(&self, names: I) -> Result<ScopeSet, UnknownScope>
    where
        I: IntoIterator<Item = &'a str>,
    {
        let mut set = ScopeSet::EMPTY;
        for name in names {
            match self.bits.get(name) {
                Some(bit) if self.current.contains_bit(*bit) => set.insert(*bit),
                _ => return Err(UnknownScope(name.to_owned())),
            }
        }
        Ok(set)
    }

    /// Compiles names into a set, dropping names the config no longer knows: a stored key keeps
    /// working for the scopes that still exist, and an unknown name can never grant anything.
    pub fn compile_known<'a, I>(&self, names: I) -> ScopeSet
    where
        I: IntoIterator<Item = &'a str>,
    {
        let mut set = ScopeSet::EMPTY;
        for name in names {
            if let Some(bit) = self.bits.get(name) {
                set.insert(*bit);
            }
        }
        set
    }

    /// The names in a set, in index order.
    pub fn names_of(&self, set: &ScopeSet) -> Vec<&str> {
        self.names
            .iter()
            .enumerate()
            .filter(|(bit, _)| set.contains_bit(*bit))
            .map(|(_, n)| &**n)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(names: &[&str]) -> ScopeIndex {
        let mut index = ScopeIndex::default();
        for n in names {
            index.register(n).unwrap();
        }
        index
    }

    #[test]
    fn any_of_semantics() {
        let index = index(&["users.read", "users.write", "files.read"]);
        let route = index.compile(["users.read", "users.write"]).unwrap();
        let reader = index.compile(["users.read"]).unwrap();
        let files = index.compile(["files.read"]).unwrap();
        assert!(route.intersects(&reader));
        assert!(!route.intersects(&files));
        assert!(reader.is_subset(&route));
        assert!(!route.is_subset(&reader));
        assert_eq!(index.names_of(&route.union(&files)).len(), 3);
    }

    #[test]
    fn unknown_names_are_errors_or_ignored() {
        let index = index(&["a"]);
        assert_eq!(index.compile(["b"]), Err(UnknownScope("b".into())));
        assert!(index.compile_known(["b"]).is_empty());
    }

    #[test]
    fn succeeding_indexes_keep_bits_and_forget_names() {
        let old = index(&["a", "b"]);
        let a_before = old.compile(["a"]).unwrap();
        let mut new = ScopeIndex::succeeding(&old);
        new.register("c");
        new.register("a");
        assert_eq!(new.compile(["a"]).unwrap(), a_before);
        assert!(!new.knows("b"));
        assert!(new.compile(["b"]).is_err());
        assert_eq!(new.names().collect::<Vec<_>>(), vec!["a", "c"]);
        assert!(new.grew_since(&old));
        let mut same = ScopeIndex::succeeding(&new);
        same.register("a");
        assert!(!same.grew_since(&new));
    }

    #[test]
    fn index_is_bounded_and_last_bit_works() {
        let mut index = ScopeIndex::default();
        for i in 0..MAX_SCOPES {
            index.register(&format!("s{i}")).unwrap();
        }
        assert_eq!(index.register("one-more"), None);
        let last = index
            .compile([format!("s{}", MAX_SCOPES - 1).as_str()])
            .unwrap();
        assert!(last.contains_bit(MAX_SCOPES - 1));
        assert!(!last.intersects(&index.compile(["s0"]).unwrap()));
    }
}
