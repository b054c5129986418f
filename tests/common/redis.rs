//! A real `redis-server` for tests, on a free loopback port, killed on
//! drop. Without `redis-server` installed a test prints a notice and passes,
//! except under CI (`CI=true`), where it fails.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process, killed on drop.
pub struct RedisServer {
    pub child: Child,
    pub port: u16,
}

impl RedisServer {
    /// Starts one on a free port; `None` (after a notice) when
    /// `redis-server` is not installed, unless under CI.
    pub fn start() -> Option<Self> {
        Self::start_with(&[])
    }

    /// As [`RedisServer::start`], with more `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> Option<Self> {
        for _ in 0..5 {
            let port = free_port();
            match Self::start_on(port, extra) {
                Ok(Some(server)) => return Some(server),
                Ok(None) => continue,
                Err(()) => return None,
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// `Ok(None)` when it did not come up on `port` (taken meanwhile).
    pub fn start_on(port: u16, extra: &[&str]) -> Result<Option<Self>, ()> {
        let spawned = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!(
                        "redis-server is not installed, and CI=true requires the Redis tests \
                         (apt-get install -y redis-server; .ci/run does it)"
                    );
                }
                eprintln!("notice: redis-server is not installed; Redis store test skipped");
                return Err(());
            }
            Err(e) => panic!("cannot run redis-server: {e}"),
        };
        let mut server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if server.child.try_wait().unwrap().is_some() {
                return Ok(None);
            }
            if ping(port) {
                return Ok(Some(server));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(None)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// True when something on `port` answers PING with PONG.
pub fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Starts a server or skips the test (see [`RedisServer::start`]).
#[allow(unused_macros)]
macro_rules! redis_or_skip {
    () => {
        match RedisServer::start() {
            Some(server) => server,
            None => return,
        }
    };
}
