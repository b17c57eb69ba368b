//! Balanced upstreams through real sockets: round robin over two addresses, an address killed
//! mid-test (retries cover the failures until it is ejected, so no client request fails), the
//! ejection metric, and least-outstanding balancing around a request held on a slow address.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Harness;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

/// A request the backend holds until the test releases it.
struct Hold {
    /// Told when the held request has arrived.
    arrived: mpsc::UnboundedSender<()>,
    release: oneshot::Receiver<()>,
}

/// An in-process upstream answering 200 with its name. Killing it closes the listener and
/// every open connection, so the address refuses new connections and pooled ones die.
struct Backend {
    addr: SocketAddr,
    kill: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Backend {
    /// `hold`: the first request waits for the release before it is answered.
    async fn start(name: &'static str, hold: Option<Hold>) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = Arc::new(Mutex::new(hold));
        let (kill, mut killed) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut killed => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { break };
                        let hold = hold.clone();
                        connections.spawn(async move {
                            let service = service_fn(move |_req: Request<Incoming>| {
                                let held = hold.lock().unwrap().take();
                                async move {
                                    if let Some(Hold { arrived, release }) = held {
                                        let _ = arrived.send(());
                                        let _ = release.await;
                                    }
                                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
            drop(listener);
            // Abort every connection task and wait until each has dropped its socket.
            connections.shutdown().await;
        });
        Backend {
            addr,
            kill: Some(kill),
            task,
        }
    }

    /// Returns once the listener and every connection are closed.
    async fn kill(mut self) {
        let _ = self.kill.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

fn config(upstream: &str, balance: &str, a: SocketAddr, b: SocketAddr) -> String {
    format!(
        r#"
server: {{ listen: "127.0.0.1:0" }}
store: {{ url: "sqlite://{{db}}" }}
projects: {{ demo: {{}} }}
upstreams:
  {upstream}:
    urls: ["http://{a}", "http://{b}"]
    balance: {balance}
    eject_after: 2
    eject_for: 60s
    timeout: 10s
    connect_timeout: 2s
routes:
  - {{ methods: [GET], path: /v1/x, public: true, upstream: {upstream} }}
"#
    )
}

async fn harness(template: &str, first: SocketAddr) -> Harness {
    // The addresses are in the template already; `{upstream}` is not used.
    let (stop, _) = oneshot::channel();
    Harness::start_in_front_of(template, first, stop).await
}

/// GET /v1/x; the name of the backend that answered.
async fn who(h: &Harness) -> String {
    let response = h.request(Method::GET, "/v1/x", &[], "").await;
    assert_eq!(
        response.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    String::from_utf8(response.body.to_vec()).unwrap()
}

/// The sum of every `metric{…}` series labelled `upstream="NAME"` in the Prometheus text, if
/// there is one.
fn metric(name: &str, upstream: &str) -> Option<f64> {
    let text = keygate::metrics::install().render();
    let label = format!("upstream=\"{upstream}\"");
    let values: Vec<f64> = text
        .lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|rest| rest.split_once("} "))
        .filter(|(labels, _)| labels.split(',').any(|l| l == label))
        .map(|(_, value)| value.trim().parse().unwrap())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

#[tokio::test]
async fn round_robin_alternates_and_a_dead_address_is_ejected_without_failed_requests() {
    const UPSTREAM: &str = "pair_round_robin";
    let a = Backend::start("a", None).await;
    let b = Backend::start("b", None).await;
    let h = harness(&config(UPSTREAM, "round_robin", a.addr, b.addr), a.addr).await;

    let mut order = Vec::new();
    for _ in 0..4 {
        order.push(who(&h).await);
    }
    assert_eq!(order, ["a", "b", "a", "b"]);
    assert_eq!(
        metric("keygate_upstream_ejections_total", UPSTREAM),
        None,
        "nothing ejected while both answer"
    );

    // B dies: its port refuses connections and keygate's pooled connections to it are closed.
    b.kill().await;
    let started = Instant::now();
    for n in 0..50 {
        assert_eq!(who(&h).await, "a", "request {n} after B died");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "50 requests took {took:?}: failures should be retried at once"
    );
    // B's failures were real (seen, then retried on A) until it was ejected.
    let errors = metric("keygate_upstream_errors_total", UPSTREAM).expect("errors are counted");
    assert!(errors >= 2.0, "{errors}");
    let ejections = metric("keygate_upstream_ejections_total", UPSTREAM)
        .expect("an ejection is counted for the upstream");
    assert!(ejections >= 1.0, "{ejections}");
    // B was ejected after its second failure in a row and then left alone: with eject_after 2
    // and a 60 s rest, no more than one ejection happens during the test.
    assert_eq!(ejections, 1.0);
    a.kill().await;
}

#[tokio::test]
async fn least_outstanding_avoids_the_address_holding_a_request() {
    const UPSTREAM: &str = "pair_least_outstanding";
    let (arrived, mut arrival) = mpsc::unbounded_channel();
    let (release, released) = oneshot::channel();
    let slow = Backend::start(
        "slow",
        Some(Hold {
            arrived,
            release: released,
        }),
    )
    .await;
    let fast = Backend::start("fast", None).await;
    let h = Arc::new(
        harness(
            &config(UPSTREAM, "least_outstanding", slow.addr, fast.addr),
            slow.addr,
        )
        .await,
    );

    // With nothing outstanding the first request goes to the first address, which holds it.
    let held = tokio::spawn({
        let h = h.clone();
        async move { who(&h).await }
    });
    tokio::time::timeout(Duration::from_secs(10), arrival.recv())
        .await
        .expect("the first request reaches the slow address")
        .unwrap();

    // While it is held, every request goes to the idle address.
    for n in 0..6 {
        assert_eq!(who(&h).await, "fast", "request {n} while slow holds one");
    }
    assert!(!held.is_finished());

    release.send(()).unwrap();
    assert_eq!(held.await.unwrap(), "slow");

    // Nothing outstanding again: ties alternate, so both addresses serve.
    let mut after = Vec::new();
    for _ in 0..4 {
        after.push(who(&h).await);
    }
    assert!(after.iter().any(|n| n == "slow"), "{after:?}");
    assert!(after.iter().any(|n| n == "fast"), "{after:?}");
    slow.kill().await;
    fast.kill().await;
}
