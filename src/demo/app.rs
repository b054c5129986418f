//! The demo's sample app and its callers, in plain HTTP/1.1 on loopback:
//! the app answers every request with the identity warden told it about.

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// One request as the demo's servers see it.
pub struct Received {
    /// The request target.
    pub path: String,
    /// Header lines, `name: value`, as sent.
    pub headers: Vec<String>,
    /// The body (Content-Length bytes, at most 1 MiB).
    pub body: Vec<u8>,
}

impl Received {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|l| {
            l.split_once(':')
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim())
        })
    }
}

/// Serves keep-alive HTTP/1.1 on 127.0.0.1:0: each request is answered
/// 200 with `handler`'s (content type, body).
pub async fn serve_with(
    handler: fn(&Received) -> (&'static str, String),
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, handler));
        }
    });
    Ok(addr)
}

/// Starts the app: it answers `hello <caller's SPIFFE ID>`, read from
/// `x-forwarded-client-cert` (or `hello nobody`).
pub async fn start() -> std::io::Result<SocketAddr> {
    serve_with(|req| {
        let caller = req
            .header("x-forwarded-client-cert")
            .and_then(|v| v.split(';').find_map(|p| p.strip_prefix("URI=")))
            .unwrap_or("nobody");
        ("text/plain", format!("hello {caller}\n"))
    })
    .await
}

async fn serve(stream: TcpStream, handler: fn(&Received) -> (&'static str, String)) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    loop {
        let mut req = Received {
            path: String::new(),
            headers: Vec::new(),
            body: Vec::new(),
        };
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            if req.path.is_empty() {
                req.path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
            } else {
                req.headers.push(line.trim_end().to_owned());
            }
        }
        let len: usize = req
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        req.body = vec![0; len.min(1 << 20)];
        if r.read_exact(&mut req.body).await.is_err() {
            return;
        }
        let (content_type, body) = handler(&req);
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if w.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// One GET on a kept-alive plain connection: (status, body).
pub async fn get(stream: &mut TcpStream, path: &str) -> std::io::Result<(u16, String)> {
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: app\r\nContent-Length: 0\r\n\r\n").as_bytes(),
        )
        .await?;
    read_response(stream).await
}

/// Reads one response with a Content-Length body.
pub async fn read_response<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<(u16, String)> {
    read_response_with_head(stream)
        .await
        .map(|(status, _, body)| (status, body))
}

/// Reads one response with a Content-Length body: (status, head, body).
pub async fn read_response_with_head<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<(u16, String, String)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        })
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    stream.read_exact(&mut body).await?;
    Ok((status, head, String::from_utf8_lossy(&body).into_owned()))
}

/// A plain HTTP GET on a fresh connection (admin endpoints).
pub async fn fetch(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    get(&mut s, path).await
}
