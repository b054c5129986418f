//! Memory of idle mTLS connections: starts a real `warden proxy` inbound,
//! reads its RSS, opens N mTLS connections (full handshakes with a client
//! certificate, then nothing), reads the RSS again and prints the cost per
//! connection.
//!
//! `cargo bench --bench idle` (N: `IDLE_CONNS`, default 5000)

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmarks fail loudly by design

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

#[path = "../tests/common/mod.rs"]
mod common;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn main() {
    let n: usize = std::env::var("IDLE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let bin = env!("CARGO_BIN_EXE_warden");
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let run = |args: &[&str]| {
        assert!(
            Command::new(bin)
                .args(args)
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success()
        )
    };
    run(&[
        "ca",
        "init",
        "--dir",
        &s(&d.join("ca")),
        "--trust-domain",
        "bench.local",
    ]);
    for who in ["server", "client"] {
        run(&[
            "ca",
            "issue",
            "--dir",
            &s(&d.join("ca")),
            "--spiffe-id",
            &format!("spiffe://bench.local/{who}"),
            "--out-dir",
            &s(&d.join(who)),
        ]);
    }
    let sd = d.join("server");
    let config = format!(
        "identity:\n  cert: {}\n  key: {}\n  bundle: {}\nadmin: 127.0.0.1:0\nworkers: 1\ninbound:\n  - name: in\n    listen: 127.0.0.1:0\n    app: 127.0.0.1:9\n    limits: {{max_connections: 20000, idle_timeout: 1h}}\n    policy:\n      rules:\n        - {{name: c, action: allow, from: [spiffe://bench.local/client]}}\n",
        s(&sd.join("cert.pem")),
        s(&sd.join("key.pem")),
        s(&sd.join("bundle.pem"))
    );
    std::fs::write(d.join("in.yaml"), config).unwrap();
    let mut child = Command::new(bin)
        .args(["proxy", "--config", &s(&d.join("in.yaml"))])
        .env("WARDEN_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut addr = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(a) = line.strip_prefix("listening in ") {
            addr = Some(a.parse::<std::net::SocketAddr>().unwrap());
        }
        if line == "ready" {
            break;
        }
    }
    let addr = addr.unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id();
    let start = rss_kib(pid);

    let cd = d.join("client");
    let read = |f: &str| std::fs::read_to_string(cd.join(f)).unwrap();
    let config = common::client_config(
        &read("bundle.pem"),
        Some((&read("cert.pem"), &read("key.pem"))),
    );
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let conns = rt.block_on(async move {
        let sem = Arc::new(tokio::sync::Semaphore::new(64));
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (connector, sem) = (connector.clone(), sem.clone());
                tokio::spawn(async move {
                    let _p = sem.acquire().await.unwrap();
                    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                    connector
                        .connect(ServerName::try_from("in.invalid").unwrap(), tcp)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut conns = Vec::with_capacity(n);
        for t in tasks {
            conns.push(t.await.unwrap());
        }
        // Let the server finish every handshake (TLS 1.3: it reads the client's Finished last).
        tokio::time::sleep(Duration::from_secs(2)).await;
        conns
    });
    let open = rss_kib(pid);
    let per_conn = (open.saturating_sub(start)) as f64 * 1024.0 / n as f64;
    println!("idle mTLS connections: {n}");
    println!("RSS after start:       {:.1} MiB", start as f64 / 1024.0);
    println!("RSS with {n} open:   {:.1} MiB", open as f64 / 1024.0);
    println!("per idle connection:   {:.1} KiB", per_conn / 1024.0);
    drop(conns);
    let _ = child.kill();
    let _ = child.wait();
}
