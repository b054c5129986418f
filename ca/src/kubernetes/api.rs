//! Calls to the Kubernetes API (and to the cluster's OIDC endpoints): HTTPS
//! with the cluster's CA, a bearer token re-read on every call (the kubelet
//! rotates it), bounded answers and a deadline. One connection per call:
//! attestations are rare (a pod's start, a token refresh).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use warden_config::kubernetes::ApiAccess;

/// How long one call may take, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read (a Pod object, a TokenReview, a JWKS).
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// One HTTPS origin (`host:port`) of the cluster.
#[derive(Debug, Clone)]
pub struct Api {
    origin: String,
    host: String,
    tls: Arc<ClientConfig>,
    /// Sent as `Authorization: Bearer`; `None` for a third-party origin.
    token_file: Option<PathBuf>,
}

impl Api {
    /// The API server as configured, or in-cluster (`KUBERNETES_SERVICE_HOST`
    /// and `KUBERNETES_SERVICE_PORT`), trusting `ca_file`.
    pub fn new(access: &ApiAccess) -> Result<Self, String> {
        let url = match &access.url {
            Some(u) => u.clone(),
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                    "kubernetes.api.url is not set and KUBERNETES_SERVICE_HOST is not in the environment (not running in a pod?)".to_owned()
                })?;
                let port =
                    std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
                if host.contains(':') {
                    format!("https://[{host}]:{port}")
                } else {
                    format!("https://{host}:{port}")
                }
            }
        };
        let pem = std::fs::read_to_string(&access.ca_file)
            .map_err(|e| format!("kubernetes API CA {}: {e}", access.ca_file.display()))?;
        let tls = tls_config(&pem)
            .map_err(|e| format!("kubernetes API CA {}: {e}", access.ca_file.display()))?;
        let mut api = Self::origin_of(&url, tls)?;
        api.token_file = Some(access.token_file.clone());
        Ok(api)
    }

    fn origin_of(url: &str, tls: Arc<ClientConfig>) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("{url:?} is not an https:// URL"));
        }
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{url:?} has no host"))?;
        let port = uri.port_u16().unwrap_or(443);
        let origin = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Self {
            origin,
            host,
            tls,
            token_file: None,
        })
    }

    /// A client for another URL's origin, with the same trust; the bearer
    /// token goes only to the API server itself.
    pub fn for_url(&self, url: &str) -> Result<(Self, String), String> {
        let mut other = Self::origin_of(url, self.tls.clone())?;
        if other.origin == self.origin {
            other.token_file.clone_from(&self.token_file);
        }
        let path = url
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.path_and_query().map(|p| p.as_str().to_owned()))
            .unwrap_or_else(|| "/".to_owned());
        Ok((other, path))
    }

    /// `GET path`; the status and at most `limit` bytes of the answer.
    pub async fn get(&self, path: &str, limit: usize) -> Result<(StatusCode, Bytes), String> {
        self.call(Method::GET, path, Bytes::new(), limit).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(
        &self,
        path: &str,
        body: Vec<u8>,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), String> {
        self.call(Method::POST, path, body.into(), limit).await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), String> {
        match tokio::time::timeout(CALL_TIMEOUT, self.call_inner(method, path, body, limit)).await {
            Ok(r) => r.map_err(|e| format!("{}: {e}", self.origin)),
            Err(_) => Err(format!("{}: timed out", self.origin)),
        }
    }

    async fn call_inner(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), String> {
        let bearer = match &self.token_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| format!("token {}: {e}", f.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let tcp = TcpStream::connect(&self.origin)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.host.clone()).map_err(|e| e.to_string())?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.origin.as_str())
            .header(header::ACCEPT, "application/json")
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| format!("answer: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
}

fn tls_config(ca_pem: &str) -> Result<Arc<ClientConfig>, String> {
    let certs = warden_identity::pem::parse_certs(ca_pem)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| e.to_string())?;
    }
    let provider = warden_identity::tls::provider();
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
