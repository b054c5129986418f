//! The workload's identity: where its X.509-SVID comes from, and how it is
//! kept fresh. Each new or renewed certificate is checked (it verifies against
//! the bundle, carries one SPIFFE ID, matches its key) before it is published
//! on a watch channel; listeners build TLS configs from the latest value.
//! Until the first certificate, and once the current one has expired, the
//! channel holds `None` and every handshake fails closed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use tokio::sync::watch;

use warden_config::proxy::{Bundle, IdentitySource};
use warden_config::{SpiffeId, TrustDomain};
use warden_identity::client::{CaClient, Credentials};
use warden_identity::files_out;
use warden_identity::lifetime::renew_at;
use warden_identity::pem::{parse_certs, validity_of};
use warden_identity::tls::{self, DenyList};

use crate::metrics::ProxyMetrics;

/// A checked certificate, its key and the trust bundle it verified against.
#[derive(Debug)]
pub struct Identity {
    /// Our SPIFFE ID.
    pub id: SpiffeId,
    /// Its trust domain: the one whose bundle peers must verify against.
    pub trust_domain: TrustDomain,
    /// Certificate chain and signing key, ready for rustls.
    pub key: Arc<CertifiedKey>,
    /// Trust roots for peers (our trust domain's bundle).
    pub roots: Arc<RootCertStore>,
    /// Leaf NotAfter.
    pub not_after: OffsetDateTime,
    /// Leaf NotBefore.
    pub not_before: OffsetDateTime,
    /// NotAfter of the intermediate in our chain, and of the first root of
    /// the bundle to expire (for the chain expiry metric).
    pub chain_not_after: (Option<OffsetDateTime>, Option<OffsetDateTime>),
    /// The CA this identity came from, with the credentials to call it
    /// (None for an identity read from files).
    pub ca: Option<CaLink>,
    /// Peers the CA denied, as its trust feed last said (empty for an
    /// identity read from files): refused at the handshake, and open
    /// connections with them closed.
    pub denied: DenyList,
}

/// A way to call the CA as this workload (for deny reports).
#[derive(Debug, Clone)]
pub struct CaLink {
    /// The CA client.
    pub client: CaClient,
    /// The current certificate and key, as PEM.
    pub creds: Credentials,
}

impl Identity {
    /// Still valid at `now`?
    pub fn is_valid(&self, now: OffsetDateTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// Builds and checks an identity from PEM texts.
    pub fn from_pem(
        chain_pem: &str,
        key_pem: &str,
        bundle_pem: &str,
    ) -> Result<Self, IdentityError> {
        let chain = parse_certs(chain_pem).map_err(IdentityError::Certificate)?;
        let bundle = parse_certs(bundle_pem).map_err(IdentityError::Bundle)?;
        let id = tls::peer_id(&chain[0])?;
        let roots = tls::root_store(&bundle).map_err(IdentityError::Roots)?;
        verify_chain(&chain, &roots)?;
        let key =
            tls::certified_key(chain_pem, key_pem, &tls::provider()).map_err(IdentityError::Key)?;
        let v = validity_of(&chain[0]).map_err(IdentityError::Certificate)?;
        let chain_not_after = (
            chain
                .get(1)
                .and_then(|c| validity_of(c).ok())
                .map(|v| v.not_after),
            first_to_expire(&bundle),
        );
        Ok(Self {
            chain_not_after,
            trust_domain: id.trust_domain(),
            id,
            key: Arc::new(key),
            roots,
            not_after: v.not_after,
            not_before: v.not_before,
            ca: None,
            denied: DenyList::none(),
        })
    }

    /// This identity with the roots the CA's feed pushed (a root rotation):
    /// same certificate and key, new trust anchors for peers.
    pub fn with_bundle(
        &self,
        bundle_pem: &str,
        roots: &[CertificateDer<'static>],
    ) -> Result<Self, IdentityError> {
        let store = tls::root_store(roots).map_err(IdentityError::Roots)?;
        let ca = self.ca.clone().map(|mut l| {
            l.creds.bundle_pem = bundle_pem.to_owned();
            l
        });
        Ok(Self {
            chain_not_after: (self.chain_not_after.0, first_to_expire(roots)),
            id: self.id.clone(),
            trust_domain: self.trust_domain.clone(),
            key: self.key.clone(),
            roots: store,
            not_after: self.not_after,
            not_before: self.not_before,
            ca,
            denied: self.denied.clone(),
        })
    }
}

fn first_to_expire(roots: &[CertificateDer<'static>]) -> Option<OffsetDateTime> {
    roots
        .iter()
        .filter_map(|r| validity_of(r).ok())
        .map(|v| v.not_after)
        .min()
}

/// Our own chain must verify against our bundle (for the client or the
/// server role, whichever its EKU allows): a mismatched pair would only fail
/// later, at every peer.
fn verify_chain(
    chain: &[CertificateDer<'static>],
    roots: &RootCertStore,
) -> Result<(), IdentityError> {
    let ee = webpki::EndEntityCert::try_from(&chain[0]).map_err(IdentityError::Chain)?;
    let algs = tls::provider().signature_verification_algorithms.all;
    let verify = |usage| {
        ee.verify_for_usage(
            algs,
            &roots.roots,
            &chain[1..],
            UnixTime::now(),
            usage,
            None,
            None,
        )
    };
    match verify(webpki::KeyUsage::server_auth()) {
        Ok(_) => Ok(()),
        Err(_) => verify(webpki::KeyUsage::client_auth())
            .map(|_| ())
            .map_err(IdentityError::Chain),
    }
}

/// The published identity: `None` before the first and after expiry.
pub type IdentityRx = watch::Receiver<Option<Arc<Identity>>>;

/// Why an identity could not be set up, loaded or renewed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read.
    #[error("identity: {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate file or answer is not usable PEM.
    #[error("identity: certificate: {0}")]
    Certificate(String),
    /// The bundle is not usable PEM.
    #[error("identity: bundle: {0}")]
    Bundle(String),
    /// The bundle's certificates are not usable roots.
    #[error("identity: bundle: {0}")]
    Roots(rustls::Error),
    /// The leaf is not an X.509-SVID.
    #[error("identity: certificate: {0}")]
    NotSvid(#[from] tls::PeerIdError),
    /// The chain does not verify against the bundle.
    #[error("identity: certificate does not verify against the bundle: {0}")]
    Chain(webpki::Error),
    /// The key is unusable or not the certificate's.
    #[error("identity: key does not match the certificate: {0}")]
    Key(rustls::Error),
    /// The CA client could not be made, or the CA refused.
    #[error("identity: {0}")]
    Ca(#[from] warden_identity::client::ClientError),
}

/// Why the proxy holds no identity right now, in words an operator can act
/// on (for `/ready` and the logs); `None` while it holds one.
#[derive(Debug, Clone, Default)]
pub struct Waiting(Arc<std::sync::Mutex<Option<String>>>);

impl Waiting {
    fn set(&self, why: String) {
        if let Ok(mut w) = self.0.lock() {
            *w = Some(why);
        }
    }

    fn clear(&self) {
        if let Ok(mut w) = self.0.lock() {
            *w = None;
        }
    }

    /// The reason, when one was given.
    pub fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|w| w.clone())
    }
}

/// Starts keeping the identity from `source`; returns the channel, and why
/// it is empty when it is.
pub async fn start(
    source: &IdentitySource,
    metrics: ProxyMetrics,
) -> Result<(IdentityRx, Waiting), IdentityError> {
    let (tx, rx) = watch::channel(None);
    let waiting = Waiting::default();
    match source.clone() {
        IdentitySource::Files { cert, key, bundle } => {
            let first = load_files(&cert, &key, &bundle)?;
            publish(&tx, &metrics, first);
            tokio::spawn(watch_files(tx, metrics, cert, key, bundle));
        }
        IdentitySource::Ca {
            url,
            bundle,
            token_file,
            spiffe_id,
            ttl,
            state_dir,
        } => {
            let bundle_pem = read(&bundle)?;
            let client = CaClient::new(&url, spiffe_id.trust_domain(), &bundle_pem)?;
            let denied = follow_trust(&tx, &metrics, state_dir.clone());
            let proof = Proof::JoinToken {
                token_file,
                id: spiffe_id,
                state_dir,
                bundle_pem,
            };
            tokio::spawn(keep_from_ca(
                tx,
                metrics,
                client,
                proof,
                ttl,
                waiting.clone(),
                denied,
            ));
        }
        IdentitySource::Kubernetes {
            url,
            bundle,
            token_file,
            trust_domain,
            ttl,
        } => {
            let bundle_pem = match &bundle {
                Bundle::File(f) => read(f)?,
                Bundle::Pem(pem) => pem.clone(),
            };
            let trust_domain = match trust_domain {
                Some(td) => td,
                None => parse_certs(&bundle_pem)
                    .ok()
                    .and_then(|c| tls::bundle_trust_domain(&c))
                    .ok_or_else(|| {
                        IdentityError::Bundle(format!(
                            "{} names no trust domain (no spiffe:// URI SAN): set identity.kubernetes.trust_domain",
                            match &bundle {
                                Bundle::File(f) => f.display().to_string(),
                                Bundle::Pem(_) => "bundle_pem".to_owned(),
                            }
                        ))
                    })?,
            };
            let client = CaClient::new(&url, trust_domain.clone(), &bundle_pem)?;
            let proof = Proof::ServiceAccount {
                token_file,
                trust_domain,
            };
            let denied = follow_trust(&tx, &metrics, None);
            tokio::spawn(keep_from_ca(
                tx,
                metrics,
                client,
                proof,
                ttl,
                waiting.clone(),
                denied,
            ));
        }
    }
    Ok((rx, waiting))
}

/// Starts following the CA's trust feed (see [`crate::trust`]) as the
/// identity on `tx`; returns the deny list it keeps.
fn follow_trust(
    tx: &watch::Sender<Option<Arc<Identity>>>,
    metrics: &ProxyMetrics,
    state_dir: Option<PathBuf>,
) -> DenyList {
    let (sequence, cached) = crate::trust::cached(state_dir.as_deref());
    let (deny_tx, denied) = DenyList::channel(cached);
    tokio::spawn(crate::trust::follow(
        tx.clone(),
        deny_tx,
        metrics.clone(),
        sequence,
        state_dir,
    ));
    denied
}

fn publish(tx: &watch::Sender<Option<Arc<Identity>>>, metrics: &ProxyMetrics, id: Identity) {
    metrics
        .cert_expiry
        .set(id.not_after.unix_timestamp() as f64);
    let levels = [
        ("leaf", Some(id.not_after)),
        ("intermediate", id.chain_not_after.0),
        ("root", id.chain_not_after.1),
    ];
    for (level, t) in levels {
        if let Some(t) = t {
            metrics
                .chain_expiry
                .with_label_values(&[level])
                .set(t.unix_timestamp() as f64);
        }
    }
    tracing::info!(id = %id.id, not_after = %id.not_after, "identity installed");
    let _ = tx.send(Some(Arc::new(id)));
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn load_files(cert: &Path, key: &Path, bundle: &Path) -> Result<Identity, IdentityError> {
    Identity::from_pem(&read(cert)?, &read(key)?, &read(bundle)?)
}

/// Polls the three files (cheap `stat`s; robust to the symlink swaps that
/// Kubernetes secret volumes do) and reloads when any changed.
async fn watch_files(
    tx: watch::Sender<Option<Arc<Identity>>>,
    metrics: ProxyMetrics,
    cert: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
) {
    let paths = [cert.as_path(), key.as_path(), bundle.as_path()];
    let mut seen = files_out::modified_times(&paths);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        expire_if_due(&tx, &metrics);
        let now = files_out::modified_times(&paths);
        if now == seen {
            continue;
        }
        seen = now;
        match load_files(&cert, &key, &bundle) {
            Ok(id) => {
                metrics.renewals.with_label_values(&["ok"]).inc();
                publish(&tx, &metrics, id);
            }
            Err(e) => {
                metrics.renewals.with_label_values(&["failed"]).inc();
                tracing::error!(error = %e, "certificate files changed but are not usable; keeping the current identity");
            }
        }
    }
}

/// Fail closed: an expired certificate is withdrawn.
fn expire_if_due(tx: &watch::Sender<Option<Arc<Identity>>>, metrics: &ProxyMetrics) {
    let expired = tx
        .borrow()
        .as_ref()
        .is_some_and(|id| !id.is_valid(OffsetDateTime::now_utc()));
    if expired {
        tracing::error!("certificate expired: refusing all connections until a new one arrives");
        metrics.cert_expiry.set(0.0);
        let _ = tx.send(None);
    }
}

/// Backoff after a failed call to the CA: 1 s doubling to 60 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(6)).min(Duration::from_secs(60))
}

fn jitter() -> f64 {
    (rand::random::<f64>() - 0.5) / 5.0
}

/// How this proxy proves who it is to the CA when it holds no certificate.
enum Proof {
    /// A one-time join token; the certificate is kept in `state_dir` so that
    /// a restart does not need another token.
    JoinToken {
        token_file: PathBuf,
        id: SpiffeId,
        state_dir: Option<PathBuf>,
        /// The configured bundle: a stored certificate must verify against it.
        bundle_pem: String,
    },
    /// The pod's projected ServiceAccount token, read anew each time.
    ServiceAccount {
        token_file: PathBuf,
        trust_domain: TrustDomain,
    },
}

impl Proof {
    async fn bootstrap(
        &self,
        client: &CaClient,
        ttl: Option<Duration>,
    ) -> Result<Credentials, IdentityError> {
        match self {
            Proof::JoinToken { token_file, id, .. } => {
                let token = read(token_file)?;
                Ok(client.bootstrap(id, token.trim(), ttl).await?)
            }
            Proof::ServiceAccount {
                token_file,
                trust_domain,
            } => {
                let token = read(token_file)?;
                let id = warden_identity::client::pod_identity(&token, trust_domain)?;
                let creds = client.bootstrap_kubernetes(&id, &token, &[], ttl).await?;
                if !creds.spiffe_id.is_in(trust_domain) {
                    return Err(IdentityError::Certificate(format!(
                        "the CA issued {}, outside the bundle's trust domain {trust_domain}",
                        creds.spiffe_id
                    )));
                }
                Ok(creds)
            }
        }
    }

    /// The certificate kept in `state_dir` by an earlier run, when it is
    /// still valid, verifies, and carries the configured ID.
    fn stored(&self) -> Option<(Credentials, Identity)> {
        let Proof::JoinToken {
            id,
            state_dir: Some(dir),
            bundle_pem,
            ..
        } = self
        else {
            return None;
        };
        if let Err(why) = private_dir(dir) {
            tracing::warn!(dir = %dir.display(), "not using the stored certificate: {why}");
            return None;
        }
        // A pair whose key is the certificate's, even after a crash between
        // the two renames of a write.
        let (chain, key) = match files_out::read_credentials(dir) {
            Ok(pair) => pair,
            // No key: nothing was ever stored. A key without its
            // certificate (and no cert.tmp that goes with it) is worth a
            // warning, as any other unusable state.
            Err(files_out::ReadError::Io { path, source })
                if source.kind() == std::io::ErrorKind::NotFound
                    && path.file_name() == Some(std::ffi::OsStr::new(files_out::KEY)) =>
            {
                return None;
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "the stored certificate is not usable; using the join token");
                return None;
            }
        };
        // Against the configured trust anchors, never the stored ones: a
        // file in the state directory cannot bring its own root.
        let bundle = bundle_pem.clone();
        let identity = match Identity::from_pem(&chain, &key, &bundle) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "the stored certificate is not usable; using the join token");
                return None;
            }
        };
        if &identity.id != id || !identity.is_valid(OffsetDateTime::now_utc()) {
            tracing::info!(dir = %dir.display(), stored = %identity.id, not_after = %identity.not_after, "the stored certificate is expired or for another identity; using the join token");
            return None;
        }
        let creds = Credentials {
            spiffe_id: identity.id.clone(),
            chain_pem: chain,
            key_pem: key,
            bundle_pem: bundle,
            not_before: identity.not_before,
            not_after: identity.not_after,
        };
        Some((creds, identity))
    }

    /// Whether the CA gave up on this proof (a refusal that no retry with
    /// the same certificate changes: 401, 403).
    fn final_refusal(e: &IdentityError) -> bool {
        matches!(
            e,
            IdentityError::Ca(warden_identity::client::ClientError::Refused {
                status: 401 | 403,
                ..
            })
        )
    }

    /// Keeps a new certificate for the next start (join tokens only).
    fn store(&self, c: &Credentials) {
        if let Proof::JoinToken {
            state_dir: Some(dir),
            ..
        } = self
            && let Err(e) =
                files_out::write_credentials(dir, &c.chain_pem, &c.key_pem, &c.bundle_pem)
        {
            tracing::error!(error = %e, "cannot keep the certificate in state_dir: a restart will need a new join token");
        }
    }

    /// What an operator should know about a failed bootstrap.
    fn explain(&self, e: &IdentityError) -> String {
        use warden_identity::client::ClientError;
        match (self, e) {
            (
                Proof::JoinToken {
                    token_file,
                    id,
                    state_dir,
                    ..
                },
                IdentityError::Ca(ClientError::Refused { reason, .. }),
            ) if reason.starts_with("token-") => {
                let what = match reason.as_str() {
                    "token-used" => "join token already used",
                    "token-expired" => "join token expired",
                    _ => "join token unknown to the CA",
                };
                let keep = if state_dir.is_some() {
                    ""
                } else {
                    "; set identity.state_dir so that restarts keep the certificate"
                };
                format!(
                    "{what} and no stored certificate: mint a new token (warden ca token --spiffe-id {id}) into {}{keep}",
                    token_file.display()
                )
            }
            (Proof::JoinToken { token_file, .. }, IdentityError::Read { .. }) => {
                format!("cannot read the join token {}: {e}", token_file.display())
            }
            (Proof::ServiceAccount { token_file, .. }, IdentityError::Read { .. }) => format!(
                "cannot read the ServiceAccount token {}: {e} (is the projected volume with audience warden mounted?)",
                token_file.display()
            ),
            (
                Proof::ServiceAccount { .. },
                IdentityError::Ca(ClientError::Refused {
                    status,
                    reason,
                    detail,
                }),
            ) => format!(
                "the CA refused this pod's ServiceAccount token ({status}, {reason}): {detail}"
            ),
            _ => e.to_string(),
        }
    }
}

/// A state directory only this process's user may write (else anyone who
/// can write it could plant a certificate).
fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "it is writable by group or others (mode {:o})",
            meta.mode() & 0o777
        ));
    }
    if me.is_some_and(|uid| uid != meta.uid()) {
        return Err(format!(
            "it is owned by uid {}, not this process's",
            meta.uid()
        ));
    }
    Ok(())
}

async fn keep_from_ca(
    tx: watch::Sender<Option<Arc<Identity>>>,
    metrics: ProxyMetrics,
    client: CaClient,
    proof: Proof,
    ttl: Option<Duration>,
    waiting: Waiting,
    denied: DenyList,
) {
    let mut current: Option<Credentials> = None;
    let mut attempt = 0u32;
    let mut wait = Duration::ZERO;
    if let Some((creds, mut identity)) = proof.stored() {
        tracing::info!(id = %identity.id, not_after = %identity.not_after, "serving the stored certificate; renewing it");
        identity.ca = Some(CaLink {
            client: client.clone(),
            creds: creds.clone(),
        });
        identity.denied = denied.clone();
        publish(&tx, &metrics, identity);
        current = Some(creds);
    } else {
        waiting.set("asking the CA for a first certificate".into());
    }
    loop {
        if !wait.is_zero() {
            // Sleep, but wake to withdraw the certificate the moment it expires.
            let deadline = tokio::time::Instant::now() + wait;
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep_until(
                    deadline.min(tokio::time::Instant::now() + Duration::from_secs(1)),
                )
                .await;
                expire_if_due(&tx, &metrics);
            }
        }
        let expired = current
            .as_ref()
            .is_some_and(|c| c.not_after <= OffsetDateTime::now_utc());
        if expired {
            // An expired certificate renews nothing: back to the token (an
            // operator may have written a new one).
            current = None;
        }
        let result = match (&current, &proof) {
            // A pod proves itself with its token every time, as Istio's
            // sidecars do: the CA checks the pod still exists.
            (_, Proof::ServiceAccount { .. }) | (None, _) => proof.bootstrap(&client, ttl).await,
            (Some(c), Proof::JoinToken { .. }) => {
                client.renew(c, ttl).await.map_err(IdentityError::from)
            }
        };
        let checked = result.and_then(|c| {
            Identity::from_pem(&c.chain_pem, &c.key_pem, &c.bundle_pem).map(|mut i| {
                i.ca = Some(CaLink {
                    client: client.clone(),
                    creds: c.clone(),
                });
                i.denied = denied.clone();
                (c, i)
            })
        });
        wait = match checked {
            Ok((creds, identity)) => {
                metrics.renewals.with_label_values(&["ok"]).inc();
                attempt = 0;
                let at = renew_at(identity.not_before, identity.not_after, jitter());
                publish(&tx, &metrics, identity);
                proof.store(&creds);
                waiting.clear();
                current = Some(creds);
                // Never back to back, whatever the clocks say.
                (at - OffsetDateTime::now_utc())
                    .max(time::Duration::SECOND)
                    .unsigned_abs()
            }
            Err(e) => {
                metrics.renewals.with_label_values(&["failed"]).inc();
                let wait = backoff(attempt);
                attempt += 1;
                match &current {
                    Some(c) if !expired => {
                        tracing::warn!(error = %e, retry_in = ?wait, not_after = %c.not_after, "could not renew the certificate; keeping the current one until it expires")
                    }
                    Some(_) => {
                        let why = format!("the certificate expired and could not be renewed: {e}");
                        tracing::error!(retry_in = ?wait, "{why}");
                        waiting.set(why);
                    }
                    None => {
                        let why = proof.explain(&e);
                        tracing::error!(retry_in = ?wait, "no certificate yet: {why}");
                        waiting.set(why);
                    }
                }
                if Proof::final_refusal(&e) {
                    // The CA will not renew this one (denied, forgotten):
                    // the next attempt uses the token file again.
                    current = None;
                }
                wait
            }
        };
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn backoff_doubles_to_a_minute() {
        let s: Vec<u64> = (0..9).map(|a| super::backoff(a).as_secs()).collect();
        assert_eq!(s, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
