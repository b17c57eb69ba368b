//! The generated Appwrite route maps (config/appwrite.yaml, config/appwrite-1.9.6.yaml) against
//! the reference data they come from: the committed YAML is fresh, and the pure authorization
//! decision enforces each route's scopes exactly as reference/appwrite/routes.tsv lists them
//! (any one scope suffices, keys also hold the implicit scopes, guests hold the guests role).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use chrono::Utc;
use http::{HeaderMap, HeaderValue, Method, Uri};

use keygate::auth::decide;
use keygate::config::Snapshot;
use keygate::error::Rejection;
use keygate::keys::cache::KeyCache;
use keygate::keys::{KeyKind, KeyRecord, Secret};

const PROJECT: &str = "demo";
const IMPLICIT: [&str; 3] = ["global", "health.read", "graphql"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One row of a routes TSV.
#[derive(Debug, Clone)]
struct Row {
    line: usize,
    method: String,
    path: String,
    scopes: Vec<String>,
    service: String,
}

impl Row {
    fn label(&self) -> String {
        format!(
            "{} {} (line {}, scopes {})",
            self.method,
            self.path,
            self.line,
            self.scopes.join(",")
        )
    }
}

fn split_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn read_routes(rel: &str) -> Vec<Row> {
    let text = std::fs::read_to_string(root().join(rel)).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("a header line").split('\t').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("{rel}: no `{name}` column in {header:?}"))
    };
    let (method, path, scopes, service) =
        (col("method"), col("path"), col("scopes"), col("service"));
    lines
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            let fields: Vec<&str> = l.split('\t').collect();
            assert_eq!(fields.len(), header.len(), "{rel}:{}", i + 2);
            Row {
                line: i + 2,
                method: fields[method].to_owned(),
                path: fields[path].to_owned(),
                scopes: split_list(fields[scopes]),
                service: fields[service].to_owned(),
            }
        })
        .collect()
}

/// Appwrite's `guests` role, from roles.tsv.
fn guest_scopes() -> HashSet<String> {
    let text = std::fs::read_to_string(root().join("reference/appwrite/roles.tsv")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("guests\t"))
        .expect("a guests row in roles.tsv");
    split_list(line.split('\t').nth(1).unwrap())
        .into_iter()
        .collect()
}

/// Routes keygate serves itself (key management, dev keys): not part of the forwarded map.
fn is_builtin(path: &str) -> bool {
    path == "/v1/project/keys"
        || path.starts_with("/v1/project/keys/")
        || path == "/v1/projects/{projectId}/keys"
        || path.starts_with("/v1/projects/{projectId}/keys/")
        || path == "/v1/projects/{projectId}/jwts"
        || path == "/v1/projects/{projectId}/dev-keys"
        || path.starts_with("/v1/projects/{projectId}/dev-keys/")
}

/// A concrete request path: every `{param}` becomes `p1`, and the project of
/// `/v1/projects/{projectId}/…` routes is the test project.
fn concrete(pattern: &str) -> String {
    let under_project =
        pattern == "/v1/projects/{projectId}" || pattern.starts_with("/v1/projects/{projectId}/");
    pattern
        .split('/')
        .enumerate()
        .map(|(i, segment)| {
            if !segment.starts_with('{') {
                segment
            } else if under_project && i == 3 {
                PROJECT
            } else {
                "p1"
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// A snapshot over one generated route map (by absolute path), plus a key cache.
struct Fixture {
    _dir: tempfile::TempDir,
    snapshot: Snapshot,
    cache: KeyCache,
}

fn test_config(include: &Path, db: &Path) -> String {
    format!(
        r#"include: ["{include}"]
server: {{ listen: "127.0.0.1:0" }}
store: {{ url: "sqlite://{db}" }}
projects: {{ demo: {{}} }}
keys: {{ implicit_scopes: [global, health.read, graphql], ephemeral: false }}
upstreams:
  appwrite: {{ url: "http://127.0.0.1:9", forward_key: true, timeout: 5s }}
"#,
        include = include.display(),
        db = db.display()
    )
}

fn write_config(map: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let include = root().join("config").join(map);
    std::fs::write(&path, test_config(&include, &dir.path().join("keys.db"))).unwrap();
    (dir, path)
}

impl Fixture {
    fn new(map: &str) -> Fixture {
        let (dir, path) = write_config(map);
        let snapshot = Snapshot::load(&path).unwrap_or_else(|e| panic!("{map}: {e}"));
        Fixture {
            _dir: dir,
            snapshot,
            cache: KeyCache::new(),
        }
    }

    /// A fresh key of the test project holding exactly `scopes`; returns its secret.
    fn key(&self, scopes: &[&str]) -> Secret {
        let secret = Secret::generate();
        let now = Utc::now();
        let record = KeyRecord {
            id: keygate::keys::unique_id(),
            project: PROJECT.into(),
            kind: KeyKind::Standard,
            name: "appwrite-routes".into(),
            description: String::new(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            expire: None,
            created_at: now,
            updated_at: now,
            accessed_at: None,
            sdks: vec![],
            digest: secret.digest(),
            previous: None,
            rate_limit: None,
        };
        self.cache.upsert(&record, &self.snapshot.scopes);
        secret
    }

    /// The pattern of the route the table finds for `row` (asserting it is the row's own).
    fn assert_matches_row(&self, row: &Row) {
        let method = Method::from_bytes(row.method.as_bytes()).unwrap();
        let path = concrete(&row.path);
        let found = self.snapshot.routes.find(&method, &path);
        let pattern = found.map(|r| r.pattern.as_str());
        assert_eq!(
            pattern,
            Some(row.path.as_str()),
            "{}: {path} matched another route than the row's own",
            row.label()
        );
    }

    /// Decides `row`'s request for a guest (`None`) or a key holding exactly these scopes.
    fn decide(&self, row: &Row, key_scopes: Option<&[&str]>) -> Result<(), Rejection> {
        let method = Method::from_bytes(row.method.as_bytes()).unwrap();
        let uri: Uri = concrete(&row.path).parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-appwrite-project", HeaderValue::from_static(PROJECT));
        if let Some(scopes) = key_scopes {
            let secret = self.key(scopes);
            headers.insert(
                "x-appwrite-key",
                HeaderValue::from_str(secret.expose()).unwrap(),
            );
        }
        let now = Utc::now().timestamp();
        decide(&self.snapshot, &self.cache, &method, &uri, &headers, now).map(|decision| {
            assert_eq!(
                decision.route.pattern,
                row.path,
                "{}: decide matched another route",
                row.label()
            );
        })
    }
}

#[track_caller]
fn expect(row: &Row, who: &str, result: Result<(), Rejection>, allowed: bool) {
    match (&result, allowed) {
        (Ok(()), true) | (Err(Rejection::MissingScope { .. }), false) => {}
        _ => panic!(
            "{}: {who}: expected {}, got {result:?}",
            row.label(),
            if allowed { "Ok" } else { "MissingScope" }
        ),
    }
}

/// A scope held by the key of the "no scope" case: on none of the row's scopes, not implicit.
fn unrelated_scope(row: &Row) -> &'static str {
    ["locale.read", "avatars.read", "users.read", "webhooks.read"]
        .into_iter()
        .find(|s| !row.scopes.iter().any(|r| r == s))
        .unwrap()
}

/// Checks one row against a map: each listed scope alone is enough, a key holding none of them
/// is refused (unless an implicit scope is listed), and guests pass exactly when the row lists
/// a guests-role scope.
fn check_row(fixture: &Fixture, row: &Row, guests: &HashSet<String>) {
    fixture.assert_matches_row(row);
    for scope in &row.scopes {
        expect(
            row,
            &format!("key holding only {scope}"),
            fixture.decide(row, Some(&[scope.as_str()])),
            true,
        );
    }
    let other = unrelated_scope(row);
    let implicit_listed = row.scopes.iter().any(|s| IMPLICIT.contains(&s.as_str()));
    expect(
        row,
        &format!("key holding only {other} (plus the implicit scopes)"),
        fixture.decide(row, Some(&[other])),
        implicit_listed,
    );
    let guest_allowed = row.scopes.iter().any(|s| guests.contains(s));
    expect(row, "guest", fixture.decide(row, None), guest_allowed);
}

#[test]
fn generated_route_maps_are_up_to_date() {
    let output = Command::new("python3")
        .arg("scripts/gen_appwrite_routes.py")
        .arg("--check")
        .current_dir(root())
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "config/appwrite*.yaml are stale; run python3 scripts/gen_appwrite_routes.py\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every 7th row, every row with several scopes, and the first row of each service, in TSV
/// order, without keygate's built-in routes.
fn sample_rows(rows: &[Row]) -> Vec<Row> {
    let mut services = HashSet::new();
    rows.iter()
        .enumerate()
        .filter(|(i, row)| {
            let first_of_service = services.insert(row.service.clone());
            i % 7 == 0 || row.scopes.len() > 1 || first_of_service
        })
        .map(|(_, row)| row)
        .filter(|row| !is_builtin(&row.path))
        .cloned()
        .collect()
}

#[test]
fn appwrite_map_enforces_the_reference_scopes() {
    let rows = read_routes("reference/appwrite/routes.tsv");
    assert!(rows.len() > 700, "routes.tsv has {} rows", rows.len());
    let sample = sample_rows(&rows);
    let services: BTreeSet<&str> = sample.iter().map(|r| r.service.as_str()).collect();
    let several = sample.iter().filter(|r| r.scopes.len() > 1).count();
    assert!(sample.len() >= 60, "only {} rows sampled", sample.len());
    assert!(services.len() >= 10, "only services {services:?}");
    assert!(several >= 10, "only {several} rows with several scopes");

    let guests = guest_scopes();
    assert!(guests.contains("documents.read") && !guests.contains("users.read"));
    let fixture = Fixture::new("appwrite.yaml");
    for row in &sample {
        check_row(&fixture, row, &guests);
    }
    eprintln!(
        "checked {} rows ({several} with several scopes) across {} services: {services:?}",
        sample.len(),
        services.len()
    );
}

#[test]
fn builtin_key_routes_require_key_scopes_on_the_appwrite_map() {
    let fixture = Fixture::new("appwrite.yaml");
    let guests = guest_scopes();
    for (method, path, scope) in [
        ("GET", "/v1/project/keys", "keys.read"),
        ("POST", "/v1/project/keys", "keys.write"),
        ("GET", "/v1/projects/{projectId}/keys/{keyId}", "keys.read"),
        ("POST", "/v1/projects/{projectId}/jwts", "keys.write"),
    ] {
        let row = Row {
            line: 0,
            method: method.into(),
            path: path.into(),
            scopes: vec![scope.into()],
            service: "keygate".into(),
        };
        check_row(&fixture, &row, &guests);
    }
}

#[test]
fn appwrite_1_9_6_map_enforces_its_own_scopes() {
    let main: BTreeMap<(String, String), Row> = read_routes("reference/appwrite/routes.tsv")
        .into_iter()
        .map(|r| ((r.method.clone(), r.path.clone()), r))
        .collect();
    let differing: Vec<(Row, Row)> = read_routes("reference/appwrite/routes-1.9.6.tsv")
        .into_iter()
        .filter(|old| !is_builtin(&old.path))
        .filter_map(|old| {
            let new = main.get(&(old.method.clone(), old.path.clone()))?;
            let (a, b): (BTreeSet<_>, BTreeSet<_>) =
                (old.scopes.iter().collect(), new.scopes.iter().collect());
            (a != b).then(|| (old, new.clone()))
        })
        .collect();
    assert!(
        differing.len() >= 5,
        "only {} rows differ between routes.tsv and routes-1.9.6.tsv",
        differing.len()
    );

    let guests = guest_scopes();
    let v196 = Fixture::new("appwrite-1.9.6.yaml");
    let current = Fixture::new("appwrite.yaml");
    for (old, new) in &differing {
        check_row(&v196, old, &guests);
        check_row(&current, new, &guests);
        // A key holding only what main added is refused by the 1.9.6 map, and vice versa.
        for (fixture, row, other, map) in [(&v196, old, new, "1.9.6"), (&current, new, old, "main")]
        {
            let only_other: Vec<&str> = other
                .scopes
                .iter()
                .filter(|s| !row.scopes.contains(s))
                .map(String::as_str)
                .collect();
            if only_other.is_empty() || row.scopes.iter().any(|s| IMPLICIT.contains(&s.as_str())) {
                continue;
            }
            expect(
                row,
                &format!("{map} map, key holding only {only_other:?}"),
                fixture.decide(row, Some(&only_other)),
                false,
            );
        }
    }
    eprintln!("checked {} rows that differ in 1.9.6", differing.len());
}

#[test]
fn routes_explain_on_the_appwrite_map() {
    let (_dir, config) = write_config("appwrite.yaml");
    let output = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("routes")
        .arg("explain")
        .arg("--config")
        .arg(&config)
        .args(["GET", "/v1/databases/db1/collections/c1/documents"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    assert_eq!(json["matched"], true, "{json}");
    assert_eq!(
        json["path"], "/v1/databases/{databaseId}/collections/{collectionId}/documents",
        "{json}"
    );
    let scopes: Vec<&str> = json["scopes"]
        .as_array()
        .unwrap_or_else(|| panic!("no scopes: {json}"))
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert!(scopes.contains(&"documents.read"), "{json}");
}
