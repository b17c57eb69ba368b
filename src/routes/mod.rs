//! The route table: method + normalized path → the most specific matching route.
//!
//! Patterns are `/`-separated segments: literals, `{name}` parameters (one whole segment) and a
//! trailing `**` (zero or more segments). Routes are compiled into a segment trie; at each level a
//! literal beats a parameter, which beats `**`, and among routes with the same pattern the first
//! one declared wins. Matching walks the trie without allocating.

pub mod normalize;

use hashbrown::HashMap;
use std::sync::Arc;

use http::Method;

use crate::admin::Endpoint;
use crate::keys::scopes::ScopeSet;
use crate::limits::RateLimit;

/// Where an allowed request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteTarget {
    /// Forwarded to `Snapshot::upstreams[i]`.
    Upstream(usize),
    /// Answered by keygate's key-management API.
    Admin(Endpoint),
}

/// A compiled route. Indices into [`RouteTable::routes`] are the route ids used in logs.
#[derive(Debug, Clone)]
pub struct Route {
    pub index: usize,
    pub pattern: String,
    pub methods: MethodSet,
    /// Any one of these suffices; empty only for public routes.
    pub scopes: ScopeSet,
    /// The scope names, comma-joined, for error messages.
    pub scope_names: Arc<str>,
    pub public: bool,
    pub target: RouteTarget,
    pub rate_limit: Option<RateLimit>,
    /// Request body size limit in bytes; larger bodies get 413.
    pub max_body: Option<u64>,
    /// For `/v1/projects/{projectId}/…` routes: the path segment that names the project, which
    /// then takes precedence over (and must agree with) `X-Appwrite-Project`.
    pub project_segment: Option<usize>,
}

impl Route {
    /// The project named by the path, for routes that carry one.
    pub fn path_project<'p>(&self, path: &'p str) -> Option<&'p str> {
        let at = self.project_segment?;
        path.strip_prefix('/')?.split('/').nth(at)
    }
}

/// The segment index of `{projectId}` in `/v1/projects/{projectId}/…` patterns.
pub fn project_segment(pattern: &str) -> Option<usize> {
    let mut segments = pattern.strip_prefix('/')?.split('/');
    (segments.next() == Some("v1")
        && segments.next() == Some("projects")
        && segments.next() == Some("{projectId}"))
    .then_some(2)
}

/// A set of HTTP methods as a bitmask; `ANY` matches every method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodSet(u16);

impl MethodSet {
    pub const ANY: MethodSet = MethodSet(u16::MAX);
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];

    pub fn empty() -> MethodSet {
        MethodSet(0)
    }

    fn bit(method: &Method) -> u16 {
        Self::KNOWN
            .iter()
            .position(|m| m == method)
            .map_or(1 << 15, |i| 1 << i)
    }

    /// Parses a method name; `*` means any method. Unknown extension methods are refused so a typo
    /// cannot silently create a route nothing matches.
    pub fn parse(name: &str) -> Option<MethodSet> {
        if name == "*" {
            return Some(MethodSet::ANY);
        }
        Self::KNOWN
            .iter()
            .find(|m| m.as_str() == name)
            .map(|m| MethodSet(Self::bit(m)))
    }

    #[must_use]
    pub fn with(self, other: MethodSet) -> MethodSet {
        MethodSet(self.0 | other.0)
    }

    /// HEAD is served by routes that allow GET, as HTTP intends.
    pub fn allows(&self, method: &Method) -> bool {
        let bit = Self::bit(method);
        self.0 & bit != 0
            || (bit == Self::bit(&Method::HEAD) && self.0 & Self::bit(&Method::GET) != 0)
    }
}

/// A pattern that cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("a path must start with /")]
    NoLeadingSlash,
    #[error("empty segment (`//` or a trailing /)")]
    EmptySegment,
    #[error("`**` may only be the last segment")]
    WildcardNotLast,
    #[error("segment `{0}` is not a literal, a {{param}} or `**`")]
    BadSegment(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
    Wildcard,
}

fn parse_pattern(pattern: &str) -> Result<Vec<Segment>, PatternError> {
    let rest = pattern
        .strip_prefix('/')
        .ok_or(PatternError::NoLeadingSlash)?;
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&str> = rest.split('/').collect();
    let last = parts.len() - 1;
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            if part.is_empty() {
                return Err(PatternError::EmptySegment);
            }
            if *part == "**" {
                return if i == last {
                    Ok(Segment::Wildcard)
                } else {
                    Err(PatternError::WildcardNotLast)
                };
            }
            if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Ok(Segment::Param(name.to_owned()));
                }
                return Err(PatternError::BadSegment((*part).to_owned()));
            }
            // A literal must be what normalization produces, or it could never match.
            match normalize::normalize_path(&format!("/{part}")) {
                Ok(n) if n.len() == part.len() + 1 && !part.contains('*') => {
                    Ok(Segment::Literal((*part).to_owned()))
                }
                _ => Err(PatternError::BadSegment((*part).to_owned())),
            }
        })
        .collect()
}

#[derive(Debug, Default)]
struct Node {
    literals: HashMap<Box<str>, Node>,
    param: Option<Box<Node>>,
    /// Routes whose pattern ends here, in declaration order.
    exact: Vec<usize>,
    /// Routes whose pattern ends with `**` after this node, in declaration order.
    wildcard: Vec<usize>,
}

/// The compiled routes of one config snapshot.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    root: Node,
}

impl RouteTable {
    /// Adds a route; returns its index.
    pub fn push(&mut self, mut route: Route) -> Result<usize, PatternError> {
        let segments = parse_pattern(&route.pattern)?;
        let index = self.routes.len();
        route.index = index;
        let mut node = &mut self.root;
        for segment in segments {
            node = match segment {
                Segment::Literal(lit) => node.literals.entry(lit.into_boxed_str()).or_default(),
                Segment::Param(_) => node.param.get_or_insert_with(Default::default),
                Segment::Wildcard => {
                    node.wildcard.push(index);
                    self.routes.push(route);
                    return Ok(index);
                }
            };
        }
        node.exact.push(index);
        self.routes.push(route);
        Ok(index)
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn get(&self, index: usize) -> Option<&Route> {
        self.routes.get(index)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Finds the route for a normalized path (as produced by [`normalize::normalize_path`]).
    pub fn find(&self, method: &Method, path: &str) -> Option<&Route> {
        let rest = path.strip_prefix('/')?;
        self.walk(&self.root, rest, method).map(|i| &self.routes[i])
    }

    fn first_allowing(&self, candidates: &[usize], method: &Method) -> Option<usize> {
        candidates
            .iter()
            .copied()
            .find(|i| self.routes[*i].methods.allows(method))
    }

    fn walk(&self, node: &Node, rest: &str, method: &Method) -> Option<usize> {
        if rest.is_empty() {
            return self
                .first_allowing(&node.exact, method)
                .or_else(|| self.first_allowing(&node.wildcard, method));
        }
        // Segments are short: a plain byte scan beats a general substring search here.
        let (segment, tail) = match rest.bytes().position(|b| b == b'/') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, ""),
        };
        if let Some(child) = node.literals.get(segment) {
            if let Some(found) = self.walk(child, tail, method) {
                return Some(found);
            }
        }
        if let Some(child) = &node.param {
            if let Some(found) = self.walk(child, tail, method) {
                return Some(found);
            }
        }
        self.first_allowing(&node.wildcard, method)
    }

    /// The value of each `{param}` of a route for a path it matched.
    pub fn params<'p>(&self, route: &Route, path: &'p str) -> Vec<(String, &'p str)> {
        let Ok(segments) = parse_pattern(&route.pattern) else {
            return Vec::new();
        };
        let mut values = path.strip_prefix('/').unwrap_or(path).split('/');
        segments
            .into_iter()
            .map_while(|segment| Some((segment, values.next()?)))
            .filter_map(|(segment, value)| match segment {
                Segment::Param(name) => Some((name, value)),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(patterns: &[(&str, &str)]) -> RouteTable {
        let mut table = RouteTable::default();
        for (methods, pattern) in patterns {
            let methods = methods
                .split(',')
                .map(|m| MethodSet::parse(m).unwrap())
                .fold(MethodSet::empty(), MethodSet::with);
            table
                .push(Route {
                    index: 0,
                    pattern: (*pattern).into(),
                    methods,
                    scopes: ScopeSet::EMPTY,
                    scope_names: "".into(),
                    public: true,
                    target: RouteTarget::Upstream(0),
                    rate_limit: None,
                    max_body: None,
                    project_segment: project_segment(pattern),
                })
                .unwrap();
        }
        table
    }

    fn found(table: &RouteTable, method: Method, path: &str) -> Option<String> {
        table.find(&method, path).map(|r| r.pattern.clone())
    }

    #[test]
    fn literal_beats_param_beats_wildcard() {
        let t = table(&[
            ("GET", "/v1/**"),
            ("GET", "/v1/users/{userId}"),
            ("GET", "/v1/users/me"),
            ("POST", "/v1/users/{userId}"),
        ]);
        assert_eq!(
            found(&t, Method::GET, "/v1/users/me").unwrap(),
            "/v1/users/me"
        );
        assert_eq!(
            found(&t, Method::GET, "/v1/users/42").unwrap(),
            "/v1/users/{userId}"
        );
        assert_eq!(found(&t, Method::GET, "/v1/users/42/x").unwrap(), "/v1/**");
        assert_eq!(
            found(&t, Method::POST, "/v1/users/me").unwrap(),
            "/v1/users/{userId}"
        );
        assert_eq!(found(&t, Method::DELETE, "/v1/users/me"), None);
        assert_eq!(found(&t, Method::GET, "/v2"), None);
        assert_eq!(found(&t, Method::GET, "/v1").unwrap(), "/v1/**");
    }

    #[test]
    fn backtracks_when_method_does_not_match() {
        let t = table(&[("POST", "/v1/users/me"), ("GET", "/v1/users/{userId}")]);
        assert_eq!(
            found(&t, Method::GET, "/v1/users/me").unwrap(),
            "/v1/users/{userId}"
        );
        assert_eq!(
            found(&t, Method::HEAD, "/v1/users/me").unwrap(),
            "/v1/users/{userId}"
        );
    }

    #[test]
    fn first_declared_wins_on_equal_patterns() {
        let mut t = table(&[("GET", "/a/{x}"), ("GET", "/a/{y}")]);
        assert_eq!(t.find(&Method::GET, "/a/1").unwrap().index, 0);
        t = table(&[("*", "/")]);
        assert_eq!(found(&t, Method::PATCH, "/").unwrap(), "/");
    }

    #[test]
    fn params_are_extracted() {
        let t = table(&[(
            "GET",
            "/v1/databases/{databaseId}/collections/{collectionId}",
        )]);
        let route = t
            .find(&Method::GET, "/v1/databases/db1/collections/c2")
            .unwrap();
        let params = t.params(route, "/v1/databases/db1/collections/c2");
        assert_eq!(
            params,
            vec![("databaseId".into(), "db1"), ("collectionId".into(), "c2")]
        );
    }

    #[test]
    fn path_projects() {
        let t = table(&[
            ("GET", "/v1/projects/{projectId}/keys"),
            ("GET", "/v1/project/keys"),
        ]);
        let alias = t.find(&Method::GET, "/v1/projects/p1/keys").unwrap();
        assert_eq!(alias.path_project("/v1/projects/p1/keys"), Some("p1"));
        let plain = t.find(&Method::GET, "/v1/project/keys").unwrap();
        assert_eq!(plain.path_project("/v1/project/keys"), None);
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "v1",
            "/v1//x",
            "/v1/",
            "/**/x",
            "/v1/{}",
            "/v1/{a-b}",
            "/v1/a%2Fb",
            "/v1/..",
            "/v1/a*",
        ] {
            assert!(parse_pattern(bad).is_err(), "{bad}");
        }
    }
}
