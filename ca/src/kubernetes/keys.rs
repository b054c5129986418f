//! The cluster's token signing keys (JWKS), for offline verification: read
//! from a file, or fetched through the OIDC discovery document
//! (`/.well-known/openid-configuration` -> `jwks_uri`). Cached; fetched
//! again on an unknown `kid` (a key rotation) or when older than
//! [`MAX_AGE`], at most once per [`MIN_REFETCH`] however many tokens name
//! unknown keys, and bounded in size. A failed fetch keeps the keys held.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};

use super::Refused;
use super::api::Api;

/// Largest JWKS or discovery document read.
pub const MAX_JWKS_BYTES: usize = 64 * 1024;
/// Most keys kept from one JWKS.
pub const MAX_KEYS: usize = 32;
/// Fewest seconds between two fetches.
pub const MIN_REFETCH: Duration = Duration::from_secs(2);
/// Keys older than this are fetched again on the next use (a removed key
/// stops verifying within this time).
pub const MAX_AGE: Duration = Duration::from_secs(300);
/// Keys are used this long at most while no fetch succeeds; then
/// attestation fails closed.
pub const MAX_UNCONFIRMED: Duration = Duration::from_secs(3600);

/// Where the keys come from.
#[derive(Debug)]
pub enum Source {
    /// A JWKS file.
    File(PathBuf),
    /// Through the discovery document of the API server, whose `issuer`
    /// must be the configured one.
    Discovery {
        /// The API server.
        api: Api,
        /// The expected issuer.
        issuer: String,
    },
}

struct Held {
    keys: HashMap<String, DecodingKey>,
    /// The last fetch, good or not.
    fetched: Option<Instant>,
    /// The last good fetch.
    confirmed: Option<Instant>,
}

/// The cache.
pub struct Keys {
    source: Source,
    held: RwLock<Held>,
    fetching: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// An empty cache over `source` (nothing is fetched before a token needs it).
    pub fn new(source: Source) -> Self {
        Self {
            source,
            held: RwLock::new(Held {
                keys: HashMap::new(),
                fetched: None,
                confirmed: None,
            }),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn lookup(&self, kid: &str) -> (Option<DecodingKey>, Option<Instant>) {
        match self.held.read() {
            Ok(h) => (h.keys.get(kid).cloned(), h.fetched),
            Err(_) => (None, None),
        }
    }

    /// The key named `kid`.
    pub async fn key(&self, kid: &str) -> Result<DecodingKey, Refused> {
        let (found, fetched) = self.lookup(kid);
        let stale = fetched.is_none_or(|t| t.elapsed() >= MAX_AGE);
        if let Some(k) = found.as_ref().filter(|_| !stale) {
            return Ok(k.clone());
        }
        if fetched.is_none_or(|t| t.elapsed() >= MIN_REFETCH) {
            let _one = self.fetching.lock().await;
            // Another call may have fetched while this one waited.
            let (_, again) = self.lookup(kid);
            if again == fetched {
                match self.fetch().await {
                    Ok(keys) => {
                        if let Ok(mut h) = self.held.write() {
                            h.keys = keys;
                            h.fetched = Some(Instant::now());
                            h.confirmed = Some(Instant::now());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "kubernetes: cannot fetch the token signing keys; keeping the ones held");
                        if let Ok(mut h) = self.held.write() {
                            // Do not hammer a failing endpoint either.
                            h.fetched = Some(Instant::now());
                        }
                    }
                }
            }
        }
        let confirmed = self.held.read().ok().and_then(|h| h.confirmed);
        if confirmed.is_none_or(|t| t.elapsed() >= MAX_UNCONFIRMED) {
            // Keys nobody could confirm for this long may have been revoked.
            return Err(Refused::Unavailable(
                "the cluster's signing keys could not be fetched".into(),
            ));
        }
        // Only what the last good fetch holds: a key it dropped is gone.
        self.lookup(kid)
            .0
            .ok_or_else(|| Refused::UnknownKey(kid.chars().take(64).collect()))
    }

    async fn fetch(&self) -> Result<HashMap<String, DecodingKey>, String> {
        let text = match &self.source {
            Source::File(path) => {
                let meta =
                    std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
                if meta.len() > MAX_JWKS_BYTES as u64 {
                    return Err(format!(
                        "{} is larger than {MAX_JWKS_BYTES} bytes",
                        path.display()
                    ));
                }
                std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?
            }
            Source::Discovery { api, issuer } => {
                let (status, doc) = api
                    .get("/.well-known/openid-configuration", MAX_JWKS_BYTES)
                    .await?;
                if status != http::StatusCode::OK {
                    return Err(format!("discovery document: HTTP {status}"));
                }
                let doc: serde_json::Value =
                    serde_json::from_slice(&doc).map_err(|e| format!("discovery document: {e}"))?;
                let iss = doc["issuer"].as_str().unwrap_or("").trim_end_matches('/');
                if iss != issuer {
                    return Err(format!(
                        "discovery document names issuer {iss:?}, not the configured {issuer:?}"
                    ));
                }
                let uri = doc["jwks_uri"]
                    .as_str()
                    .ok_or("discovery document has no jwks_uri")?;
                // The API server announces its external address, which a
                // pod may not reach and which would not get the CA's
                // token: its path is asked of the API server itself, which
                // serves it.
                let (_, path) = api.for_url(uri)?;
                let (status, body) = api.get(&path, MAX_JWKS_BYTES).await?;
                if status != http::StatusCode::OK {
                    return Err(format!("{uri}: HTTP {status}"));
                }
                body.to_vec()
            }
        };
        parse(&text)
    }
}

/// The public keys of a JWKS, by `kid`: RSA and EC only (never a shared
/// secret), at most [`MAX_KEYS`].
pub fn parse(text: &[u8]) -> Result<HashMap<String, DecodingKey>, String> {
    let set: JwkSet = serde_json::from_slice(text).map_err(|e| format!("JWKS: {e}"))?;
    let mut keys = HashMap::new();
    for jwk in set.keys.iter().take(MAX_KEYS) {
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        if !matches!(
            jwk.algorithm,
            AlgorithmParameters::RSA(_) | AlgorithmParameters::EllipticCurve(_)
        ) {
            continue;
        }
        if let Ok(k) = DecodingKey::from_jwk(jwk) {
            keys.insert(kid, k);
        }
    }
    Ok(keys)
}
