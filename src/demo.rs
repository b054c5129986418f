//! `warden demo`: the CA quickstart on loopback, in a throwaway directory.
//! Each step prints what it did and whether that is what should happen;
//! the command exits 0 only when every step behaved.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use warden_ca::client::{CaClient, ClientError};
use warden_ca::{Authority, CaService, InitOptions};
use warden_config::{SpiffeId, TrustDomain};

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

/// Runs the demo script.
pub async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("ca");
    let td = TrustDomain::parse("demo.warden.test")?;
    let now = OffsetDateTime::now_utc();
    let mut s = Script::default();

    println!("warden demo: a CA on loopback, in {}", dir.display());
    let authority = Authority::init(&dir, &td, &InitOptions::default(), now)?;
    s.step(
        true,
        "ca init",
        format!("root + intermediate for trust domain {td}"),
    );
    let svc = Arc::new(CaService::open(authority)?);
    let bundle_pem = svc.authority.bundle_pem().to_owned();

    let api = warden_ca::server::bind("api", "127.0.0.1:0".parse()?).await?;
    let admin = warden_ca::server::bind("admin", "127.0.0.1:0".parse()?).await?;
    let (api_addr, admin_addr) = (api.local_addr()?, admin.local_addr()?);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(warden_ca::server::run(svc.clone(), api, admin, shutdown));

    let web = SpiffeId::new(&td, "/ns/shop/sa/web")?;
    let client = CaClient::new(&api_addr.to_string(), td.clone(), &bundle_pem)?;
    let (token, _) = svc.create_token(&web, None, now)?;
    s.step(true, "ca token", format!("one-time join token for {web}"));

    let creds = client.bootstrap(&web, &token, None).await;
    match &creds {
        Ok(c) => s.step(
            true,
            "certify with the token",
            format!(
                "got {} valid until {}",
                c.spiffe_id,
                c.not_after
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            ),
        ),
        Err(e) => s.step(false, "certify with the token", e),
    }
    let again = client.bootstrap(&web, &token, None).await;
    s.step(
        refused(&again, "token-used"),
        "reuse the token",
        outcome(&again),
    );

    if let Ok(creds) = &creds {
        let renewed = client.renew(creds, None).await;
        s.step(
            renewed.is_ok(),
            "renew over mTLS with the current certificate",
            outcome(&renewed),
        );
        svc.set_denied(&web, true, OffsetDateTime::now_utc())?;
        let denied = client.renew(creds, None).await;
        s.step(
            refused(&denied, "denied"),
            "deny the identity, then renew",
            outcome(&denied),
        );
    }

    let audit = warden_ca::audit::verify_dir(&dir);
    s.step(
        audit.is_ok(),
        "audit verify",
        match &audit {
            Ok(n) => format!("{n} hash-chained lines intact"),
            Err(e) => e.to_string(),
        },
    );

    let metrics = http_get(admin_addr, "/metrics").await.unwrap_or_default();
    let shown: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("warden_ca_issuances_total") || l.starts_with("warden_ca_refusals_total")
        })
        .collect();
    s.step(
        !shown.is_empty(),
        "metrics",
        format!("http://{admin_addr}/metrics"),
    );
    for line in shown {
        println!("         {line}");
    }

    let _ = stop.send(true);
    let _ = server.await;
    remove_quietly(tmp.path());
    if s.failed == 0 {
        println!("demo: every step behaved as expected");
        Ok(())
    } else {
        Err(format!("demo: {} step(s) did not behave as expected", s.failed).into())
    }
}

fn refused<T>(r: &Result<T, ClientError>, reason: &str) -> bool {
    matches!(r, Err(ClientError::Refused { reason: got, .. }) if got == reason)
}

fn outcome<T>(r: &Result<T, ClientError>) -> String {
    match r {
        Ok(_) => "issued".into(),
        Err(e) => e.to_string(),
    }
}

/// A minimal HTTP/1.0 GET for the admin port (plain HTTP on loopback).
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

fn remove_quietly(path: &Path) {
    let _ = std::fs::remove_dir_all(path);
}
