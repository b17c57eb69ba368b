//! Command-line interface: `serve`, `keys …`, `config check`, `routes explain`,
//! `sample-upstream`. Commands on keys work directly on the store the config names; the operator
//! running them is the root of trust.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use http::Method;
use tokio::net::TcpListener;

use keygate::config::{Snapshot, StoreUrl};
use keygate::gateway::Gateway;
use keygate::keys::input::{self, KeyInput};
use keygate::keys::store::{self, Actor, KeyStore, KeyUpdate, NewKey, Rotation, StoreError};
use keygate::keys::{KeyKind, KeyRateLimit, Secret};
use keygate::routes::normalize::normalize_path;
use keygate::routes::RouteTarget;

#[derive(Parser)]
#[command(
    name = "keygate",
    version,
    about = "Appwrite-style API key scopes, enforced at the edge"
)]
struct Cli {
    /// Log format on stderr: `text` or `json` (level from KEYGATE_LOG, default info).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway. Without --config: the embedded demo (sample upstream, fresh demo keys).
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Manage API keys directly in the store.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Check config files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Inspect the route table.
    #[command(subcommand)]
    Routes(RoutesCommand),
    /// Work on stores directly.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Print the audit log of key changes (never a secret).
    Audit {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Only events of this key id.
        #[arg(long)]
        key: Option<String>,
    },
    /// Run the bundled echo upstream alone.
    SampleUpstream {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
    },
}

#[derive(Args)]
struct Target {
    /// Config file naming the store (default: the embedded config).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    project: String,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it, secret included (the only time it is shown).
    Create {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        name: String,
        /// Comma-separated scopes.
        #[arg(long, value_delimiter = ',', num_args = 0..)]
        scopes: Vec<String>,
        /// Expiry, RFC 3339 (e.g. 2030-01-31T00:00:00Z). Default: never.
        #[arg(long)]
        expire: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// Key id (default: unique()).
        #[arg(long)]
        id: Option<String>,
        /// The key's own abuse limit on every route, as LIMIT/WINDOW (e.g. 100/60s).
        #[arg(long, value_parser = parse_rate_limit)]
        rate_limit: Option<KeyRateLimit>,
    },
    /// List a project's keys (without secrets).
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Show one key (without its secret).
    Get {
        #[command(flatten)]
        target: Target,
        key_id: String,
    },
    /// Change a key; fields not given keep their value.
    Update {
        #[command(flatten)]
        target: Target,
        key_id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_delimiter = ',', num_args = 0..)]
        scopes: Option<Vec<String>>,
        #[arg(long, conflicts_with = "no_expire")]
        expire: Option<String>,
        /// Remove the expiry.
        #[arg(long)]
        no_expire: bool,
        #[arg(long)]
        description: Option<String>,
        /// Set the key's own abuse limit, as LIMIT/WINDOW (e.g. 100/60s).
        #[arg(long, value_parser = parse_rate_limit, conflicts_with = "no_rate_limit")]
        rate_limit: Option<KeyRateLimit>,
        /// Remove the key's own abuse limit.
        #[arg(long)]
        no_rate_limit: bool,
    },
    /// Delete a key.
    Delete {
        #[command(flatten)]
        target: Target,
        key_id: String,
    },
    /// Give a key a new secret and print it; the old one stays valid for --grace.
    Rotate {
        #[command(flatten)]
        target: Target,
        key_id: String,
        /// How long the old secret keeps working (e.g. 10m, 24h); capped by the key's expiry.
        #[arg(long, default_value = "0s")]
        grace: humantime::Duration,
    },
    /// Import keys from Appwrite's list-keys JSON ({total, keys:[…]} with secrets); only
    /// digests are stored. Keys whose id already exists are skipped.
    Import {
        #[command(flatten)]
        target: Target,
        file: PathBuf,
    },
    /// Export a project's keys in Appwrite's list-keys shape, without secrets.
    Export {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy keys, dev keys and the audit log from one store to another (idempotent).
    Migrate {
        /// Source, e.g. sqlite://data/keygate.db
        #[arg(long)]
        from: String,
        /// Target, e.g. postgres://keygate@db:5432/keygate
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file; prints the first error with its file, line and key.
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum RoutesCommand {
    /// Print, as JSON, the route a request would match.
    Explain {
        #[arg(long)]
        config: Option<PathBuf>,
        method: String,
        path: String,
    },
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            use clap::error::ErrorKind;
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = err.print();
                return ExitCode::SUCCESS;
            }
            let rendered = err.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("{first} (see keygate --help)");
            return ExitCode::from(2);
        }
    };
    init_logging(&cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", format!("{err:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init()
    };
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config } => serve(config).await,
        Command::Keys(command) => keys(command).await,
        Command::Store(StoreCommand::Migrate { from, to }) => {
            let from = StoreUrl::parse(&from).map_err(|e| anyhow::anyhow!("--from: {e}"))?;
            let to = StoreUrl::parse(&to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
            if from == to {
                bail!("--from and --to name the same store");
            }
            let source = store::open(&from)
                .await
                .with_context(|| format!("cannot open {}", from.redacted()))?;
            let target = store::open(&to)
                .await
                .with_context(|| format!("cannot open {}", to.redacted()))?;
            let report = keygate::store_migrate::migrate(source.as_ref(), target.as_ref()).await?;
            print_json(&report)
        }
        Command::Audit { config, key } => {
            let snapshot = load(config.as_deref())?;
            let events = open_store(&snapshot).await?.audit(key.as_deref()).await?;
            print_json(&serde_json::json!({ "total": events.len(), "events": events }))
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let snapshot = Snapshot::load(&file)?;
            println!(
                "{}: ok ({} routes, {} upstreams, {} projects, {} scopes)",
                file.display(),
                snapshot.routes.len(),
                snapshot.upstreams.len(),
                snapshot.projects.len(),
                snapshot.scopes.len()
            );
            Ok(())
        }
        Command::Routes(RoutesCommand::Explain {
            config,
            method,
            path,
        }) => explain(&load(config.as_deref())?, &method, &path),
        Command::SampleUpstream { listen } => {
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            eprintln!(
                "sample upstream listening on http://{}",
                listener.local_addr()?
            );
            keygate::sample::run(listener, shutdown_signal()).await?;
            Ok(())
        }
    }
}

fn load(config: Option<&Path>) -> anyhow::Result<Snapshot> {
    Ok(match config {
        Some(path) => Snapshot::load(path)?,
        None => Snapshot::embedded_default()?,
    })
}

fn explain(snapshot: &Snapshot, method: &str, path: &str) -> anyhow::Result<()> {
    let method =
        Method::from_bytes(method.to_ascii_uppercase().as_bytes()).context("not an HTTP method")?;
    let (path_only, _) = path.split_once('?').unwrap_or((path, ""));
    let normalized = normalize_path(path_only).map_err(|e| anyhow::anyhow!("{e}"))?;
    let output = match snapshot.routes.find(&method, &normalized) {
        Some(route) => serde_json::json!({
            "matched": true,
            "index": route.index,
            "path": route.pattern,
            "normalized_path": normalized,
            "scopes": route.scope_names.split(", ").filter(|s| !s.is_empty()).collect::<Vec<_>>(),
            "public": route.public,
            "target": match route.target {
                RouteTarget::Upstream(i) => format!("upstream {}", snapshot.upstreams[i].name()),
                RouteTarget::Admin(endpoint) => format!("keygate key API ({endpoint:?})"),
            },
        }),
        None => serde_json::json!({
            "matched": false,
            "normalized_path": normalized,
            "message": "no route matches",
        }),
    };
    println!("{}", serde_json::to_string_pretty(&output)?);
    Ok(())
}

async fn open_store(snapshot: &Snapshot) -> anyhow::Result<Arc<dyn KeyStore>> {
    store::open(&snapshot.store).await.with_context(|| {
        format!(
            "cannot open the key store ({})",
            describe_store(&snapshot.store)
        )
    })
}

fn describe_store(url: &StoreUrl) -> String {
    url.redacted()
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

fn store_error(err: StoreError, id: &str) -> anyhow::Error {
    match err {
        StoreError::NotFound => anyhow::anyhow!("no key `{id}` in this project"),
        StoreError::AlreadyExists => anyhow::anyhow!("a key `{id}` already exists in this project"),
        other => anyhow::Error::new(other),
    }
}

async fn keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            target,
            name,
            scopes,
            expire,
            description,
            id,
            rate_limit,
        } => {
            let snapshot = load(target.config.as_deref())?;
            check_project(&snapshot, &target.project)?;
            let input = KeyInput {
                name,
                description,
                scopes,
                expire: expire.as_deref().map(input::parse_expire).transpose()?,
            }
            .validate(&snapshot)?;
            let id = input::key_id(id.as_deref())?;
            let store = open_store(&snapshot).await?;
            let secret = Secret::generate();
            let record = store
                .create(
                    NewKey {
                        id: id.clone(),
                        project: target.project,
                        kind: KeyKind::Standard,
                        name: input.name,
                        description: input.description,
                        scopes: input.scopes,
                        expire: input.expire,
                        digest: secret.digest(),
                        rate_limit,
                    },
                    Actor::CLI,
                )
                .await
                .map_err(|e| store_error(e, &id))?;
            print_json(&record.to_model(Some(&secret)))
        }
        KeysCommand::List { target } | KeysCommand::Export { target } => {
            let snapshot = load(target.config.as_deref())?;
            let keys = open_store(&snapshot)
                .await?
                .list(&target.project, KeyKind::Standard)
                .await?;
            let models: Vec<_> = keys.iter().map(|k| k.to_model(None)).collect();
            print_json(&serde_json::json!({ "total": models.len(), "keys": models }))
        }
        KeysCommand::Get { target, key_id } => {
            let snapshot = load(target.config.as_deref())?;
            let record = open_store(&snapshot)
                .await?
                .get(&target.project, &key_id)
                .await?
                .ok_or_else(|| store_error(StoreError::NotFound, &key_id))?;
            print_json(&record.to_model(None))
        }
        KeysCommand::Update {
            target,
            key_id,
            name,
            scopes,
            expire,
            no_expire,
            description,
            rate_limit,
            no_rate_limit,
        } => {
            let snapshot = load(target.config.as_deref())?;
            let store = open_store(&snapshot).await?;
            let current = store
                .get(&target.project, &key_id)
                .await?
                .ok_or_else(|| store_error(StoreError::NotFound, &key_id))?;
            let expire = match (expire, no_expire) {
                (Some(value), _) => Some(input::parse_expire(&value)?),
                (None, true) => None,
                (None, false) => current.expire,
            };
            let input = KeyInput {
                name: name.unwrap_or(current.name),
                description: description.unwrap_or(current.description),
                scopes: scopes.unwrap_or(current.scopes),
                expire,
            }
            .validate(&snapshot)?;
            let record = store
                .update(
                    &target.project,
                    &key_id,
                    KeyUpdate {
                        name: input.name,
                        description: input.description,
                        scopes: input.scopes,
                        expire: input.expire,
                        rate_limit: match (rate_limit, no_rate_limit) {
                            (Some(limit), _) => Some(limit),
                            (None, true) => None,
                            (None, false) => current.rate_limit,
                        },
                    },
                    Actor::CLI,
                )
                .await
                .map_err(|e| store_error(e, &key_id))?;
            print_json(&record.to_model(None))
        }
        KeysCommand::Rotate {
            target,
            key_id,
            grace,
        } => rotate(target, key_id, grace.into()).await,
        KeysCommand::Import { target, file } => import(target, file).await,
        KeysCommand::Delete { target, key_id } => {
            let snapshot = load(target.config.as_deref())?;
            open_store(&snapshot)
                .await?
                .delete(&target.project, &key_id, Actor::CLI)
                .await
                .map_err(|e| store_error(e, &key_id))?;
            print_json(&serde_json::json!({ "$id": key_id, "deleted": true }))
        }
    }
}

async fn rotate(target: Target, key_id: String, grace: std::time::Duration) -> anyhow::Result<()> {
    let max = keygate::admin::handler::GRACE_MAX_SECONDS;
    if grace.as_secs() > u64::try_from(max).unwrap_or(u64::MAX) {
        bail!("--grace may be at most {max}s");
    }
    let snapshot = load(target.config.as_deref())?;
    let store = open_store(&snapshot).await?;
    let current = store
        .get(&target.project, &key_id)
        .await?
        .filter(|k| k.kind == KeyKind::Standard)
        .ok_or_else(|| store_error(StoreError::NotFound, &key_id))?;
    let grace_until = (!grace.is_zero())
        .then(|| {
            chrono::Utc::now() + chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX)
        })
        .map(|until| current.expire.map_or(until, |expire| until.min(expire)));
    let secret = Secret::generate();
    let record = store
        .rotate(
            &target.project,
            &key_id,
            Rotation {
                digest: secret.digest(),
                grace_until,
            },
            Actor::CLI,
        )
        .await
        .map_err(|e| store_error(e, &key_id))?;
    print_json(&record.to_model(Some(&secret)))
}

/// One key of Appwrite's list-keys JSON.
#[derive(serde::Deserialize)]
struct ImportedKey {
    #[serde(rename = "$id")]
    id: String,
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    expire: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    secret: String,
}

#[derive(serde::Deserialize)]
struct ImportedList {
    keys: Vec<ImportedKey>,
}

async fn import(target: Target, file: PathBuf) -> anyhow::Result<()> {
    let snapshot = load(target.config.as_deref())?;
    check_project(&snapshot, &target.project)?;
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let list: ImportedList = serde_json::from_str(&text)
        .with_context(|| format!("{} is not Appwrite's list-keys JSON", file.display()))?;
    // Validate everything first: an import is refused whole rather than half done.
    let mut prepared = Vec::new();
    for key in list.keys {
        let context = |e: input::InputError| anyhow::anyhow!("key `{}`: {e}", key.id);
        if !keygate::keys::is_valid_id(&key.id) {
            bail!("key `{}`: not a valid key id", key.id);
        }
        if key.secret.is_empty() {
            bail!(
                "key `{}`: no secret (export from Appwrite with secrets)",
                key.id
            );
        }
        let expire = match key.expire.as_deref() {
            None | Some("") => None,
            Some(value) => Some(input::parse_expire(value).map_err(context)?),
        };
        let input = KeyInput {
            name: key.name,
            description: key.description,
            scopes: key.scopes,
            expire,
        }
        .validate(&snapshot)
        .map_err(context)?;
        prepared.push((key.id, Secret::from_plaintext(key.secret), input));
    }
    let store = open_store(&snapshot).await?;
    let (mut imported, mut skipped) = (Vec::new(), Vec::new());
    for (id, secret, input) in prepared {
        let created = store
            .create(
                NewKey {
                    id: id.clone(),
                    project: target.project.clone(),
                    kind: KeyKind::Standard,
                    name: input.name,
                    description: input.description,
                    scopes: input.scopes,
                    expire: input.expire,
                    digest: secret.digest(),
                    rate_limit: None,
                },
                Actor::CLI,
            )
            .await;
        match created {
            Ok(_) => imported.push(id),
            Err(StoreError::AlreadyExists | StoreError::DuplicateSecret) => skipped.push(id),
            Err(err) => return Err(anyhow::Error::new(err).context(format!("key `{id}`"))),
        }
    }
    print_json(&serde_json::json!({ "imported": imported, "skipped": skipped }))
}

/// `LIMIT/WINDOW`, e.g. `100/60s` or `5000/1h`.
fn parse_rate_limit(value: &str) -> Result<KeyRateLimit, String> {
    let (limit, window) = value
        .split_once('/')
        .ok_or_else(|| format!("`{value}` is not LIMIT/WINDOW such as 100/60s"))?;
    let limit: u32 = limit
        .trim()
        .parse()
        .ok()
        .filter(|l| *l > 0)
        .ok_or_else(|| format!("`{limit}` is not a positive number"))?;
    let max = keygate::admin::handler::KEY_RATE_WINDOW_MAX;
    let window = humantime::parse_duration(window.trim())
        .ok()
        .and_then(|d| u32::try_from(d.as_secs()).ok())
        .filter(|s| (1..=max).contains(s))
        .ok_or_else(|| format!("`{window}` is not a window of 1s to {max}s such as 60s"))?;
    Ok(KeyRateLimit {
        limit,
        window_secs: window,
    })
}

fn check_project(snapshot: &Snapshot, project: &str) -> anyhow::Result<()> {
    if snapshot.project(project).is_none() {
        let mut known: Vec<&str> = snapshot.projects.keys().map(String::as_str).collect();
        known.sort_unstable();
        bail!(
            "unknown project `{project}` (the config defines: {})",
            known.join(", ")
        );
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn serve(config: Option<PathBuf>) -> anyhow::Result<()> {
    let demo = config.is_none();
    let snapshot = load(config.as_deref())?;
    let listen = snapshot.listen;
    let ops_listen = snapshot.ops_listen;
    let store_description = describe_store(&snapshot.store);
    let gateway = Gateway::start(snapshot)
        .await
        .with_context(|| format!("cannot open the key store ({store_description})"))?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    if demo {
        start_demo(&gateway, listen, stopped()).await?;
    }
    let _sync = gateway.spawn_sync();
    if let Some(addr) = ops_listen {
        let ops = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (ops)"))?;
        tracing::info!(addr = %ops.local_addr()?, "ops listener ready");
        tokio::spawn(keygate::server::run_ops(ops, gateway.clone(), stopped()));
    }
    spawn_reload_triggers(&gateway);
    tracing::info!(store = %store_description, keys = gateway.keys().len(), "keygate starting");
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: no new connections, finishing requests in flight");
        let _ = stop_tx.send(true);
    });
    keygate::server::serve(gateway, stopped())
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    Ok(())
}

/// Reloads on SIGHUP and when a config file (or an included one) changes on disk.
fn spawn_reload_triggers(gateway: &Arc<Gateway>) {
    #[cfg(unix)]
    {
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let Ok(mut hangups) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the config");
                let _ = gateway.reload().await;
            }
        });
    }
    let gateway = gateway.clone();
    tokio::spawn(async move {
        // Polling file metadata: portable, cheap at this rate, and blind to editor save tricks
        // (rename over, truncate and write) that event APIs report inconsistently.
        let stamp = |files: &[PathBuf]| -> Vec<Option<(std::time::SystemTime, u64)>> {
            files
                .iter()
                .map(|f| {
                    std::fs::metadata(f)
                        .ok()
                        .and_then(|m| Some((m.modified().ok()?, m.len())))
                })
                .collect()
        };
        let mut seen = stamp(&gateway.snapshot().files);
        let mut ticker = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            ticker.tick().await;
            let files = gateway.snapshot().files.clone();
            let now = stamp(&files);
            if now != seen {
                seen = now;
                tracing::info!("config file changed: reloading");
                if gateway.reload().await.is_ok() {
                    // The new config may include other files.
                    seen = stamp(&gateway.snapshot().files);
                }
            }
        }
    });
}

/// The embedded demo: the sample upstream where the config expects it, and two fresh keys whose
/// secrets are printed once, with curl lines to try.
async fn start_demo(
    gateway: &Arc<Gateway>,
    local: SocketAddr,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let snapshot = gateway.snapshot();
    let upstream = &snapshot.upstreams[0];
    let sample_addr: SocketAddr = upstream.targets()[0]
        .authority()
        .as_str()
        .parse()
        .context("the demo upstream must be an IP:port")?;
    let sample = TcpListener::bind(sample_addr)
        .await
        .with_context(|| format!("cannot start the sample upstream on {sample_addr}"))?;
    tokio::spawn(keygate::sample::run(sample, stopped));

    let project = "demo";
    let store = gateway.store();
    let all_scopes: Vec<String> = snapshot.scopes.names().map(str::to_owned).collect();
    let mut secrets = Vec::new();
    for (id, name, scopes) in [
        ("demo-admin", "Demo admin", all_scopes),
        ("demo-reader", "Demo reader", vec!["users.read".to_owned()]),
    ] {
        match store.delete(project, id, Actor::CLI).await {
            Ok(()) | Err(StoreError::NotFound) => {}
            Err(err) => return Err(err.into()),
        }
        let secret = Secret::generate();
        let record = store
            .create(
                NewKey {
                    id: id.into(),
                    project: project.into(),
                    kind: KeyKind::Standard,
                    name: name.into(),
                    description: "created by `keygate serve` for the demo".into(),
                    scopes,
                    expire: None,
                    digest: secret.digest(),
                    rate_limit: None,
                },
                Actor::CLI,
            )
            .await?;
        gateway.keys().upsert(&record, &snapshot.scopes);
        secrets.push(secret);
    }
    let base = format!("http://{local}");
    let (admin, reader) = (secrets[0].expose(), secrets[1].expose());
    println!(
        "\nkeygate demo on {base}  (sample upstream on http://{sample_addr}, project `{project}`)\n\
         \nadmin key  (every scope): {admin}\nreader key (users.read):   {reader}\n\
         \nTry:\n\
         # allowed: the sample upstream echoes what it received\n\
         curl -s {base}/v1/users -H 'X-Appwrite-Project: {project}' -H 'X-Appwrite-Key: {admin}'\n\
         # missing scope: 401 general_unauthorized_scope (needs users.write)\n\
         curl -s -X POST {base}/v1/users -H 'X-Appwrite-Project: {project}' -H 'X-Appwrite-Key: {reader}'\n\
         # unknown key: 401 user_unauthorized\n\
         curl -s {base}/v1/users -H 'X-Appwrite-Project: {project}' -H 'X-Appwrite-Key: standard_0000'\n\
         # guest on a public route\n\
         curl -s {base}/v1/health/version\n"
    );
    let _ = std::io::stdout().flush();
    Ok(())
}
