//! Child `warden` processes for the demo: each is the real binary, started
//! like a user would, with its `listening`/`ready` lines read back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running `warden` child, killed when dropped.
pub struct Warden {
    /// The process; owned so that dropping this kills it.
    _child: Child,
    /// Its listeners by name.
    pub addrs: HashMap<String, SocketAddr>,
}

impl Warden {
    /// Starts `warden <args>` and waits (up to 20 s) for its `ready` line.
    pub async fn start(args: &[&str]) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args(args)
            .env(
                "WARDEN_LOG",
                std::env::var("WARDEN_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut addrs = HashMap::new();
        let wait = async {
            while let Ok(Some(line)) = lines.next_line().await {
                let parts: Vec<&str> = line.split_whitespace().collect();
                match parts.as_slice() {
                    ["listening", name, addr] => {
                        if let Ok(a) = addr.parse() {
                            addrs.insert((*name).to_owned(), a);
                        }
                    }
                    ["ready"] => return Ok(()),
                    _ => {}
                }
            }
            Err(format!(
                "warden {} exited before it was ready",
                args.join(" ")
            ))
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .map_err(|_| format!("warden {} was not ready in 20 s", args.join(" ")))??;
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            _child: child,
            addrs,
        })
    }

    /// The address of listener `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addrs
            .get(name)
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }
}

/// Writes `text` to `dir/name` and returns the path as a string.
pub fn write(dir: &Path, name: &str, text: &str) -> Result<String, String> {
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path.display().to_string())
}
