//! Listeners: accept connections (TLS when configured) and serve them with hyper — HTTP/1.1
//! and HTTP/2 (ALPN over TLS, prior knowledge in cleartext) — until the shutdown future
//! resolves; then stop accepting and let open connections finish within the grace period.
//!
//! Connection settings and TLS material are read from the current snapshot for every new
//! connection, so a reload applies to new connections while open ones keep what they started
//! with; the shutdown grace period is read when shutdown begins. `max_connections` sizes the
//! listener's semaphore and `workers` its threads when it starts, so a change to either takes
//! effect when the listener is next bound. [`serve`] re-binds the public listener only when a
//! reload changes its address.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::config::{ServerSettings, Tls};
use crate::gateway::Gateway;
use crate::metrics as m;
use crate::proxy::{self, full_body, Body, Peer};

fn connection_builder(settings: &ServerSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes)
        .max_headers(settings.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Serves the public (proxy) listener on the calling runtime until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let limit = Arc::new(Semaphore::new(gateway.snapshot().server.max_connections));
    run_admitting(listener, gateway, Admission::alone(limit), shutdown).await
}

/// [`run`], admitting connections as `admission` says (shared with the other worker threads).
async fn run_admitting(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    admission: Admission,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let settings = {
        let gateway = gateway.clone();
        move || {
            let snapshot = gateway.snapshot();
            (snapshot.server.clone(), snapshot.server.tls.clone())
        }
    };
    let grace = {
        let gateway = gateway.clone();
        move || gateway.snapshot().server.shutdown_grace
    };
    accept_loop(
        listener,
        "public",
        shutdown,
        settings,
        admission,
        grace,
        move |peer| {
            let gateway = Arc::clone(&gateway);
            let peer = Arc::new(peer);
            service_fn(move |req: Request<Incoming>| {
                let gateway = Arc::clone(&gateway);
                let peer = Arc::clone(&peer);
                async move { Ok::<_, Infallible>(proxy::handle(&gateway, req, &peer).await) }
            })
        },
    )
    .await
}

/// Serves one listening socket from `workers` threads, each the one worker of its own runtime:
/// a connection lives on the thread that accepted it, and so do its upstream connections (each
/// thread sends on pools of its own), so a proxied request never crosses threads. The threads
/// share the socket's accept queue and one connection limit. Resolves when every thread has
/// finished (after `stop` turns true and their connections drained).
///
/// A one-worker multi-thread runtime rather than a current-thread one for its LIFO slot: a task
/// woken by the running task runs next. A proxied request hops between two tasks each way (the
/// client connection and the upstream connection), so the upstream write and the client write
/// happen as soon as their data is ready instead of after every task queued before them: lower
/// tails at a fixed rate, for less batching at saturation (measured in load/README.md).
fn run_workers(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    workers: usize,
    stop: watch::Receiver<bool>,
) -> std::io::Result<impl Future<Output = std::io::Result<()>>> {
    let socket = listener.into_std()?;
    let limit = Arc::new(Semaphore::new(gateway.snapshot().server.max_connections));
    let spread = Arc::new(Spread::new(workers));
    let mut started = Vec::with_capacity(workers);
    for index in 0..workers {
        let admission = Admission {
            limit: limit.clone(),
            spread: Some((spread.clone(), index)),
        };
        // On an early return, the workers already started are let go of (`WorkerRuntime`).
        started.push(start_worker(
            index,
            &socket,
            gateway.clone(),
            admission,
            stop.clone(),
        )?);
    }
    Ok(async move {
        let mut outcome = Ok(());
        for (_runtime, task) in started {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => outcome = Err(err),
                Err(_) => outcome = Err(std::io::Error::other("a listener thread panicked")),
            }
        }
        outcome
    })
}

/// Starts worker `index`: a runtime of one worker thread (`keygate-worker-N`) that accepts on
/// `socket` until `stop` turns true.
fn start_worker(
    index: usize,
    socket: &std::net::TcpListener,
    gateway: Arc<Gateway>,
    admission: Admission,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<(WorkerRuntime, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let socket = socket.try_clone()?;
    let threads = AtomicUsize::new(0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        // The worker thread is started with the runtime; any later thread is its blocking pool's.
        .thread_name_fn(move || match threads.fetch_add(1, Ordering::Relaxed) {
            0 => format!("keygate-worker-{index}"),
            _ => format!("keygate-block-{index}"),
        })
        .enable_all()
        .build()?;
    let task = runtime.spawn(async move {
        let listener = TcpListener::from_std(socket)?;
        let stopped = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        run_admitting(listener, gateway, admission, stopped).await
    });
    Ok((WorkerRuntime(Some(runtime)), task))
}

/// A worker's runtime, let go of in the background when dropped: it is dropped on another
/// runtime, where a blocking shutdown is not allowed.
struct WorkerRuntime(Option<tokio::runtime::Runtime>);

impl Drop for WorkerRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Serves the public listener on the configured address, re-binding when a reload changes it:
/// the new address is bound first (a failure keeps the old one serving), then the old listener
/// stops accepting and its connections finish.
pub async fn serve(
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut generations = gateway.subscribe();
    let mut address = gateway.snapshot().listen;
    let listener = TcpListener::bind(address).await?;
    tracing::info!(addr = %listener.local_addr()?, "keygate listening");
    let (mut stop, mut task) = spawn_listener(listener, gateway.clone())?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            changed = generations.changed() => {
                if changed.is_err() {
                    break;
                }
                let wanted = gateway.snapshot().listen;
                if wanted == address {
                    continue;
                }
                match TcpListener::bind(wanted).await.and_then(|l| spawn_listener(l, gateway.clone())) {
                    Ok((new_stop, new_task)) => {
                        tracing::info!(from = %address, to = %wanted, "listen address changed; re-bound");
                        let _ = stop.send(true);
                        let old = std::mem::replace(&mut task, new_task);
                        stop = new_stop;
                        address = wanted;
                        tokio::spawn(old);
                    }
                    Err(err) => tracing::error!(addr = %wanted, error = %err, "cannot bind the new listen address; still serving on the old one"),
                }
            }
        }
    }
    let _ = stop.send(true);
    task.await.unwrap_or(Ok(()))
}

fn spawn_listener(
    listener: TcpListener,
    gateway: Arc<Gateway>,
) -> std::io::Result<(
    watch::Sender<bool>,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    let (stop, stopped) = watch::channel(false);
    let workers = gateway.snapshot().server.workers;
    let finished = run_workers(listener, gateway, workers, stopped)?;
    Ok((stop, tokio::spawn(finished)))
}

/// Serves the ops listener: `/healthz` (alive), `/readyz` (config loaded, store reachable,
/// generation), `/metrics` (Prometheus) and `POST /reload`.
pub async fn run_ops(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let settings = {
        let gateway = gateway.clone();
        move || {
            let snapshot = gateway.snapshot();
            (snapshot.server.clone(), snapshot.ops_tls.clone())
        }
    };
    let grace = {
        let gateway = gateway.clone();
        move || gateway.snapshot().server.shutdown_grace
    };
    accept_loop(
        listener,
        "ops",
        shutdown,
        settings,
        Admission::alone(Arc::new(Semaphore::new(256))),
        grace,
        move |_peer| {
            let gateway = Arc::clone(&gateway);
            service_fn(move |req: Request<Incoming>| {
                let gateway = Arc::clone(&gateway);
                async move { Ok::<_, Infallible>(ops(&gateway, req).await) }
            })
        },
    )
    .await
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full_body(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

async fn ops(gateway: &Gateway, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        (&Method::GET, "/readyz") => {
            let generation = gateway.generation();
            match gateway.store().ping().await {
                Ok(()) => json(
                    StatusCode::OK,
                    serde_json::json!({"status": "ready", "generation": generation, "store": "ok", "keys": gateway.keys().len()}),
                ),
                Err(err) => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"status": "not ready", "generation": generation, "store": "unreachable", "error": err.to_string()}),
                ),
            }
        }
        (&Method::GET, "/metrics") => {
            let mut response = Response::new(full_body(crate::metrics::install().render()));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        (&Method::POST, "/reload") => match gateway.reload().await {
            Ok(generation) => json(
                StatusCode::OK,
                serde_json::json!({"status": "applied", "generation": generation}),
            ),
            Err(err) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({"status": "refused", "generation": gateway.generation(), "error": err.to_string()}),
            ),
        },
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"status": "not found"}),
        ),
    }
}

/// How far a worker thread may get ahead of the least busy one, in open connections.
const SPREAD_SLACK: usize = 1;

/// Open connections per worker thread sharing one socket. A thread that accepted more than its
/// share steps back and lets the others take the next connections: a burst of connections
/// (a client opening its pool) would otherwise land on whichever thread woke first.
struct Spread {
    open: Box<[AtomicUsize]>,
    changed: Notify,
}

impl Spread {
    fn new(workers: usize) -> Spread {
        Spread {
            open: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            changed: Notify::new(),
        }
    }

    fn my_turn(&self, me: usize) -> bool {
        let mine = self.open[me].load(Ordering::Relaxed);
        let least = (0..self.open.len())
            .filter(|&other| other != me)
            .map(|other| self.open[other].load(Ordering::Relaxed))
            .min()
            .unwrap_or(mine);
        mine <= least + SPREAD_SLACK
    }

    async fn wait_turn(&self, me: usize) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.my_turn(me) {
                return;
            }
            changed.await;
        }
    }

    fn add(&self, me: usize, opened: bool) {
        if opened {
            self.open[me].fetch_add(1, Ordering::Relaxed);
        } else {
            self.open[me].fetch_sub(1, Ordering::Relaxed);
        }
        self.changed.notify_waiters();
    }
}

/// Who may open a connection on a listener: the connection limit, and for a worker thread that
/// shares its socket, its turn.
struct Admission {
    limit: Arc<Semaphore>,
    spread: Option<(Arc<Spread>, usize)>,
}

impl Admission {
    fn alone(limit: Arc<Semaphore>) -> Admission {
        Admission {
            limit,
            spread: None,
        }
    }

    /// Waits for this thread's turn, then for room under the connection limit.
    async fn wait(&self) -> OwnedSemaphorePermit {
        if let Some((spread, me)) = &self.spread {
            spread.wait_turn(*me).await;
        }
        self.limit
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Counts an accepted connection until the returned slot is dropped.
    fn open(&self, permit: OwnedSemaphorePermit) -> Slot {
        if let Some((spread, me)) = &self.spread {
            spread.add(*me, true);
        }
        Slot {
            _permit: permit,
            spread: self.spread.clone(),
        }
    }
}

/// An open connection's place under the limit and in its thread's count.
struct Slot {
    _permit: OwnedSemaphorePermit,
    spread: Option<(Arc<Spread>, usize)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((spread, me)) = &self.spread {
            spread.add(*me, false);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn accept_loop<S, F>(
    listener: TcpListener,
    name: &'static str,
    shutdown: impl Future<Output = ()>,
    settings: impl Fn() -> (ServerSettings, Option<Tls>),
    admission: Admission,
    grace: impl Fn() -> Duration,
    make_service: F,
) -> std::io::Result<()>
where
    F: Fn(Peer) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        // At the connection limit (or this thread's share of it), stop accepting: new clients
        // wait in the listen backlog, or are taken by another worker thread.
        let permit = tokio::select! {
            permit = admission.wait() => permit,
            () = &mut shutdown => break,
        };
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let slot = admission.open(permit);
        let _ = stream.set_nodelay(true);
        let (settings, tls) = settings();
        let builder = connection_builder(&settings);
        let watcher = graceful.watcher();
        let service = make_service(Peer::new(addr, tls.is_some()));
        tokio::spawn(async move {
            metrics::gauge!(m::CONNECTIONS_OPEN, "listener" => name).increment(1.0);
            serve_connection(stream, tls, &settings, builder, service, watcher).await;
            metrics::gauge!(m::CONNECTIONS_OPEN, "listener" => name).decrement(1.0);
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace()) => {
            tracing::warn!("shutdown grace period over; closing remaining connections");
        }
    }
    Ok(())
}

async fn serve_connection<S>(
    stream: TcpStream,
    tls: Option<Tls>,
    settings: &ServerSettings,
    builder: auto::Builder<TokioExecutor>,
    service: S,
    watcher: Watcher,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    match tls {
        None => drive(TokioIo::new(stream), builder, service, watcher).await,
        Some(Tls(acceptor)) => {
            match tokio::time::timeout(settings.header_read_timeout, acceptor.accept(stream)).await
            {
                Ok(Ok(stream)) => drive(TokioIo::new(stream), builder, service, watcher).await,
                Ok(Err(err)) => tracing::debug!(error = %err, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        }
    }
}

async fn drive<I, S>(
    io: TokioIo<I>,
    builder: auto::Builder<TokioExecutor>,
    service: S,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let connection = builder.serve_connection_with_upgrades(io, service);
    if let Err(err) = watcher.watch(connection.into_owned()).await {
        tracing::debug!(error = %err, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_ahead_of_the_least_busy_one_steps_back() {
        let spread = Spread::new(3);
        for _ in 0..=SPREAD_SLACK {
            assert!(spread.my_turn(0));
            spread.add(0, true);
        }
        assert!(
            !spread.my_turn(0),
            "ahead of both others by more than the slack"
        );
        assert!(spread.my_turn(1) && spread.my_turn(2));
        spread.add(1, true);
        assert!(!spread.my_turn(0), "thread 2 is still idle");
        spread.add(2, true);
        assert!(spread.my_turn(0));
        spread.add(0, false);
        assert!(spread.my_turn(0) && spread.my_turn(1) && spread.my_turn(2));
    }

    #[tokio::test]
    async fn a_waiting_thread_is_woken_when_the_others_catch_up() {
        let spread = Arc::new(Spread::new(2));
        spread.add(0, true);
        spread.add(0, true);
        let waiting = tokio::spawn({
            let spread = spread.clone();
            async move { spread.wait_turn(0).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        spread.add(1, true);
        waiting.await.unwrap();
    }
}
