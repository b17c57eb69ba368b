//! Config loading and validation tests.
use super::*;

fn parse(text: &str) -> Result<Snapshot, ConfigError> {
    Snapshot::parse(Path::new("test.yaml"), text)
}

const BASE: &str = r#"
server: { listen: "127.0.0.1:0" }
store: { url: "sqlite://data/test.db" }
projects: { demo: {} }
upstreams:
  api: { url: "http://127.0.0.1:9", forward_key: false, timeout: 2s }
"#;

#[test]
fn embedded_default_is_valid() {
    let snapshot = Snapshot::embedded_default().unwrap();
    assert!(!snapshot.routes.is_empty());
}

#[test]
fn validation_errors_name_file_line_and_key() {
    let text = format!(
        "{BASE}routes:\n  - {{ methods: [GET], path: /a, scopes: [a.read] }}\n  - {{ methods: [GET], path: /b, scopes: [b.read], upstream: nope }}\n"
    );
    let err = parse(&text).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("routes[1].upstream"));
    assert_eq!(err.line, Some(9));
    assert!(err.to_string().starts_with("test.yaml:9:"), "{err}");
    assert!(err.message.contains("nope"));
}

#[test]
fn unknown_fields_are_refused_with_their_line() {
    let text = format!("{BASE}routes:\n  - {{ methods: [GET], path: /a, scope: [a] }}\n");
    let err = parse(&text).unwrap_err();
    assert_eq!(err.line, Some(8), "{err}");
    assert!(err.message.contains("unknown field `scope`"), "{err}");
    assert_eq!(err.key.as_deref(), Some("routes[0]"));
}

#[test]
fn syntax_errors_name_the_line() {
    let err = parse("server: { listen: \"127.0.0.1:0\"\nstore: [").unwrap_err();
    assert!(err.line.is_some(), "{err}");
}

#[test]
fn routes_need_scopes_or_public() {
    let text = format!("{BASE}routes:\n  - {{ methods: [GET], path: /a }}\n");
    assert!(parse(&text).unwrap_err().message.contains("public"));
    let text =
        format!("{BASE}routes:\n  - {{ methods: [GET], path: /a, public: true, scopes: [x] }}\n");
    assert!(parse(&text).is_err());
    let text = format!("{BASE}routes:\n  - {{ methods: [get], path: /a, public: true }}\n");
    assert_eq!(
        parse(&text).unwrap_err().key.as_deref(),
        Some("routes[0].methods[0]")
    );
}

#[test]
fn scopes_known_from_every_source() {
    let text = format!(
        "{BASE}scopes: [extra.scope, locale.read]\nguest_scopes: [locale.read]\nroutes:\n  - {{ methods: [GET], path: /a, scopes: [a.read, a.write] }}\n"
    );
    let snapshot = parse(&text).unwrap();
    for name in [
        "extra.scope",
        "locale.read",
        "a.read",
        "a.write",
        "global",
        "keys.write",
    ] {
        assert!(snapshot.scopes.knows(name), "{name}");
    }
    assert!(!snapshot.scopes.knows("a.reda"));
    assert!(!snapshot.guest_scopes.is_empty());
}

#[test]
fn env_substitution_errors_point_at_the_value() {
    let text = format!(
        "{BASE}keys: {{ ephemeral_secret: \"${{KEYGATE_TEST_UNSET_VARIABLE}}\" }}\nroutes: []\n"
    );
    let err = parse(&text).unwrap_err();
    assert!(err.message.contains("KEYGATE_TEST_UNSET_VARIABLE"), "{err}");
    assert_eq!(err.line, Some(7), "{err}");
}

#[test]
fn json_loads_too() {
    let json = r#"{"server": {"listen": "127.0.0.1:0"}, "store": {"url": "sqlite://x.db"},
        "upstreams": {"a": {"url": "http://127.0.0.1:1"}},
        "routes": [{"methods": ["GET"], "path": "/x/{id}", "scopes": ["x.read"]}]}"#;
    let snapshot = parse(json).unwrap();
    assert_eq!(snapshot.routes.len(), crate::admin::ROUTES.len() + 1);
}

#[test]
fn management_scopes_cannot_be_given_to_guests_or_every_key() {
    let text = format!("{BASE}guest_scopes: [keys.read]\nroutes: []\n");
    assert_eq!(
        parse(&text).unwrap_err().key.as_deref(),
        Some("guest_scopes")
    );
    let text = format!("{BASE}keys: {{ implicit_scopes: [global, keys.write] }}\nroutes: []\n");
    assert_eq!(
        parse(&text).unwrap_err().key.as_deref(),
        Some("keys.implicit_scopes")
    );
}

#[test]
fn ephemeral_keys_need_a_strong_secret() {
    let text = format!("{BASE}keys: {{ ephemeral: true }}\nroutes: []\n");
    if std::env::var(EPHEMERAL_SECRET_ENV).is_err() {
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("no keys.ephemeral_secret"), "{err}");
    }
    let text = format!("{BASE}keys: {{ ephemeral_secret: short }}\nroutes: []\n");
    assert!(parse(&text).unwrap_err().message.contains("at least"));
    let text = format!(
        "{BASE}keys: {{ ephemeral_secret: 0123456789abcdef0123456789abcdef }}\nroutes: []\n"
    );
    assert!(parse(&text).unwrap().ephemeral.is_some());
    let text = format!("{BASE}keys: {{ ephemeral: false, ephemeral_secret: 0123456789abcdef0123456789abcdef }}\nroutes: []\n");
    assert!(parse(&text).unwrap().ephemeral.is_none());
}

#[test]
fn includes_append_routes_and_report_their_own_lines() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("profile.yaml"),
        "guest_scopes: [locale.read]\nscopes: [extra.read, locale.read]\nroutes:\n  - { methods: [GET], path: /a, scopes: [a.read], rate_limit: { limit: 3, window: 60s, key: \"url:{url},ip:{ip}\" } }\n",
    )
    .unwrap();
    let main = dir.path().join("main.yaml");
    let text = format!("include: [profile.yaml]\n{BASE}routes:\n  - {{ methods: [GET], path: /a, public: true }}\n");
    std::fs::write(&main, &text).unwrap();
    let snapshot = Snapshot::load(&main).unwrap();
    // The including file's route comes first and wins for the same pattern.
    let route = snapshot.routes.find(&http::Method::GET, "/a").unwrap();
    assert!(route.public);
    assert!(snapshot.scopes.knows("extra.read") && snapshot.scopes.knows("a.read"));
    assert!(!snapshot.guest_scopes.is_empty());
    assert_eq!(snapshot.files.len(), 2);
    let limited = snapshot
        .routes
        .routes()
        .iter()
        .find(|r| r.rate_limit.is_some())
        .unwrap();
    assert_eq!(limited.rate_limit.as_ref().unwrap().limit, 3);

    std::fs::write(
        dir.path().join("profile.yaml"),
        "routes:\n  - { methods: [GET], path: /a, scopes: [a.read] }\n  - { methods: [GET], path: /b, scopes: [b.read], upstream: nope }\n",
    )
    .unwrap();
    let err = Snapshot::load(&main).unwrap_err();
    assert!(err.file.ends_with("profile.yaml"), "{err}");
    assert_eq!(err.line, Some(3), "{err}");
    std::fs::remove_file(dir.path().join("profile.yaml")).unwrap();
    let err = Snapshot::load(&main).unwrap_err();
    assert!(err.message.contains("included from"), "{err}");
}

#[test]
fn the_appwrite_route_maps_load() {
    for profile in ["appwrite.yaml", "appwrite-1.9.6.yaml"] {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("main.yaml");
        let include = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(profile);
        std::fs::write(&main, format!("include: [{}]\n{BASE}", include.display())).unwrap();
        let snapshot = Snapshot::load(&main).unwrap_or_else(|e| panic!("{profile}: {e}"));
        assert!(snapshot.routes.len() > 700, "{profile}");
        assert!(!snapshot.guest_scopes.is_empty());
    }
}

#[test]
fn granted_scope_typos_are_errors() {
    let text = format!("{BASE}guest_scopes: [locale.raed]\nroutes:\n  - {{ methods: [GET], path: /l, scopes: [locale.read] }}\n");
    let err = parse(&text).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("guest_scopes"), "{err}");
    assert!(err.message.contains("locale.raed"), "{err}");
    let text = format!("{BASE}keys: {{ implicit_scopes: [globl] }}\nroutes: []\n");
    assert_eq!(
        parse(&text).unwrap_err().key.as_deref(),
        Some("keys.implicit_scopes")
    );
    // Declared names and names a route uses are fine; unwritten defaults are simply known.
    let text = format!("{BASE}scopes: [global]\nkeys: {{ implicit_scopes: [global] }}\nguest_scopes: [l.read]\nroutes:\n  - {{ methods: [GET], path: /l, scopes: [l.read] }}\n");
    assert!(parse(&text).is_ok());
    assert!(parse(&format!("{BASE}routes: []\n"))
        .unwrap()
        .scopes
        .knows("graphql"));
}

#[test]
fn the_production_example_loads_with_dev_keys_off() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/production.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(
            "${KEYGATE_DATABASE_URL}",
            "postgres://keygate:pw@127.0.0.1:5432/keygate",
        )
        .replace("${KEYGATE_REDIS_URL}", "redis://127.0.0.1:6379/0")
        .replace(
            "${KEYGATE_EPHEMERAL_SECRET}",
            "0123456789abcdef0123456789abcdef",
        );
    let snapshot = Snapshot::parse(&path, &text).unwrap();
    assert!(!snapshot.dev_keys.enabled);
    assert!(!snapshot.project("main").unwrap().dev_keys);
    assert!(matches!(snapshot.store, StoreUrl::Postgres(_)));
    assert!(
        !format!("{:?}", snapshot.store).contains("pw"),
        "the store password leaked into Debug"
    );
    assert_eq!(
        snapshot.rate_limits.backend,
        LimitBackend::Redis("redis://127.0.0.1:6379/0".into())
    );
    assert!(snapshot.routes.len() > 700);
}

#[test]
fn workers_default_to_the_cpus() {
    let snapshot = parse(&format!("{BASE}routes: []\n")).unwrap();
    assert_eq!(snapshot.server.workers, default_workers());
    assert!(snapshot.server.workers >= 1);

    let three = BASE.replace(
        r#"listen: "127.0.0.1:0" }"#,
        r#"listen: "127.0.0.1:0", workers: 3 }"#,
    );
    let snapshot = parse(&format!("{three}routes: []\n")).unwrap();
    assert_eq!(snapshot.server.workers, 3);

    for bad in ["0", "100000"] {
        let text = BASE.replace(
            r#"listen: "127.0.0.1:0" }"#,
            &format!(r#"listen: "127.0.0.1:0", workers: {bad} }}"#),
        );
        let err = parse(&format!("{text}routes: []\n")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("server.workers"), "{err}");
        assert_eq!(err.line, Some(2), "{err}");
    }
}
