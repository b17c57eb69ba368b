//! TLS termination through real sockets: HTTP/1.1 and HTTP/2 (ALPN) over TLS, certificate
//! rotation on reload (new connections get the new certificate, open ones keep working), a
//! reload with a missing certificate refused while the old one keeps serving, and client
//! certificates on the ops listener. Every certificate is made here, signed by a test CA.

mod common;

use std::error::Error;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{fill, raw_request, Harness};
use http::{header, Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate::sample::Echo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

type BoxError = Box<dyn Error + Send + Sync>;

/// The config the harness starts on: its directory exists only once it runs, so the PEM files
/// are written there afterwards and a reload switches to a TLS config.
const PLAIN: &str = r#"
server: { listen: "127.0.0.1:0" }
store: { url: "sqlite://{db}" }
projects: { demo: {} }
upstreams:
  echo: { url: "http://{upstream}", timeout: 5s }
routes:
  - { methods: [GET], path: "/v1/public/**", public: true, upstream: echo }
"#;

/// TLS on the public listener; the paths are relative to the config file's directory.
const TLS: &str = r#"
server: { listen: "127.0.0.1:0", tls: { cert: server.pem, key: server.key } }
store: { url: "sqlite://{db}" }
projects: { demo: {} }
upstreams:
  echo: { url: "http://{upstream}", timeout: 5s }
routes:
  - { methods: [GET], path: "/v1/public/**", public: true, upstream: echo }
"#;

/// A plain public listener and an ops listener that wants client certificates.
const OPS_MTLS: &str = r#"
server: { listen: "127.0.0.1:0" }
ops: { listen: "127.0.0.1:0", tls: { cert: server.pem, key: server.key, client_ca: clients.pem } }
store: { url: "sqlite://{db}" }
projects: { demo: {} }
upstreams:
  echo: { url: "http://{upstream}", timeout: 5s }
routes:
  - { methods: [GET], path: "/v1/public/**", public: true, upstream: echo }
"#;

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate issued by a [`Ca`], with its private key.
struct Leaf {
    der: CertificateDer<'static>,
    pem: String,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(SerialNumber::from(vec![0x10, 0x01]));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A new key pair and a certificate for it, with this serial number.
    fn issue(&self, names: &[&str], serial: u8, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.serial_number = Some(SerialNumber::from(vec![0x20, serial]));
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &*self.issuer).unwrap();
        Leaf {
            der: cert.der().clone(),
            pem: cert.pem(),
            key,
        }
    }

    fn server_cert(&self, serial: u8) -> Leaf {
        self.issue(
            &["localhost", "127.0.0.1"],
            serial,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }
}

impl Leaf {
    /// Writes `NAME.pem` and `NAME.key` into `dir`.
    fn write(&self, dir: &Path, name: &str) {
        std::fs::write(dir.join(format!("{name}.pem")), &self.pem).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), self.key.serialize_pem()).unwrap();
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

fn rewrite_config(h: &Harness, template: &str) {
    std::fs::write(&h.config_path, fill(template, h.upstream, &h.db)).unwrap();
}

/// keygate serving `server` (as server.pem/server.key in its directory) under `template`.
async fn start_tls(template: &str, server: &Leaf) -> Harness {
    let h = Harness::start_with(PLAIN).await;
    server.write(h.dir.path(), "server");
    rewrite_config(&h, template);
    let generation = h.gateway.reload().await.expect("the TLS config loads");
    assert_eq!(generation, 2);
    h
}

/// A client that trusts `ca` only and offers `alpn`, with an optional client certificate.
fn client(ca: &Ca, alpn: &[&[u8]], identity: Option<&Leaf>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(leaf) => builder
            .with_client_auth_cert(vec![leaf.der.clone()], leaf.private_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

async fn connect(
    addr: SocketAddr,
    connector: &TlsConnector,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .expect("the TLS handshake did not finish in time")
}

/// The leaf certificate the server presented.
fn presented(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a server certificate")[0]
        .clone()
}

async fn http1(stream: TlsStream<TcpStream>) -> SendRequest<Empty<Bytes>> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

/// GET `path` on an HTTP/1.1 connection; the echo of what the upstream received.
async fn get_echo(sender: &mut SendRequest<Empty<Bytes>>, path: &str) -> (Version, Echo) {
    sender.ready().await.expect("the connection is usable");
    let request = Request::get(path)
        .header(header::HOST, "localhost")
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (version, status) = (response.version(), response.status());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    (version, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn http1_over_tls_reaches_the_upstream_as_https() {
    let ca = Ca::new("keygate test CA");
    let server = ca.server_cert(1);
    let h = start_tls(TLS, &server).await;

    let stream = connect(h.addr, &client(&ca, &[b"http/1.1"], None))
        .await
        .expect("the handshake succeeds with the test CA");
    assert_eq!(presented(&stream), server.der);
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut sender = http1(stream).await;
    let (version, echo) = get_echo(&mut sender, "/v1/public/tls?x=1").await;
    assert_eq!(version, Version::HTTP_11);
    assert_eq!(echo.target, "/v1/public/tls?x=1");
    assert_eq!(echo.header("x-forwarded-proto"), Some("https"));
    assert_eq!(echo.header("x-forwarded-host"), Some("localhost"));

    // A client that does not trust the CA refuses the server.
    let stranger = Ca::new("another CA");
    assert!(connect(h.addr, &client(&stranger, &[b"http/1.1"], None))
        .await
        .is_err());
    // Cleartext HTTP on the TLS listener gets no HTTP answer.
    let (status, _) = raw_request(
        h.addr,
        b"GET /v1/public/tls HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 0, "cleartext was answered on the TLS listener");
}

#[tokio::test]
async fn http2_is_negotiated_with_alpn() {
    let ca = Ca::new("keygate test CA");
    let h = start_tls(TLS, &ca.server_cert(1)).await;

    let stream = connect(h.addr, &client(&ca, &[b"h2", b"http/1.1"], None))
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let authority = format!("localhost:{}", h.addr.port());
    for n in 0..2 {
        let request = Request::get(format!("https://{authority}/v1/public/h2?n={n}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), Version::HTTP_2);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let echo: Echo = serde_json::from_slice(&body).unwrap();
        assert_eq!(echo.target, format!("/v1/public/h2?n={n}"));
        assert_eq!(echo.header("x-forwarded-proto"), Some("https"));
        assert_eq!(echo.header("x-forwarded-host"), Some(authority.as_str()));
    }
}

#[tokio::test]
async fn rotated_certificate_serves_new_connections_and_open_ones_keep_working() {
    let ca = Ca::new("keygate test CA");
    let old = ca.server_cert(1);
    let h = start_tls(TLS, &old).await;
    let connector = client(&ca, &[b"http/1.1"], None);

    let before = connect(h.addr, &connector).await.unwrap();
    assert_eq!(presented(&before), old.der);
    let mut kept = http1(before).await;
    get_echo(&mut kept, "/v1/public/before").await;

    let new = ca.server_cert(2);
    assert_ne!(new.der, old.der);
    new.write(h.dir.path(), "server");
    let generation = h.gateway.generation();
    let applied = h.gateway.reload().await.expect("the new certificate loads");
    assert!(applied > generation, "{applied} after {generation}");

    let after = connect(h.addr, &connector).await.unwrap();
    assert_eq!(
        presented(&after),
        new.der,
        "a new connection gets the new certificate"
    );
    let mut fresh = http1(after).await;
    let (_, echo) = get_echo(&mut fresh, "/v1/public/after").await;
    assert_eq!(echo.header("x-forwarded-proto"), Some("https"));

    // The keep-alive connection opened before the rotation still serves requests.
    let (_, echo) = get_echo(&mut kept, "/v1/public/still").await;
    assert_eq!(echo.target, "/v1/public/still");
}

#[tokio::test]
async fn reload_without_the_certificate_file_is_refused_and_the_old_one_serves() {
    let ca = Ca::new("keygate test CA");
    let server = ca.server_cert(1);
    let h = start_tls(TLS, &server).await;
    let generation = h.gateway.generation();

    let missing = h.dir.path().join("server.pem");
    std::fs::remove_file(&missing).unwrap();
    let err = h
        .gateway
        .reload()
        .await
        .expect_err("a reload without the certificate file is refused");
    let message = err.to_string();
    assert!(
        message.contains(&missing.display().to_string()),
        "the message names the file: {message}"
    );
    assert_eq!(err.key.as_deref(), Some("server.tls.cert"), "{message}");
    assert_eq!(h.gateway.generation(), generation);

    let stream = connect(h.addr, &client(&ca, &[b"http/1.1"], None))
        .await
        .expect("new connections still handshake");
    assert_eq!(presented(&stream), server.der);
    let mut sender = http1(stream).await;
    get_echo(&mut sender, "/v1/public/old-cert").await;
}

/// GET /healthz on the ops listener; any TLS or HTTP failure is an error.
async fn healthz(addr: SocketAddr, connector: &TlsConnector) -> Result<StatusCode, BoxError> {
    let attempt = async {
        let stream = connect(addr, connector).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = Request::get("/healthz")
            .header(header::HOST, "localhost")
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        response.into_body().collect().await?;
        Ok::<_, BoxError>(status)
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| BoxError::from("no answer in time"))?
}

#[tokio::test]
async fn ops_listener_requires_a_client_certificate_from_its_ca() {
    let ca = Ca::new("keygate test CA");
    let server = ca.server_cert(1);
    let clients = Ca::new("ops client CA");
    let h = Harness::start_with(PLAIN).await;
    server.write(h.dir.path(), "server");
    std::fs::write(h.dir.path().join("clients.pem"), clients.pem()).unwrap();
    rewrite_config(&h, OPS_MTLS);
    h.gateway.reload().await.expect("the ops TLS config loads");

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = listener.local_addr().unwrap();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(keygate::server::run_ops(
        listener,
        h.gateway.clone(),
        async {
            let _ = stopped.await;
        },
    ));

    let anonymous = healthz(ops, &client(&ca, &[b"http/1.1"], None)).await;
    assert!(
        anonymous.is_err(),
        "a client without a certificate was answered: {anonymous:?}"
    );
    // A certificate from another CA (here the server's) is refused as well.
    let outsider = ca.issue(&["ops-client"], 7, ExtendedKeyUsagePurpose::ClientAuth);
    let refused = healthz(ops, &client(&ca, &[b"http/1.1"], Some(&outsider))).await;
    assert!(
        refused.is_err(),
        "a client certificate from another CA was accepted: {refused:?}"
    );

    let operator = clients.issue(&["ops-client"], 8, ExtendedKeyUsagePurpose::ClientAuth);
    let status = healthz(ops, &client(&ca, &[b"http/1.1"], Some(&operator)))
        .await
        .expect("a client certificate from the client CA is accepted");
    assert_eq!(status, StatusCode::OK);
}
