//! h2 over mTLS from a test: several requests on one connection, concurrently.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::{Creds, client_config};

/// What an h2 request got: status, headers and body; or how its stream failed.
pub type H2Answer = Result<(u16, http::HeaderMap, String), String>;

/// Sends `reqs` over one h2 connection to `addr` as `who`.
pub fn h2_send(
    addr: SocketAddr,
    bundle: &str,
    who: &Creds,
    reqs: Vec<http::Request<Full<Bytes>>>,
) -> Vec<H2Answer> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut config = client_config(bundle, Some((&who.chain(), &who.key())));
    config.alpn_protocols = vec![b"h2".to_vec()];
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect("proxy.invalid".try_into().unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .max_header_list_size(1 << 20)
                .handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let handles: Vec<_> = reqs
            .into_iter()
            .map(|r| {
                let mut send = send.clone();
                tokio::spawn(async move {
                    let resp = send.send_request(r).await.map_err(|e| e.to_string())?;
                    let status = resp.status().as_u16();
                    let headers = resp.headers().clone();
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| e.to_string())?
                        .to_bytes();
                    Ok((status, headers, String::from_utf8_lossy(&body).to_string()))
                })
            })
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    })
}
