//! A real PostgreSQL server for tests: `initdb` and `pg_ctl` (Debian's
//! `postgresql`), on a free loopback port with its socket in a temp dir,
//! stopped on drop. Run as the `postgres` user when the tests run as root
//! (initdb refuses root). Without PostgreSQL installed a test prints a
//! notice and passes, except under CI (`CI=true`), where it fails.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running server, stopped (immediately) on drop.
pub struct Postgres {
    tmp: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

fn find_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p).find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
    });
    on_path.or_else(|| {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .collect();
        found.sort();
        found.pop()
    })
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// `program args...`, as the postgres user when we are root.
fn as_postgres(program: &Path, args: &[&str]) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            "postgres",
            "--regid",
            "postgres",
            "--init-groups",
            "--",
        ])
        .arg(program)
        .args(args);
        c
    } else {
        let mut c = Command::new(program);
        c.args(args);
        c
    }
}

impl Postgres {
    /// Starts one; `None` (after a notice) when PostgreSQL is not installed,
    /// unless under CI.
    pub fn start() -> Option<Self> {
        let Some(bin) = find_bin() else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "PostgreSQL (initdb, pg_ctl) is not installed, and CI=true requires the \
                     replica tests (apt-get install -y postgresql; .ci/run does it)"
                );
            }
            eprintln!("notice: PostgreSQL is not installed; replica test skipped");
            return None;
        };
        let tmp = tempfile::tempdir().unwrap();
        // The postgres user must reach its directories.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args([
                    "postgres:postgres",
                    data.to_str().unwrap(),
                    tmp.path().to_str().unwrap(),
                ])
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown to postgres failed (is the postgres user there?)");
        }
        let out = as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "warden",
                "--no-sync",
            ],
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for _ in 0..5 {
            let port = super::free_port();
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=50",
                tmp.path().display()
            );
            let log = tmp.path().join("log");
            let started = as_postgres(
                &bin.join("pg_ctl"),
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-o",
                    &opts,
                    "-l",
                    log.to_str().unwrap(),
                    "-w",
                    "-t",
                    "30",
                    "start",
                ],
            )
            .output()
            .unwrap();
            if started.status.success() {
                return Some(Self { tmp, bin, port });
            }
        }
        panic!("PostgreSQL did not start on any of 5 free ports");
    }

    /// Runs `sql` with psql; returns what it printed (unaligned, tuples only).
    pub fn query(&self, sql: &str) -> String {
        let psql = Some(self.bin.join("psql"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("psql"));
        let out = Command::new(psql)
            .args([&self.url(), "-At", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The URL for `store:` in `ca.yaml`.
    pub fn url(&self) -> String {
        format!("postgres://warden@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.tmp.path().join("data");
        let _ = as_postgres(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        )
        .output();
    }
}
