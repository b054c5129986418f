//! The CA client: bootstrap an identity with a join token, renew it with the
//! current SVID over mTLS, fetch the trust bundle, and (as a deny reporter)
//! ask the CA to deny another identity. The private key is made here and
//! never leaves the caller; only a CSR is sent.
//!
//! The CA server itself must prove `spiffe://<td>/warden/ca` with a chain that
//! verifies against the bundle the caller already trusts.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::ClientConfig;
use rustls::client::ResolvesClientCert;
use rustls_pki_types::ServerName;
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use warden_config::{IdentityPattern, SpiffeId, TrustDomain};

use crate::api::{
    CertifyAnswer, CertifyBody, DenyAnswer, DenyBody, TrustAnswer, WATCH_HOLD, WATCH_PATH,
    server_id,
};
use crate::pem::{parse_certs, validity_of};
use crate::tls::{self, RotatingCert, SpiffeServerVerifier};

/// How long one call to the CA may take, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest answer accepted from the CA.
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// Largest trust feed answer: about 40,000 denied identities of 100 bytes.
const MAX_TRUST_BYTES: usize = 4 << 20;

/// Why a call to the CA failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not reach the CA or the TLS handshake failed.
    #[error("cannot reach the CA at {addr}: {detail}")]
    Unreachable {
        /// Where we tried.
        addr: String,
        /// Why it failed.
        detail: String,
    },
    /// The CA answered with a refusal.
    #[error("the CA refused ({status}, {reason}): {detail}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The problem type's last part (`token-used`, `denied`, ...).
        reason: String,
        /// The CA's explanation.
        detail: String,
    },
    /// The CA's answer was not what the protocol says.
    #[error("unexpected answer from the CA: {0}")]
    Protocol(String),
    /// A local problem (key generation, bad input).
    #[error("{0}")]
    Local(String),
}

/// An identity: certificate chain, private key and trust bundle, all PEM.
#[derive(Clone)]
pub struct Credentials {
    /// The SPIFFE ID the certificate carries.
    pub spiffe_id: SpiffeId,
    /// Leaf then intermediates.
    pub chain_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
    /// Trust roots.
    pub bundle_pem: String,
    /// Leaf NotBefore.
    pub not_before: OffsetDateTime,
    /// Leaf NotAfter.
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The trust feed's answer, checked: see [`CaClient::watch`].
#[derive(Debug, Clone)]
pub struct TrustUpdate {
    /// The feed's sequence number.
    pub sequence: u64,
    /// Trust roots, PEM.
    pub bundle_pem: String,
    /// The same roots, parsed.
    pub roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// Identities every proxy must refuse.
    pub denied: std::collections::HashSet<SpiffeId>,
}

/// What proves the identity asked for.
#[derive(Clone, Copy)]
enum Proof<'a> {
    /// A one-time join token.
    JoinToken(&'a str),
    /// A projected ServiceAccount token.
    ServiceAccount(&'a str),
    /// The current certificate, over mTLS.
    Current(&'a Credentials),
}

/// The SPIFFE ID a projected ServiceAccount token names in `td`:
/// `spiffe://<td>/ns/<namespace>/sa/<service account>`, read from the
/// token's own claims (the CA verifies them; a workload only needs to know
/// what to put in its CSR).
pub fn pod_identity(token: &str, td: &TrustDomain) -> Result<SpiffeId, ClientError> {
    use base64::Engine as _;
    let bad = |what: &str| ClientError::Local(format!("the ServiceAccount token {what}"));
    let payload = token
        .trim()
        .split('.')
        .nth(1)
        .ok_or_else(|| bad("is not a JWT"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| bad("payload is not base64url"))?;
    let claims: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| bad("payload is not JSON"))?;
    let k = &claims["kubernetes.io"];
    let (Some(ns), Some(sa)) = (
        k["namespace"].as_str(),
        k["serviceaccount"]["name"].as_str(),
    ) else {
        return Err(bad(
            "has no kubernetes.io namespace and serviceaccount claims (is it a projected token?)",
        ));
    };
    SpiffeId::new(td, &format!("/ns/{ns}/sa/{sa}"))
        .map_err(|e| bad(&format!("names no valid SPIFFE ID: {e}")))
}

/// A client for one CA server.
#[derive(Debug, Clone)]
pub struct CaClient {
    addr: String,
    host: String,
    trust_domain: TrustDomain,
    /// Shared by every clone: the trust feed updates it when roots rotate,
    /// so the CA's new serving chain keeps verifying.
    bundle_pem: Arc<std::sync::RwLock<String>>,
}

impl CaClient {
    /// A client for the CA at `url` (`https://host:port` or `host:port`) of
    /// `trust_domain`, trusting the roots in `bundle_pem`.
    pub fn new(
        url: &str,
        trust_domain: TrustDomain,
        bundle_pem: &str,
    ) -> Result<Self, ClientError> {
        let addr = url
            .strip_prefix("https://")
            .unwrap_or(url)
            .trim_end_matches('/')
            .to_owned();
        let host = match addr.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => {
                h.trim_start_matches('[').trim_end_matches(']').to_owned()
            }
            _ => {
                return Err(ClientError::Local(format!(
                    "CA address {url:?} needs a host and a port"
                )));
            }
        };
        parse_certs(bundle_pem).map_err(|e| ClientError::Local(format!("trust bundle: {e}")))?;
        Ok(Self {
            addr,
            host,
            trust_domain,
            bundle_pem: Arc::new(std::sync::RwLock::new(bundle_pem.to_owned())),
        })
    }

    /// Trusts the roots in `bundle_pem` from now on (every clone of this
    /// client does), as the CA's trust feed says.
    pub fn set_bundle(&self, bundle_pem: &str) -> Result<(), ClientError> {
        parse_certs(bundle_pem).map_err(|e| ClientError::Local(format!("trust bundle: {e}")))?;
        *self.bundle_pem.write().unwrap_or_else(|p| p.into_inner()) = bundle_pem.to_owned();
        Ok(())
    }

    /// Obtains a first identity for `id` with a one-time join token.
    pub async fn bootstrap(
        &self,
        id: &SpiffeId,
        token: &str,
        ttl: Option<Duration>,
    ) -> Result<Credentials, ClientError> {
        self.certify(id, Proof::JoinToken(token), &[], ttl).await
    }

    /// Obtains an identity with a pod's projected ServiceAccount token; `id`
    /// is the one the token names (see [`pod_identity`]). `dns_names` go in
    /// the CSR beside it: the CA signs them only if its `kubernetes.dns_names`
    /// grants them to `id` (a webhook that the API server verifies by name).
    pub async fn bootstrap_kubernetes(
        &self,
        id: &SpiffeId,
        token: &str,
        dns_names: &[String],
        ttl: Option<Duration>,
    ) -> Result<Credentials, ClientError> {
        self.certify(id, Proof::ServiceAccount(token), dns_names, ttl)
            .await
    }

    /// Renews `current` (same identity, new key) over mTLS with it.
    pub async fn renew(
        &self,
        current: &Credentials,
        ttl: Option<Duration>,
    ) -> Result<Credentials, ClientError> {
        self.certify(&current.spiffe_id, Proof::Current(current), &[], ttl)
            .await
    }

    /// Fetches the trust bundle (PEM) the CA hands out now.
    pub async fn fetch_bundle(&self) -> Result<String, ClientError> {
        let (status, body) = self
            .call(Method::GET, "/v1/bundle", Bytes::new(), None)
            .await?;
        if status != StatusCode::OK {
            return Err(refusal(status, &body));
        }
        let text = String::from_utf8(body.to_vec())
            .map_err(|_| ClientError::Protocol("bundle is not text".into()))?;
        parse_certs(&text).map_err(ClientError::Protocol)?;
        Ok(text)
    }

    /// Asks the CA to deny `target` (its certificate is then not renewed),
    /// over mTLS with `creds`, whose ID must be listed in the CA's
    /// `deny_reporters`. `reason` (1-200 printable ASCII characters) goes into
    /// the CA's audit trail. Denying an identity that is already denied succeeds.
    pub async fn report_deny(
        &self,
        creds: &Credentials,
        target: &SpiffeId,
        reason: &str,
    ) -> Result<(), ClientError> {
        let body = DenyBody {
            spiffe_id: target.to_string(),
            reason: reason.to_owned(),
        };
        let json = serde_json::to_vec(&body).map_err(|e| ClientError::Local(e.to_string()))?;
        let (status, answer) = self
            .call(Method::POST, "/v1/deny", json.into(), Some(creds))
            .await?;
        if status != StatusCode::OK {
            return Err(refusal(status, &answer));
        }
        let answer: DenyAnswer = serde_json::from_slice(&answer)
            .map_err(|e| ClientError::Protocol(format!("deny answer: {e}")))?;
        if answer.spiffe_id != target.as_str() || !answer.denied {
            return Err(ClientError::Protocol(format!(
                "asked to deny {target}, the CA answered that {} is denied: {}",
                answer.spiffe_id, answer.denied
            )));
        }
        Ok(())
    }

    /// Waits for the trust feed to move past `after` (the sequence this
    /// caller holds; `None` for the first call), over mTLS with `creds`.
    /// `Ok(None)`: nothing changed within [`WATCH_HOLD`]. Every denied ID
    /// is checked to be a SPIFFE ID, and the bundle to be PEM certificates.
    pub async fn watch(
        &self,
        creds: &Credentials,
        after: Option<u64>,
    ) -> Result<Option<TrustUpdate>, ClientError> {
        TrustWatcher::default().watch(self, creds, after).await
    }

    /// One long poll on `sender`, checked.
    async fn watch_on(
        &self,
        sender: &mut Sender,
        after: Option<u64>,
    ) -> Result<Option<TrustUpdate>, ClientError> {
        let path = match after {
            Some(n) => format!("{WATCH_PATH}?after={n}"),
            None => WATCH_PATH.to_owned(),
        };
        let call = self.send(sender, Method::GET, &path, Bytes::new(), MAX_TRUST_BYTES);
        let (status, body) = match tokio::time::timeout(WATCH_HOLD + CALL_TIMEOUT, call).await {
            Ok(r) => r?,
            Err(_) => return Err(self.unreachable("watch timed out")),
        };
        match status {
            StatusCode::NO_CONTENT => return Ok(None),
            StatusCode::OK => {}
            other => return Err(refusal(other, &body)),
        }
        let answer: TrustAnswer = serde_json::from_slice(&body)
            .map_err(|e| ClientError::Protocol(format!("trust answer: {e}")))?;
        let roots = parse_certs(&answer.trust_bundle).map_err(ClientError::Protocol)?;
        let denied = answer
            .denied
            .iter()
            .map(|d| SpiffeId::parse(d))
            .collect::<Result<_, _>>()
            .map_err(|e| ClientError::Protocol(format!("trust answer: denied: {e}")))?;
        Ok(Some(TrustUpdate {
            sequence: answer.sequence,
            bundle_pem: answer.trust_bundle,
            roots,
            denied,
        }))
    }

    async fn certify(
        &self,
        id: &SpiffeId,
        proof: Proof<'_>,
        dns_names: &[String],
        ttl: Option<Duration>,
    ) -> Result<Credentials, ClientError> {
        let local = |e: rcgen::Error| ClientError::Local(format!("making the key and CSR: {e}"));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(local)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into().map_err(local)?)];
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into().map_err(local)?));
        }
        let csr = params
            .serialize_request(&key)
            .map_err(local)?
            .pem()
            .map_err(local)?;
        let (token, k8s_token, current) = match proof {
            Proof::JoinToken(t) => (Some(t.to_owned()), None, None),
            Proof::ServiceAccount(t) => (None, Some(t.trim().to_owned()), None),
            Proof::Current(c) => (None, None, Some(c)),
        };
        let body = CertifyBody {
            csr,
            token,
            k8s_token,
            ttl: ttl.map(humantime_secs),
        };
        let json = serde_json::to_vec(&body).map_err(|e| ClientError::Local(e.to_string()))?;
        let (status, answer) = self
            .call(Method::POST, "/v1/certify", json.into(), current)
            .await?;
        if status != StatusCode::OK {
            return Err(refusal(status, &answer));
        }
        let answer: CertifyAnswer = serde_json::from_slice(&answer)
            .map_err(|e| ClientError::Protocol(format!("certify answer: {e}")))?;
        self.check_answer(id, answer, key.serialize_pem())
    }

    /// Never install what the CA sent without checking it is what we asked for.
    fn check_answer(
        &self,
        id: &SpiffeId,
        a: CertifyAnswer,
        key_pem: String,
    ) -> Result<Credentials, ClientError> {
        let chain = parse_certs(&a.certificate_chain).map_err(ClientError::Protocol)?;
        let got = tls::peer_id(&chain[0]).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if &got != id {
            return Err(ClientError::Protocol(format!("CA issued {got}, not {id}")));
        }
        parse_certs(&a.trust_bundle).map_err(ClientError::Protocol)?;
        let v = validity_of(&chain[0]).map_err(ClientError::Protocol)?;
        tls::certified_key(&a.certificate_chain, &key_pem, &tls::provider()).map_err(|e| {
            ClientError::Protocol(format!("certificate does not match our key: {e}"))
        })?;
        Ok(Credentials {
            spiffe_id: got,
            chain_pem: a.certificate_chain,
            key_pem,
            bundle_pem: a.trust_bundle,
            not_before: v.not_before,
            not_after: v.not_after,
        })
    }

    fn tls_config(&self, current: Option<&Credentials>) -> Result<ClientConfig, ClientError> {
        let provider = tls::provider();
        let local = |e: String| ClientError::Local(format!("tls setup: {e}"));
        let bundle_pem = self
            .bundle_pem
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let bundle = parse_certs(&bundle_pem).map_err(local)?;
        let roots = tls::root_store(&bundle).map_err(|e| local(e.to_string()))?;
        let verifier = SpiffeServerVerifier::new(
            roots,
            self.trust_domain.clone(),
            IdentityPattern::Exact(server_id(&self.trust_domain)),
            provider.clone(),
        );
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| local(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut config = match current {
            Some(c) => {
                let resolver = RotatingCert::default();
                resolver.set(
                    tls::certified_key(&c.chain_pem, &c.key_pem, &provider)
                        .map_err(|e| local(e.to_string()))?,
                );
                builder.with_client_cert_resolver(Arc::new(resolver) as Arc<dyn ResolvesClientCert>)
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        current: Option<&Credentials>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let config = self.tls_config(current)?;
        let call = self.call_inner(config, method, path, body, MAX_ANSWER_BYTES);
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(r) => r,
            Err(_) => Err(self.unreachable("timed out")),
        }
    }

    fn unreachable(&self, detail: impl ToString) -> ClientError {
        ClientError::Unreachable {
            addr: self.addr.clone(),
            detail: detail.to_string(),
        }
    }

    async fn call_inner(
        &self,
        config: ClientConfig,
        method: Method,
        path: &str,
        body: Bytes,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut sender = self.connect(config).await?;
        self.send(&mut sender, method, path, body, limit).await
    }

    /// A new mTLS connection to the CA, HTTP/1.1 over it.
    async fn connect(&self, config: ClientConfig) -> Result<Sender, ClientError> {
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| self.unreachable(e))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.host.clone()).map_err(|e| self.unreachable(e))?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| self.unreachable(format!("tls: {e}")))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.unreachable(e))?;
        tokio::spawn(conn);
        Ok(sender)
    }

    async fn send(
        &self,
        sender: &mut Sender,
        method: Method,
        path: &str,
        body: Bytes,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.addr.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| ClientError::Local(e.to_string()))?;
        // With TLS 1.3 a refused client certificate shows up here, on the first read.
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| self.unreachable(e))?
            .to_bytes();
        Ok((status, body))
    }
}

/// An HTTP/1.1 connection to the CA.
type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A proxy's side of the trust feed: one keep-alive mTLS connection kept
/// across long polls (the CA closes it after a minute; a new one is made
/// then, or when the certificate it was made with is renewed), so a change
/// costs the CA one answer per proxy, not a handshake.
#[derive(Default)]
pub struct TrustWatcher {
    conn: Option<(String, Sender)>,
}

impl std::fmt::Debug for TrustWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustWatcher")
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl TrustWatcher {
    /// As [`CaClient::watch`], on the kept connection when it is still open.
    pub async fn watch(
        &mut self,
        client: &CaClient,
        creds: &Credentials,
        after: Option<u64>,
    ) -> Result<Option<TrustUpdate>, ClientError> {
        let reusable = self
            .conn
            .as_ref()
            .is_some_and(|(chain, s)| *chain == creds.chain_pem && !s.is_closed());
        if reusable && let Some((chain, mut sender)) = self.conn.take() {
            match client.watch_on(&mut sender, after).await {
                Ok(r) => {
                    self.conn = Some((chain, sender));
                    return Ok(r);
                }
                // Closed by the CA between polls: once more, on a new one.
                Err(ClientError::Unreachable { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let config = client.tls_config(Some(creds))?;
        let connect = tokio::time::timeout(CALL_TIMEOUT, client.connect(config));
        let mut sender = connect
            .await
            .map_err(|_| client.unreachable("watch timed out"))??;
        let r = client.watch_on(&mut sender, after).await?;
        self.conn = Some((creds.chain_pem.clone(), sender));
        Ok(r)
    }
}

fn humantime_secs(d: Duration) -> String {
    format!("{}s", d.as_secs().max(1))
}

fn refusal(status: StatusCode, body: &[u8]) -> ClientError {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let reason = v["type"]
        .as_str()
        .and_then(|t| t.strip_prefix(crate::http::PROBLEM_TYPE_BASE))
        .unwrap_or("unknown")
        .to_owned();
    let detail = v["detail"].as_str().unwrap_or("no detail").to_owned();
    ClientError::Refused {
        status: status.as_u16(),
        reason,
        detail,
    }
}
