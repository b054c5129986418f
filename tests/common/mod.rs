//! Test harness: runs the real `warden` binary on 127.0.0.1:0, reads its
//! `listening`/`ready` lines, mints keys and CSRs with rcgen, talks real TLS,
//! and checks certificates with webpki, x509-parser and `openssl verify`.
//! Verification here deliberately uses stock rustls/webpki, not warden's code.
#![allow(dead_code)]

pub mod h2;
pub mod kube;
pub mod model;
pub mod postgres;
#[macro_use]
pub mod redis;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// The binary under test.
pub fn warden() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_warden"));
    c.env("WARDEN_LOG", "warn");
    c
}

/// Runs warden with `args`; returns its output whatever the exit code.
pub fn run(args: &[&str]) -> Output {
    warden().args(args).output().expect("warden runs")
}

/// Runs warden and requires success; returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "warden {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// A CA directory made by `warden ca init` in a temp dir.
pub struct Ca {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub td: String,
}

impl Ca {
    pub fn init(td: &str) -> Ca {
        Self::init_with(td, &[])
    }

    /// `warden ca init` with more flags (`--intermediate-ttl 30s`, say).
    pub fn init_with(td: &str, flags: &[&str]) -> Ca {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let mut args = vec!["ca", "init", "--dir", s(&dir), "--trust-domain", td];
        args.extend_from_slice(flags);
        run_ok(&args);
        Ca {
            tmp,
            dir,
            td: td.to_owned(),
        }
    }

    pub fn dir(&self) -> &str {
        s(&self.dir)
    }

    pub fn id(&self, path: &str) -> String {
        format!("spiffe://{}{path}", self.td)
    }

    pub fn token(&self, id: &str) -> String {
        run_ok(&["ca", "token", "--dir", self.dir(), "--spiffe-id", id])
            .trim()
            .to_owned()
    }

    pub fn bundle_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("bundle.pem")).unwrap()
    }

    /// `warden ca issue` into a fresh directory under the temp dir.
    pub fn issue(&self, id: &str, ttl: Option<&str>) -> PathBuf {
        let out = self.tmp.path().join(format!("out-{}", rand_suffix()));
        let mut args = vec![
            "ca",
            "issue",
            "--dir",
            self.dir(),
            "--spiffe-id",
            id,
            "--out-dir",
            s(&out),
        ];
        if let Some(t) = ttl {
            args.extend(["--ttl", t]);
        }
        run_ok(&args);
        out
    }

    pub fn serve(&self) -> Server {
        Server::start(&self.dir)
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A port on 127.0.0.1 that was free a moment ago (for listeners that must
/// keep their port across restarts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// POST over TLS with stock rustls, verifying the server's certificate for
/// `name` against `bundle` (as the API server verifies a webhook):
/// (status, body).
pub fn post_verified(
    addr: SocketAddr,
    bundle: &str,
    name: &str,
    path: &str,
    body: &[u8],
) -> (u16, String) {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server = ServerName::try_from(name.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
    let mut sock = TcpStream::connect(addr).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    write!(
        tls,
        "POST {path} HTTP/1.1\r\nHost: {name}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    tls.write_all(body).unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw);
    parse_response(&raw)
}

pub fn rand_suffix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A running `warden ca serve`, killed on drop.
pub struct Server {
    pub child: Child,
    pub api: SocketAddr,
    pub admin: SocketAddr,
}

impl Server {
    pub fn start(dir: &Path) -> Server {
        Self::start_at(dir, "127.0.0.1:0")
    }

    /// `warden ca serve` with its API on `listen` (a fixed port, so that
    /// proxies find it again after a restart).
    pub fn start_at(dir: &Path, listen: &str) -> Server {
        Self::start_with(dir, listen, &[])
    }

    /// As `start_at`, with more arguments (`--state-dir D`, say).
    pub fn start_with(dir: &Path, listen: &str, extra: &[&str]) -> Server {
        let mut child = warden()
            .args([
                "ca",
                "serve",
                "--dir",
                s(dir),
                "--listen",
                listen,
                "--admin",
                "127.0.0.1:0",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn warden ca serve");
        let addrs = read_listeners(&mut child, String::new);
        Server {
            child,
            api: addrs["api"],
            admin: addrs["admin"],
        }
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let mut status = None;
        wait_for(Duration::from_secs(15), || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.expect("exited after SIGTERM")
    }

    /// GET on the admin port: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        admin_get(self.admin, path)
    }

    /// The value of a metric sample line that starts with `prefix`, or 0.
    pub fn metric(&self, prefix: &str) -> f64 {
        metric(self.admin, prefix)
    }
}

/// A `warden` process started with `args`, killed on drop.
pub struct Running {
    pub child: Child,
    pub addrs: std::collections::HashMap<String, SocketAddr>,
}

impl Running {
    /// Starts `warden args...` and waits for its `ready` line.
    pub fn start(args: &[&str]) -> Running {
        Self::start_until(args, None)
    }

    /// Starts `warden args...` and waits only until `listeners` listeners
    /// are bound (a process that may never be ready).
    pub fn start_bound(args: &[&str], listeners: usize) -> Running {
        Self::start_until(args, Some(listeners))
    }

    fn start_until(args: &[&str], listeners: Option<usize>) -> Running {
        let mut child = warden()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn warden");
        let addrs = read_listeners_until(&mut child, String::new, listeners);
        Running { child, addrs }
    }
}

/// `warden ca issue` of a webhook's serving certificate: `id` with the DNS
/// name `dns`, into `out` (`--ttl` when given); returns its chain (PEM).
pub fn issue_webhook_cert(ca: &Ca, id: &str, dns: &str, out: &Path, ttl: Option<&str>) -> String {
    let mut args = vec![
        "ca",
        "issue",
        "--dir",
        ca.dir(),
        "--spiffe-id",
        id,
        "--dns-name",
        dns,
        "--out-dir",
        s(out),
    ];
    if let Some(t) = ttl {
        args.extend(["--ttl", t]);
    }
    run_ok(&args);
    std::fs::read_to_string(out.join("cert.pem")).unwrap()
}

/// `warden webhook` on 127.0.0.1 (webhook and admin ports) with `args`;
/// waits for its `ready` line when `ready`, else only for its listeners.
pub fn webhook_on_loopback(args: &[&str], ready: bool) -> Running {
    let mut all = vec![
        "webhook",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ];
    all.extend_from_slice(args);
    if ready {
        Running::start(&all)
    } else {
        Running::start_bound(&all, 2)
    }
}

/// `warden webhook` on 127.0.0.1 serving the certificate files in `out`
/// (see [`issue_webhook_cert`]), with sidecars from `bundle`, plus `extra`;
/// `ready` as for [`webhook_on_loopback`].
pub fn webhook_from_files(out: &Path, bundle: &Path, extra: &[&str], ready: bool) -> Running {
    let (cert, key) = (out.join("cert.pem"), out.join("key.pem"));
    let mut args = vec!["--cert", s(&cert), "--key", s(&key), "--bundle", s(bundle)];
    args.extend_from_slice(extra);
    webhook_on_loopback(&args, ready)
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a `warden` child's stdout until its `ready` line and returns its
/// listeners by name; panics with `context()` if it does not get there in 20 s.
fn read_listeners(
    child: &mut Child,
    context: impl Fn() -> String,
) -> std::collections::HashMap<String, SocketAddr> {
    read_listeners_until(child, context, None)
}

/// As `read_listeners`, returning as soon as `listeners` listeners are
/// bound when given (a process that may never be ready).
fn read_listeners_until(
    child: &mut Child,
    context: impl Fn() -> String,
    listeners: Option<usize>,
) -> std::collections::HashMap<String, SocketAddr> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut addrs = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            panic!("warden did not print ready: {}", context());
        };
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["listening", name, a] => {
                addrs.insert((*name).to_owned(), a.parse().unwrap());
                if listeners == Some(addrs.len()) {
                    return addrs;
                }
            }
            ["ready"] => return addrs,
            _ => {}
        }
    }
}

/// GET on an admin listener: (status, body).
pub fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_response(&raw)
}

/// The value of the first metric sample line on `addr` that starts with `prefix`, or 0.
pub fn metric(addr: SocketAddr, prefix: &str) -> f64 {
    let (_, body) = admin_get(addr, "/metrics");
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Splits a raw HTTP/1.1 response into (status, body).
pub fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A P-256 key and a CSR for it asking for `sans`.
pub fn csr(sans: &[&str]) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let pem = csr_with_key(&key, sans);
    (key, pem)
}

pub fn csr_with_key(key: &KeyPair, sans: &[&str]) -> String {
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans
        .iter()
        .map(|s| match s.strip_prefix("DNS:") {
            Some(d) => SanType::DnsName((*d).try_into().unwrap()),
            None => SanType::URI((*s).try_into().unwrap()),
        })
        .collect();
    p.serialize_request(key).unwrap().pem().unwrap()
}

/// Accepts any server chain that stock webpki verifies against `roots`,
/// whatever its names (URI-only SVIDs fail stock name checks by design).
#[derive(Debug)]
struct ChainOnlyVerifier(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnlyVerifier {
    fn verify_server_cert(
        &self,
        ee: &CertificateDer<'_>,
        im: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(ee, im, name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A client identity to present: (chain PEM, key PEM).
pub type ClientCert<'a> = Option<(&'a str, &'a str)>;

pub fn client_config(bundle_pem: &str, client: ClientCert<'_>) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let stock = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnlyVerifier(stock)));
    match client {
        Some((chain, key)) => {
            let chain = CertificateDer::pem_slice_iter(chain.as_bytes())
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
        None => b.with_no_client_auth(),
    }
}

/// One HTTP/1.1 request over TLS; Err when TLS or the connection failed
/// (with TLS 1.3 a refused client certificate shows up on the first read).
pub fn https(
    addr: SocketAddr,
    bundle_pem: &str,
    client: ClientCert<'_>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, String), String> {
    let config = client_config(bundle_pem, client);
    let mut conn = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from("ca.invalid").unwrap(),
    )
    .map_err(|e| e.to_string())?;
    let mut sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: ca\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    // A server that refuses a huge body may close before reading it all.
    let _ = tls.write_all(body);
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if !raw.is_empty() && e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e.to_string()),
    }
    if raw.is_empty() {
        return Err("connection closed without an answer".into());
    }
    Ok(parse_response(&raw))
}

/// POST /v1/certify with a JSON body built from the parts given.
pub fn certify(
    addr: SocketAddr,
    bundle_pem: &str,
    client: ClientCert<'_>,
    csr: &str,
    token: Option<&str>,
) -> Result<(u16, serde_json::Value), String> {
    let mut body = serde_json::json!({ "csr": csr });
    if let Some(t) = token {
        body["token"] = t.into();
    }
    let (status, text) = https(
        addr,
        bundle_pem,
        client,
        "POST",
        "/v1/certify",
        body.to_string().as_bytes(),
    )?;
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    Ok((status, json))
}

/// The problem type's reason part of a refusal answer.
pub fn problem_reason(v: &serde_json::Value) -> String {
    v["type"]
        .as_str()
        .unwrap_or("")
        .trim_start_matches("urn:warden:problem:")
        .to_owned()
}

/// DER certificates in a PEM text.
pub fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap())
        .collect()
}

/// Verifies `chain_pem` (leaf first) against `bundle_pem` with webpki, for client and server use.
pub fn webpki_verifies(chain_pem: &str, bundle_pem: &str) -> Result<(), String> {
    let chain = certs(chain_pem);
    let roots = certs(bundle_pem);
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
        .collect();
    let ee = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| e.to_string())?;
    let now = UnixTime::now();
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain[1..],
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `openssl verify` of a chain file (leaf first) against a bundle file.
pub fn openssl_verifies(dir: &Path, chain_pem: &str, bundle_pem: &str) -> Result<(), String> {
    let chain = certs(chain_pem);
    let write = |name: &str, ders: &[CertificateDer<'_>]| {
        let path = dir.join(name);
        let text: String = ders
            .iter()
            .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.as_ref())))
            .collect();
        std::fs::write(&path, text).unwrap();
        path
    };
    let leaf = write("leaf.pem", &chain[..1]);
    let untrusted = write("untrusted.pem", &chain[1..]);
    let roots = dir.join("roots.pem");
    std::fs::write(&roots, bundle_pem).unwrap();
    let out = Command::new("openssl")
        .args([
            "verify",
            "-purpose",
            "sslclient",
            "-CAfile",
            s(&roots),
            "-untrusted",
            s(&untrusted),
            s(&leaf),
        ])
        .output()
        .map_err(|e| format!("openssl not runnable: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The URI SANs of a certificate.
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    c.subject_alternative_name()
        .unwrap()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Signs a leaf with the CA's own intermediate key, bypassing warden's
/// checks, to make certificates warden itself would never issue.
pub fn forge_leaf(ca_dir: &Path, params: CertificateParams) -> (String, String) {
    let int_pem = std::fs::read_to_string(ca_dir.join("intermediate.pem")).unwrap();
    let int_key =
        KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("intermediate-key.pem")).unwrap())
            .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&int_pem, int_key).unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (format!("{}{}", cert.pem(), int_pem), key.serialize_pem())
}

/// Leaf params shaped like an SVID with the given URI SANs.
pub fn svid_params(uris: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - Duration::from_secs(60);
    p.not_after = now + Duration::from_secs(3600);
    p.use_authority_key_identifier_extension = true;
    p
}

// ---------------------------------------------------------------- proxy ----

/// A tiny HTTP/1.1 app on 127.0.0.1:0 that answers every request with what
/// it received: `METHOD path` on the first line, then each header as
/// `name: value`. `/slow` waits 2 s first. Keep-alive is honoured.
pub struct EchoApp {
    pub addr: SocketAddr,
}

impl EchoApp {
    pub fn start() -> EchoApp {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                std::thread::spawn(move || echo_connection(stream));
            }
        });
        EchoApp { addr }
    }
}

fn echo_connection(stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let Some((head, _body)) = read_request(&mut reader) else {
            return;
        };
        let first = &head[0];
        let mut parts = first.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if target.starts_with("/slow") {
            std::thread::sleep(Duration::from_secs(2));
        }
        let mut text = format!("{method} {target}\n");
        for h in &head[1..] {
            text.push_str(h);
            text.push('\n');
        }
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        if out.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// Reads one HTTP/1.1 request with a Content-Length body: its head lines
/// (the request line first) and its body. None when the connection ends.
pub fn read_request<R: BufRead>(reader: &mut R) -> Option<(Vec<String>, Vec<u8>)> {
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        head.push(line.trim_end().to_owned());
    }
    head.first()?;
    let len = head[1..]
        .iter()
        .filter_map(|h| h.split_once(':'))
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0usize);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some((head, body))
}

/// A TCP echo server on 127.0.0.1:0: writes back every byte it reads.
pub fn tcp_echo() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
    addr
}

/// A running `warden proxy`, killed on drop; `addrs` maps listener names to addresses.
pub struct Proxy {
    pub child: Child,
    pub addrs: std::collections::HashMap<String, SocketAddr>,
    pub stderr: Arc<std::sync::Mutex<String>>,
}

impl Proxy {
    /// Writes `config` to `dir/proxy-<n>.yaml`, starts `warden proxy` on it
    /// and waits for `ready`.
    pub fn start(dir: &Path, config: &str) -> Proxy {
        let path = dir.join(format!("proxy-{}.yaml", rand_suffix()));
        std::fs::write(&path, config).unwrap();
        Self::start_file(&path)
    }

    pub fn start_file(path: &Path) -> Proxy {
        Self::start_file_env(path, &[])
    }

    /// As `start`, with extra environment variables for the process.
    pub fn start_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Proxy {
        let path = dir.join(format!("proxy-{}.yaml", rand_suffix()));
        std::fs::write(&path, config).unwrap();
        Self::start_file_env(&path, env)
    }

    pub fn start_file_env(path: &Path, env: &[(&str, &str)]) -> Proxy {
        Self::spawn(&["--config", s(path)], env, None)
    }

    /// Starts `warden proxy` on `path` and returns once `listeners`
    /// listeners are bound, ready or not (it may have no identity).
    pub fn start_unready(path: &Path, listeners: usize) -> Proxy {
        Self::spawn(&["--config", s(path)], &[], Some(listeners))
    }

    /// Starts `warden proxy --config-env WARDEN_PROXY_CONFIG` with that
    /// variable set to `config` (as an injected sidecar runs) and waits for
    /// `ready`.
    pub fn start_config_env(config: &str) -> Proxy {
        Self::spawn(
            &["--config-env", "WARDEN_PROXY_CONFIG"],
            &[("WARDEN_PROXY_CONFIG", config)],
            None,
        )
    }

    fn spawn(args: &[&str], env: &[(&str, &str)], listeners: Option<usize>) -> Proxy {
        let mut child = warden()
            .env("WARDEN_LOG", "info")
            .envs(env.iter().copied())
            .arg("proxy")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr_pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(std::sync::Mutex::new(String::new()));
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines() {
                let Ok(line) = line else { break };
                log.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let log = stderr.clone();
        let addrs =
            read_listeners_until(&mut child, move || log.lock().unwrap().clone(), listeners);
        Proxy {
            child,
            addrs,
            stderr,
        }
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addrs[name]
    }

    pub fn admin_get(&self, path: &str) -> (u16, String) {
        admin_get(self.addr("admin"), path)
    }

    pub fn metric(&self, prefix: &str) -> f64 {
        metric(self.addr("admin"), prefix)
    }

    /// What the process has written to stderr so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_for(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A workload's credential files (cert.pem, key.pem, bundle.pem) in `dir`.
pub struct Creds {
    pub dir: PathBuf,
}

impl Creds {
    pub fn chain(&self) -> String {
        std::fs::read_to_string(self.dir.join("cert.pem")).unwrap()
    }
    pub fn key(&self) -> String {
        std::fs::read_to_string(self.dir.join("key.pem")).unwrap()
    }
    pub fn bundle(&self) -> String {
        std::fs::read_to_string(self.dir.join("bundle.pem")).unwrap()
    }
    pub fn identity_yaml(&self) -> String {
        format!(
            "identity:\n  cert: {}\n  key: {}\n  bundle: {}\n",
            s(&self.dir.join("cert.pem")),
            s(&self.dir.join("key.pem")),
            s(&self.dir.join("bundle.pem"))
        )
    }
}

/// One HTTP/1.1 request over an established TLS stream; returns (status, body).
pub fn h1_over<S: Read + Write>(
    stream: &mut S,
    method: &str,
    path: &str,
    extra_headers: &str,
) -> std::io::Result<(u16, String)> {
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: app.test\r\n{extra_headers}Content-Length: 0\r\n\r\n"
    )?;
    stream.flush()?;
    read_h1_response(stream)
}

/// Reads one HTTP/1.1 response with a Content-Length body.
pub fn read_h1_response<S: Read>(stream: &mut S) -> std::io::Result<(u16, String)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed",
            ));
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let len = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        })
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0usize);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}

/// An mTLS connection to `addr` presenting `client` (or no certificate).
pub fn mtls_connect(
    addr: SocketAddr,
    bundle: &str,
    client: ClientCert<'_>,
    alpn: &[&[u8]],
) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let mut config = client_config(bundle, client);
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let conn = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from("proxy.invalid").unwrap(),
    )
    .map_err(std::io::Error::other)?;
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(rustls::StreamOwned::new(conn, sock))
}

/// One request on a fresh mTLS connection; Err when the handshake or the
/// connection failed.
pub fn mtls_get(
    addr: SocketAddr,
    bundle: &str,
    client: ClientCert<'_>,
    method: &str,
    path: &str,
    extra: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = mtls_connect(addr, bundle, client, &[b"http/1.1"])?;
    h1_over(&mut s, method, path, extra)
}

/// Plain HTTP/1.1 request to a local (outbound) listener.
pub fn plain_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    h1_over(&mut s, "GET", path, "")
}
