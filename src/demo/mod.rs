//! `warden demo`: the whole system on loopback, in a throwaway directory.
//!
//! A CA server; a sample app that answers with the identity it received,
//! behind an inbound sidecar; two client workloads, each with an outbound
//! sidecar that bootstraps its identity from the CA with a join token: `web`
//! is allowed, `batch` is not. Every warden is the real binary in its own
//! process. Each step prints what happened and whether that was expected;
//! the command exits 0 only when every step behaved.

mod app;
mod model;
mod procs;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use warden_ca::{Authority, CaService, InitOptions, files_out};
use warden_config::{IdentityPattern, SpiffeId, TrustDomain};

use procs::{Warden, write};

type DemoResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Tallies the steps.
#[derive(Default)]
struct Script {
    failed: usize,
}

impl Script {
    fn step(&mut self, ok: bool, what: &str, outcome: impl std::fmt::Display) {
        let mark = if ok { "ok  " } else { "FAIL" };
        println!("[{mark}] {what}: {outcome}");
        if !ok {
            self.failed += 1;
        }
    }
}

const TD: &str = "demo.warden.test";

fn id(path: &str) -> DemoResult<SpiffeId> {
    Ok(SpiffeId::parse(&format!("spiffe://{TD}{path}"))?)
}

/// Runs the demo; with `keep_running`, leaves everything up until Ctrl-C.
pub async fn run(keep_running: bool) -> DemoResult<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let mut s = Script::default();
    println!(
        "warden demo: CA, app + inbound sidecar, two clients with outbound sidecars, on loopback"
    );
    println!("             (files in {})", root.display());

    // The CA.
    let ca_dir = root.join("ca");
    let td = TrustDomain::parse(TD)?;
    let svc = CaService::open(Authority::init(
        &ca_dir,
        &td,
        &InitOptions::default(),
        OffsetDateTime::now_utc(),
    )?)?;
    // The model sidecar may ask the CA to deny a caller (the escalation ladder's last step).
    let ca_yaml = ca_dir.join("ca.yaml");
    let text = std::fs::read_to_string(&ca_yaml)?.replace(
        "deny_reporters: []",
        &format!("deny_reporters: [spiffe://{TD}/ns/ml/sa/model]"),
    );
    std::fs::write(&ca_yaml, text)?;
    let ca_dir_s = ca_dir.display().to_string();
    let ca = Warden::start(&[
        "ca",
        "serve",
        "--dir",
        &ca_dir_s,
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ])
    .await?;
    s.step(
        true,
        "CA",
        format!("trust domain {TD}, API on https://{}", ca.addr("api")),
    );

    // The app and its inbound sidecar (certificate files, as a gateway or a
    // workload given files by `warden ca issue` would have).
    let app_addr = app::start().await?;
    let (app_id, web_id, batch_id, loadgen_id) = (
        id("/ns/shop/sa/orders")?,
        id("/ns/shop/sa/web")?,
        id("/ns/batch/sa/report")?,
        id("/ns/shop/sa/loadgen")?,
    );
    let app_creds = root.join("orders");
    issue_files(&svc, &app_id, &app_creds)?;
    let sidecar = Warden::start(&[
        "proxy",
        "--config",
        &write(root, "orders.yaml", &inbound_config(&app_creds, app_addr))?,
    ])
    .await?;
    let inbound = sidecar.addr("orders");

    // Two clients, each bootstrapping from the CA with a join token.
    let web = client(&svc, root, "web", &web_id, ca.addr("api"), inbound, &app_id).await?;
    let batch = client(
        &svc,
        root,
        "batch",
        &batch_id,
        ca.addr("api"),
        inbound,
        &app_id,
    )
    .await?;
    s.step(
        true,
        "identities issued",
        format!("{app_id} (files), {web_id} and {batch_id} (join token -> CSR -> CA)"),
    );

    // An allowed call, through web's outbound sidecar.
    let mut web_conn = TcpStream::connect(web.addr("to-orders")).await?;
    let r = app::get(&mut web_conn, "/api/orders").await;
    let expected = format!("hello {web_id}");
    let ok = matches!(&r, Ok((200, body)) if body.trim() == expected);
    s.step(
        ok,
        "web -> orders",
        outcome(&r, "the app saw the caller's verified identity"),
    );

    // A call the policy does not allow.
    let r = app::fetch(batch.addr("to-orders"), "/api/orders").await;
    let ok = matches!(&r, Ok((403, _)));
    s.step(
        ok,
        "batch -> orders",
        outcome(&r, "refused by the policy (default deny)"),
    );

    // A client with no certificate at all.
    let refused = tls_call(inbound, &svc, None)
        .await
        .map(|(status, _)| status);
    s.step(
        refused.is_err(),
        "a client without a certificate",
        match &refused {
            Err(e) => format!("refused at the TLS handshake ({e})"),
            Ok(status) => format!("got an answer ({status}): should have been refused"),
        },
    );

    // Rotation under steady traffic.
    let loadgen = root.join("loadgen");
    issue_files(&svc, &loadgen_id, &loadgen)?;
    let (failed, total, rotated) = rotate_under_load(
        &svc,
        &app_id,
        &app_creds,
        &loadgen,
        inbound,
        web.addr("to-orders"),
    )
    .await?;
    s.step(
        failed == 0 && total > 0 && rotated,
        "certificate rotation under steady traffic",
        format!(
            "{total} requests, {failed} failed; new handshakes {} the new certificate",
            if rotated { "got" } else { "did NOT get" }
        ),
    );

    // Model API protection.
    let model_sidecar = model::run(&mut s, &svc, root, &ca).await?;

    // Metrics.
    let metrics_url = format!("http://{}/metrics", sidecar.addr("admin"));
    let (_, text) = app::fetch(sidecar.addr("admin"), "/metrics")
        .await
        .unwrap_or_default();
    let shown: Vec<&str> = text
        .lines()
        .filter(|l| !l.ends_with(" 0"))
        .filter(|l| {
            l.starts_with("warden_proxy_authz_decisions_total")
                || l.starts_with("warden_proxy_requests_total")
                || l.starts_with("warden_proxy_handshake_failures_total")
        })
        .collect();
    s.step(!shown.is_empty(), "metrics", &metrics_url);
    for line in &shown {
        println!("         {line}");
    }
    let (_, text) = app::fetch(model_sidecar.addr("admin"), "/metrics")
        .await
        .unwrap_or_default();
    for line in text.lines().filter(|l| {
        !l.ends_with(" 0")
            && (l.starts_with("warden_model_decisions_total")
                || l.starts_with("warden_model_escalations_total")
                || l.starts_with("warden_model_ca_reports_total")
                || l.starts_with("warden_model_charged_total"))
    }) {
        println!("         {line}");
    }

    if keep_running {
        println!("\nEverything stays up until Ctrl-C. Try:");
        println!(
            "  curl http://{}/api/orders     # as {web_id}: 200",
            web.addr("to-orders")
        );
        println!(
            "  curl http://{}/api/orders     # as {batch_id}: 403",
            batch.addr("to-orders")
        );
        println!("  curl {metrics_url}");
        let _ = tokio::signal::ctrl_c().await;
    }
    drop((web_conn, web, batch, sidecar, ca));
    if s.failed == 0 {
        println!("demo: every step behaved as expected");
        Ok(())
    } else {
        Err(format!("demo: {} step(s) did not behave as expected", s.failed).into())
    }
}

fn outcome(r: &std::io::Result<(u16, String)>, meaning: &str) -> String {
    match r {
        Ok((status, body)) => format!(
            "{status} {:?}: {meaning}",
            body.lines().next().unwrap_or("")
        ),
        Err(e) => format!("failed: {e}"),
    }
}

fn issue_files(svc: &CaService, id: &SpiffeId, dir: &Path) -> DemoResult<()> {
    let (issued, key) = svc.issue_local(id, None, "offline", OffsetDateTime::now_utc())?;
    files_out::write_credentials(dir, &issued.svid.chain_pem, &key, &issued.bundle_pem)?;
    Ok(())
}

fn identity_files(dir: &Path) -> String {
    format!(
        "identity:\n  cert: {}\n  key: {}\n  bundle: {}\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
        dir.join("bundle.pem").display()
    )
}

fn inbound_config(creds: &Path, app: SocketAddr) -> String {
    format!(
        "{}admin: 127.0.0.1:0\ninbound:\n  - name: orders\n    listen: 127.0.0.1:0\n    app: {app}\n    policy:\n      rules:\n        - name: shop-api\n          action: allow\n          from: [spiffe://{TD}/ns/shop/*]\n          methods: [GET, POST]\n          paths: [/api/*]\n",
        identity_files(creds)
    )
}

/// A client workload's outbound sidecar, bootstrapped from the CA with a token.
async fn client(
    svc: &CaService,
    root: &Path,
    name: &str,
    id: &SpiffeId,
    ca: SocketAddr,
    inbound: SocketAddr,
    server: &SpiffeId,
) -> DemoResult<Warden> {
    let (token, _) = svc.create_token(id, None, OffsetDateTime::now_utc())?;
    let token_file = write(root, &format!("{name}.token"), &token)?;
    let bundle = root.join("ca").join("bundle.pem");
    let config = format!(
        "identity:\n  ca_url: https://{ca}\n  token_file: {token_file}\n  spiffe_id: {id}\n  bundle: {}\nadmin: 127.0.0.1:0\noutbound:\n  - name: to-orders\n    listen: 127.0.0.1:0\n    destination: {inbound}\n    server_id: {server}\n",
        bundle.display()
    );
    let path = write(root, &format!("{name}.yaml"), &config)?;
    Ok(Warden::start(&["proxy", "--config", &path]).await?)
}

/// One GET on a fresh TLS connection to the inbound: the server must prove
/// `spiffe://<td>/ns/shop/sa/orders`; the client presents `creds` (a
/// directory with cert.pem and key.pem) or no certificate. Returns the status
/// and the server's leaf certificate.
async fn tls_call(
    inbound: SocketAddr,
    svc: &CaService,
    creds: Option<&Path>,
) -> Result<(u16, Vec<u8>), String> {
    let provider = warden_ca::tls::provider();
    let roots = warden_ca::tls::root_store(&svc.authority.bundle()).map_err(|e| e.to_string())?;
    let verifier = warden_ca::tls::SpiffeServerVerifier::new(
        roots,
        svc.authority.trust_domain().clone(),
        IdentityPattern::parse(&format!("spiffe://{TD}/ns/shop/sa/orders"))
            .map_err(|e| e.to_string())?,
        provider.clone(),
    );
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let config = match creds {
        Some(dir) => {
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).map_err(|e| e.to_string());
            let key =
                warden_ca::tls::certified_key(&read("cert.pem")?, &read("key.pem")?, &provider)
                    .map_err(|e| e.to_string())?;
            let resolver = Arc::new(warden_ca::tls::RotatingCert::default());
            resolver.set(key);
            builder.with_client_cert_resolver(resolver)
        }
        None => builder.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(inbound)
        .await
        .map_err(|e| e.to_string())?;
    let name =
        rustls_pki_types::ServerName::try_from("orders.invalid").map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    // TLS 1.3: a refused client certificate shows up with the first read.
    tls.write_all(b"GET /api/load HTTP/1.1\r\nHost: orders\r\nContent-Length: 0\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let (status, _) = app::read_response(&mut tls)
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, leaf))
}

/// Two streams of requests, one over web's pooled connection and one doing a
/// full mTLS handshake each time, while the app's certificate files are
/// replaced. Returns (failed, total, whether new handshakes saw the new certificate).
async fn rotate_under_load(
    svc: &CaService,
    app_id: &SpiffeId,
    app_creds: &Path,
    loadgen: &Path,
    inbound: SocketAddr,
    web_outbound: SocketAddr,
) -> DemoResult<(usize, usize, bool)> {
    let failed = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(AtomicUsize::new(0));
    let (_, before) = tls_call(inbound, svc, Some(loadgen)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(2500);
    let pooled = {
        let (failed, total) = (failed.clone(), total.clone());
        tokio::spawn(async move {
            let Ok(mut conn) = TcpStream::connect(web_outbound).await else {
                return;
            };
            while tokio::time::Instant::now() < deadline {
                total.fetch_add(1, Ordering::Relaxed);
                if !matches!(app::get(&mut conn, "/api/orders").await, Ok((200, _))) {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let mut after = before.clone();
    let mut rotated_at = None;
    while tokio::time::Instant::now() < deadline {
        if rotated_at.is_none()
            && deadline - tokio::time::Instant::now() < Duration::from_millis(1800)
        {
            issue_files(svc, app_id, app_creds)?;
            rotated_at = Some(tokio::time::Instant::now());
        }
        total.fetch_add(1, Ordering::Relaxed);
        match tls_call(inbound, svc, Some(loadgen)).await {
            Ok((200, leaf)) => after = leaf,
            _ => {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let _ = pooled.await;
    Ok((
        failed.load(Ordering::Relaxed),
        total.load(Ordering::Relaxed),
        after != before,
    ))
}
