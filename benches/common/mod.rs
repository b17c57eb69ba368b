//! What both benches set up: keygate's Appwrite gateway config.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Writes `dir/keygate.yaml`: the whole Appwrite route map included, project `demo`, one upstream
/// (`http://127.0.0.1:9`, nothing listens there), ephemeral keys on, the store at `db`, the public
/// listener on `listen` and, when given, an ops listener on `ops`.
pub fn write_appwrite_config(
    dir: &Path,
    db: &Path,
    listen: SocketAddr,
    ops: Option<SocketAddr>,
) -> PathBuf {
    let include = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/appwrite.yaml");
    let ops = ops.map_or_else(String::new, |ops| format!("ops: {{ listen: \"{ops}\" }}\n"));
    let path = dir.join("keygate.yaml");
    std::fs::write(
        &path,
        format!(
            r#"include: ["{include}"]
server: {{ listen: "{listen}" }}
{ops}store: {{ url: "sqlite://{db}" }}
projects:
  demo: {{}}
keys:
  implicit_scopes: [global, health.read, graphql]
  ephemeral_secret: "bench-ephemeral-secret-0123456789abcdef"
upstreams:
  appwrite: {{ url: "http://127.0.0.1:9", forward_key: true, timeout: 30s }}
routes: []
"#,
            include = include.display(),
            db = db.display(),
        ),
    )
    .unwrap();
    path
}
