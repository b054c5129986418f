//! Where the webhook's serving certificate comes from, and how it stays
//! current: files that someone else renews (reloaded when they change), or
//! the warden CA itself, attested like a sidecar with the pod's projected
//! ServiceAccount token and renewed at half-life, with the DNS names the
//! CA's `kubernetes.dns_names` grants the webhook's identity. Either way the
//! expiry of the certificate in use is exported, and `/ready` says why
//! there is none or it has expired.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus::IntGauge;
use time::OffsetDateTime;
use tokio::sync::watch;

use warden_config::TrustDomain;
use warden_identity::client::{CaClient, Credentials, pod_identity};
use warden_identity::files_out;
use warden_identity::lifetime::renew_at;
use warden_identity::tls::{RotatingCert, certified_key, provider};

/// How often the files are looked at for a change.
const FILE_CHECK: Duration = Duration::from_secs(2);
/// The first wait after a failed attestation; doubled up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// PEM files (`warden ca issue --dns-name`, cert-manager), reloaded when
    /// they change.
    Files {
        /// Leaf then intermediates.
        cert: PathBuf,
        /// Its key.
        key: PathBuf,
    },
    /// The warden CA, with the pod's projected ServiceAccount token.
    Ca {
        /// `https://host:port`.
        url: String,
        /// The CA's trust bundle (PEM file), which verifies the CA: read at
        /// each attestation, so that a bundle updated after a root
        /// rotation (its ConfigMap) is followed.
        bundle: PathBuf,
        /// The trust domain the bundle names.
        trust_domain: TrustDomain,
        /// The projected token (audience `warden`), read at each attestation.
        token_file: PathBuf,
        /// The names to ask for (the Service's).
        dns_names: Vec<String>,
        /// Lifetime to ask for (the CA caps it).
        ttl: Option<Duration>,
    },
}

/// The certificate in use, as `/ready` and `/metrics` see it.
pub struct Serving {
    cert: Arc<RotatingCert>,
    /// Unix seconds; 0 while there is none.
    expiry: IntGauge,
    /// Its NotBefore, Unix seconds (exported too: with the expiry it gives
    /// the lifetime, so an alert can say "three quarters gone" whatever
    /// the lifetime is).
    not_before: IntGauge,
    /// Why the last attempt to get a new one failed, if it did.
    problem: Mutex<Option<String>>,
}

impl Serving {
    /// Nothing served yet; `expiry` and `not_before` are the exported
    /// gauges.
    pub fn new(cert: Arc<RotatingCert>, expiry: IntGauge, not_before: IntGauge) -> Arc<Self> {
        Arc::new(Self {
            cert,
            expiry,
            not_before,
            problem: Mutex::new(None),
        })
    }

    /// What `/ready` answers.
    pub fn ready(&self) -> Result<(), String> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let problem = self
            .problem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let why = problem.map(|p| format!(": {p}")).unwrap_or_default();
        match self.expiry.get() {
            0 => Err(format!("no serving certificate yet{why}")),
            t if t <= now => Err(format!(
                "the serving certificate has expired{}",
                if why.is_empty() {
                    ": issue a new one into its files".to_owned()
                } else {
                    why
                }
            )),
            _ if self.not_before.get() > now => Err(format!(
                "the serving certificate is not valid until {} (Unix seconds){why}",
                self.not_before.get()
            )),
            _ => Ok(()),
        }
    }

    fn set(&self, chain_pem: &str, key_pem: &str) -> Result<i64, String> {
        let key = certified_key(chain_pem, key_pem, &provider()).map_err(|e| e.to_string())?;
        let leaf = key.cert.first().ok_or("no certificate")?;
        let validity = warden_identity::pem::validity_of(leaf)?;
        let not_after = validity.not_after.unix_timestamp();
        // What is exported is never older than what is served.
        self.not_before.set(validity.not_before.unix_timestamp());
        self.expiry.set(not_after);
        self.cert.set(key);
        *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(not_after)
    }

    fn failed(&self, why: String) {
        *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }
}

/// Obtains the first certificate from `source` (from the CA: retrying
/// until it answers, or until `shutdown`), then keeps it current in the
/// background. Files that cannot be read at start are an error.
pub async fn start(
    source: Source,
    serving: Arc<Serving>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    match source {
        Source::Files { cert, key } => {
            let load = {
                let (cert, key) = (cert.clone(), key.clone());
                move || -> Result<(String, String), String> { Ok((read(&cert)?, read(&key)?)) }
            };
            let modified = move || files_out::modified_times(&[&cert, &key]);
            let (chain, key) = load()?;
            serving.set(&chain, &key)?;
            tokio::spawn(async move {
                let mut seen = modified();
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(FILE_CHECK) => {}
                        _ = shutdown.changed() => return,
                    }
                    let now = modified();
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    match load().and_then(|(c, k)| serving.set(&c, &k)) {
                        Ok(not_after) => {
                            tracing::info!(not_after, "serving certificate reloaded");
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "serving certificate changed but is not usable; keeping the current one");
                            serving.failed(format!("the changed files are not usable: {e}"));
                        }
                    }
                }
            });
            Ok(())
        }
        Source::Ca {
            url,
            bundle,
            trust_domain,
            token_file,
            dns_names,
            ttl,
        } => {
            let client = CaClient::new(&url, trust_domain.clone(), &read(&bundle)?)
                .map_err(|e| e.to_string())?;
            let attest = move || {
                let (client, td, bundle, token_file, dns_names) = (
                    client.clone(),
                    trust_domain.clone(),
                    bundle.clone(),
                    token_file.clone(),
                    dns_names.clone(),
                );
                async move {
                    client
                        .set_bundle(&read(&bundle)?)
                        .map_err(|e| format!("{}: {e}", bundle.display()))?;
                    let token = read(&token_file)?;
                    let id = pod_identity(&token, &td).map_err(|e| e.to_string())?;
                    client
                        .bootstrap_kubernetes(&id, &token, &dns_names, ttl)
                        .await
                        .map_err(|e| e.to_string())
                }
            };
            let mut creds = keep_trying(&attest, &serving, &mut shutdown).await?;
            tokio::spawn(async move {
                loop {
                    let jitter = (rand::random::<f64>() - 0.5) / 5.0;
                    let at = renew_at(creds.not_before, creds.not_after, jitter);
                    // Never back to back, whatever the clocks say.
                    let wait = (at - OffsetDateTime::now_utc()).max(time::Duration::SECOND);
                    tokio::select! {
                        () = tokio::time::sleep(wait.unsigned_abs()) => {}
                        _ = shutdown.changed() => return,
                    }
                    match keep_trying(&attest, &serving, &mut shutdown).await {
                        Ok(c) => creds = c,
                        Err(_) => return,
                    }
                }
            });
            Ok(())
        }
    }
}

/// A file's text, or an error naming it.
fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Attests until it works (installing the certificate) or `shutdown`.
async fn keep_trying<F, Fut>(
    attest: &F,
    serving: &Serving,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Credentials, String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Credentials, String>>,
{
    let mut retry = RETRY_MIN;
    loop {
        let attempt = tokio::select! {
            r = attest() => r,
            _ = shutdown.changed() => return Err("shutting down".into()),
        };
        let failure = match attempt {
            Ok(creds) => match serving.set(&creds.chain_pem, &creds.key_pem) {
                Ok(not_after) => {
                    tracing::info!(id = %creds.spiffe_id, not_after, "serving certificate from the CA");
                    return Ok(creds);
                }
                Err(e) => format!("the CA's certificate is not usable: {e}"),
            },
            Err(e) => format!("attesting to the CA: {e}"),
        };
        tracing::warn!(error = %failure, retry_in = ?retry, "no new serving certificate");
        serving.failed(failure);
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            _ = shutdown.changed() => return Err("shutting down".into()),
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}
