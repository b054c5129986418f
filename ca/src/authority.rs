//! The CA on disk: its directory layout, `init` and `open`, and signing.
//!
//! ```text
//! <dir>/ca.yaml              settings (trust domain, TTLs)
//! <dir>/root.pem             root certificate
//! <dir>/root-key.pem         root key, 0600 (absent when the root is external)
//! <dir>/intermediate.pem     the CA that signs workloads
//! <dir>/intermediate-key.pem its key, 0600
//! <dir>/bundle.pem           trust bundle handed to workloads (one or more roots)
//! <dir>/state.db             store: issued certificates, tokens, denied IDs
//! <dir>/audit.jsonl          hash-chained audit trail
//! <dir>/keys/<id>.pem        keys of roots and intermediates made by rotation
//! ```
//!
//! The files are how `init` leaves a CA; from the first open on, the store
//! records every root and intermediate and which of them sign
//! ([`crate::store::chain`]), and `bundle.pem` is no longer read.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{Issuer, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use warden_config::{CaConfig, Diagnostics, SpiffeId, TrustDomain};

use crate::lifetime::{Validity, cap_lifetime};
use crate::profile;
use crate::store::chain::{AuthorityRecord, Kind, State};
pub use warden_identity::api::server_id;
pub use warden_identity::pem::{certs_pem, parse_certs, validity_of};

/// File names inside a CA directory.
pub mod files {
    /// Settings.
    pub const CONFIG: &str = "ca.yaml";
    /// Root certificate.
    pub const ROOT_CERT: &str = "root.pem";
    /// Root key (only for a root this CA made).
    pub const ROOT_KEY: &str = "root-key.pem";
    /// Intermediate certificate.
    pub const INTERMEDIATE_CERT: &str = "intermediate.pem";
    /// Intermediate key.
    pub const INTERMEDIATE_KEY: &str = "intermediate-key.pem";
    /// Trust bundle.
    pub const BUNDLE: &str = "bundle.pem";
    /// SQLite store.
    pub const STATE: &str = "state.db";
    /// Audit trail.
    pub const AUDIT: &str = "audit.jsonl";
    /// Keys of the roots and intermediates made by rotation (in the state directory).
    pub const KEYS: &str = "keys";
    /// The secret that seals rotation's keys for replicas sharing a
    /// PostgreSQL store (see [`crate::sealed`]).
    pub const STORE_KEY: &str = "store.key";
}

/// Everything that can go wrong creating, opening or using a CA directory.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// `init` found a CA already there.
    #[error("a CA already exists in {0} (refusing to overwrite it)")]
    AlreadyExists(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file did not hold what it should.
    #[error("{path}: {what}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// The settings file is invalid.
    #[error("{0}")]
    Config(#[from] Diagnostics),
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The intermediate has expired (or would leave no valid window): nothing can be signed.
    #[error("the intermediate CA certificate expired at {not_after}; create or rotate the CA")]
    IssuerExpired {
        /// The intermediate's NotAfter.
        not_after: OffsetDateTime,
    },
    /// The audit trail could not be written.
    #[error("audit trail: {0}")]
    Audit(String),
    /// Something the CA needs to run could not be set up (TLS, metrics, its own certificate).
    #[error("{0}")]
    Setup(String),
    /// The store holds something it should not (a corrupt row).
    #[error("store holds bad data: {0}")]
    Corrupt(String),
    /// A CA certificate's key is in none of the places it is kept.
    #[error(
        "the key of CA certificate {0} is not held here (not in keys/, root-key.pem or intermediate-key.pem)"
    )]
    KeyNotHeld(String),
}

impl From<rusqlite::Error> for CaError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Store(e.into())
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `contents` to a new file; `secret` files get mode 0600 from the start
/// (never world-readable, not even for a moment).
pub fn write_new(path: &Path, contents: &[u8], secret: bool) -> Result<(), CaError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(contents).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Reads a whole file as text.
pub fn read_text(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(io_err(path))
}

/// Reads every certificate in a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let text = read_text(path)?;
    parse_certs(&text).map_err(|what| CaError::BadFile {
        path: path.to_path_buf(),
        what,
    })
}

fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    KeyPair::from_pem(&read_text(path)?).map_err(|e| CaError::BadFile {
        path: path.to_path_buf(),
        what: format!("not a usable private key: {e}"),
    })
}

/// Options for `warden ca init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// An existing root (certificate, key) to put the intermediate under.
    pub external_root: Option<(PathBuf, PathBuf)>,
    /// Lifetime of a root this CA makes itself.
    pub root_ttl: Duration,
    /// Lifetime of the intermediate (capped at the root's).
    pub intermediate_ttl: Duration,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            external_root: None,
            root_ttl: Duration::from_secs(10 * 365 * 24 * 3600),
            intermediate_ttl: Duration::from_secs(365 * 24 * 3600),
        }
    }
}

/// A leaf certificate the CA signed.
#[derive(Debug, Clone)]
pub struct Svid {
    /// The leaf, DER.
    pub leaf: CertificateDer<'static>,
    /// Leaf then intermediate, PEM: what a workload presents.
    pub chain_pem: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Validity window.
    pub validity: Validity,
    /// Id of the intermediate that signed it.
    pub issuer: String,
}

/// The CA's certificates as they stand: the intermediate that signs, and
/// the roots workloads trust. Replaced whole when a rotation step commits
/// (see [`crate::rotation`]); a signature in progress keeps the one it took.
pub struct Chain {
    issuer: Issuer<'static, KeyPair>,
    /// The active intermediate.
    pub intermediate: CertificateDer<'static>,
    /// Its id (SHA-256 of the DER, hex).
    pub intermediate_id: String,
    /// Its validity (a leaf never outlives it).
    pub intermediate_validity: Validity,
    /// Every root in the bundle (published and active).
    pub roots: Vec<CertificateDer<'static>>,
    /// The same, PEM.
    pub bundle_pem: String,
    /// Every root and intermediate the store records (empty before the
    /// store was opened).
    pub records: Vec<AuthorityRecord>,
}

/// The id of a CA certificate: SHA-256 of its DER, hex.
pub fn cert_id(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

/// An opened CA: its settings, its signing key, and the bundle it hands out.
pub struct Authority {
    /// Where the CA lives.
    pub dir: PathBuf,
    /// Where its state (the store, the audit trail, keys made by rotation)
    /// lives: `dir`, unless the keys and settings are mounted read-only
    /// elsewhere (a pod).
    pub state_dir: PathBuf,
    /// Its settings.
    pub config: CaConfig,
    /// Seals rotation's keys for the other replicas (`store.key`, or
    /// `WARDEN_CA_STORE_KEY`); `None` when neither is there.
    pub store_key: Option<crate::sealed::StoreKey>,
    chain: RwLock<Arc<Chain>>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("dir", &self.dir)
            .field("trust_domain", &self.config.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Creates a new CA in `dir`: settings, a root (or uses an external one),
    /// an intermediate, and the trust bundle. Refuses if a CA is already there.
    pub fn init(
        dir: &Path,
        td: &TrustDomain,
        opts: &InitOptions,
        now: OffsetDateTime,
    ) -> Result<Self, CaError> {
        if dir.join(files::CONFIG).exists() || dir.join(files::INTERMEDIATE_KEY).exists() {
            return Err(CaError::AlreadyExists(dir.to_path_buf()));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;

        let (root_der, root_key, root_validity) = match &opts.external_root {
            Some((cert_path, key_path)) => {
                let der = read_certs(cert_path)?.swap_remove(0);
                let key = read_key(key_path)?;
                check_external_root(cert_path, &der, &key)?;
                let validity = validity_of(&der).map_err(|what| CaError::BadFile {
                    path: cert_path.clone(),
                    what,
                })?;
                (der, key, validity)
            }
            None => {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
                let validity = Validity {
                    not_before: now - crate::lifetime::BACKDATE,
                    not_after: now + opts.root_ttl,
                };
                let cert = profile::root(td, validity)?.self_signed(&key)?;
                write_new(
                    &dir.join(files::ROOT_KEY),
                    key.serialize_pem().as_bytes(),
                    true,
                )?;
                (cert.der().clone(), key, validity)
            }
        };
        let root_issuer = Issuer::from_ca_cert_der(&root_der, root_key)?;
        let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let int_validity = cap_lifetime(
            opts.intermediate_ttl,
            opts.intermediate_ttl,
            root_validity,
            now,
        );
        let int_cert =
            profile::intermediate(td, int_validity)?.signed_by(&int_key, &root_issuer)?;

        write_new(
            &dir.join(files::INTERMEDIATE_KEY),
            int_key.serialize_pem().as_bytes(),
            true,
        )?;
        write_new(
            &dir.join(files::INTERMEDIATE_CERT),
            int_cert.pem().as_bytes(),
            false,
        )?;
        let root_pem = certs_pem(std::slice::from_ref(&root_der));
        write_new(&dir.join(files::ROOT_CERT), root_pem.as_bytes(), false)?;
        write_new(&dir.join(files::BUNDLE), root_pem.as_bytes(), false)?;
        write_new(
            &dir.join(files::CONFIG),
            CaConfig::initial_text(td).as_bytes(),
            false,
        )?;
        write_new(
            &dir.join(files::STORE_KEY),
            crate::sealed::StoreKey::generate().as_bytes(),
            true,
        )?;
        Self::open(dir)
    }

    /// Opens the CA in `dir` from its files; [`Authority::reload`] then
    /// moves it to what the store records.
    pub fn open(dir: &Path) -> Result<Self, CaError> {
        let config = CaConfig::load(&dir.join(files::CONFIG))?;
        let int_path = dir.join(files::INTERMEDIATE_CERT);
        let intermediate = read_certs(&int_path)?.swap_remove(0);
        let key = read_key(&dir.join(files::INTERMEDIATE_KEY))?;
        let roots = read_certs(&dir.join(files::BUNDLE))?;
        let chain = Chain::new(intermediate, key, roots, Vec::new(), &int_path)?;
        let store_key = match std::env::var("WARDEN_CA_STORE_KEY") {
            Ok(text) if !text.is_empty() => Some(text),
            _ => fs::read_to_string(dir.join(files::STORE_KEY)).ok(),
        }
        .map(|t| crate::sealed::StoreKey::parse(&t))
        .transpose()?;
        Ok(Self {
            dir: dir.to_path_buf(),
            state_dir: dir.to_path_buf(),
            config,
            store_key,
            chain: RwLock::new(Arc::new(chain)),
        })
    }

    /// The chain as it stands.
    pub fn chain(&self) -> Arc<Chain> {
        self.chain.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Moves to the chain `records` describe (no-op when it is the current
    /// one): the roots not retired, and the active intermediate with its key.
    pub fn reload(&self, records: Vec<AuthorityRecord>) -> Result<bool, CaError> {
        if self.chain().records == records {
            return Ok(false);
        }
        let corrupt = |what: String| CaError::Corrupt(format!("authorities: {what}"));
        // Only certificates this CA recorded count: the store alone cannot
        // add a root (or anything) without store.key's tag.
        if let Some(key) = &self.store_key
            && let Some(bad) = records.iter().find(|a| {
                a.state != State::Retired
                    && !a.mac.as_ref().is_some_and(|m| key.verify(&a.vouched(), m))
            })
        {
            return Err(corrupt(format!(
                "{} {} is not vouched for by store.key: refusing the whole chain",
                bad.kind.as_str(),
                bad.id
            )));
        }
        let active: Vec<_> = records
            .iter()
            .filter(|a| a.kind == Kind::Intermediate && a.state == State::Active)
            .collect();
        let [active] = active.as_slice() else {
            return Err(corrupt(format!(
                "{} active intermediates, not one",
                active.len()
            )));
        };
        let intermediate = parse_certs(&active.cert_pem)
            .map_err(corrupt)?
            .swap_remove(0);
        let key = self.key_of(&active.id, &intermediate)?;
        let roots = records
            .iter()
            .filter(|a| a.kind == Kind::Root && matches!(a.state, State::Published | State::Active))
            .map(|a| parse_certs(&a.cert_pem).map(|mut c| c.swap_remove(0)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(corrupt)?;
        if roots.is_empty() {
            return Err(corrupt("no root in the bundle".into()));
        }
        let chain = Chain::new(intermediate, key, roots, records, Path::new("store"))?;
        *self.chain.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(chain);
        Ok(true)
    }

    /// The key of CA certificate `id`: in the state directory's `keys/`
    /// (made by rotation), or the key `init` wrote, if it is this one's.
    pub fn key_of(&self, id: &str, cert: &CertificateDer<'_>) -> Result<KeyPair, CaError> {
        let mine = |key: &KeyPair| {
            x509_parser::parse_x509_certificate(cert)
                .is_ok_and(|(_, c)| c.public_key().raw == key.subject_public_key_info().as_slice())
        };
        let candidates = [
            self.state_dir.join(files::KEYS).join(format!("{id}.pem")),
            self.dir.join(files::INTERMEDIATE_KEY),
            self.dir.join(files::ROOT_KEY),
        ];
        for path in candidates.iter().filter(|p| p.exists()) {
            let key = read_key(path)?;
            if mine(&key) {
                return Ok(key);
            }
        }
        Err(CaError::KeyNotHeld(id.to_owned()))
    }

    /// Writes the key of a new CA certificate `id` into the state
    /// directory's `keys/` (0700), 0600 from the start.
    pub fn keep_key(&self, id: &str, key: &KeyPair) -> Result<(), CaError> {
        let dir = self.state_dir.join(files::KEYS);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        let path = dir.join(format!("{id}.pem"));
        if path.exists() {
            return Ok(());
        }
        // Through a temporary file and a rename: a crash never leaves half a key.
        let tmp = dir.join(format!("{id}.pem.tmp"));
        let _ = fs::remove_file(&tmp);
        write_new(&tmp, key.serialize_pem().as_bytes(), true)?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir))
    }

    /// Signs an X.509-SVID for `id` over `public_key`. The lifetime is `ttl`
    /// (or the default), capped at `max_ttl` and at the intermediate's expiry.
    pub fn sign(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        ttl: Option<Duration>,
        now: OffsetDateTime,
        dns_names: &[String],
    ) -> Result<Svid, CaError> {
        let ttl = ttl.unwrap_or(self.config.default_ttl);
        self.sign_capped(id, public_key, ttl, self.config.max_ttl, now, dns_names)
    }

    fn sign_capped(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        ttl: Duration,
        max_ttl: Duration,
        now: OffsetDateTime,
        dns_names: &[String],
    ) -> Result<Svid, CaError> {
        let chain = self.chain();
        let issuer_validity = chain.intermediate_validity;
        let validity = cap_lifetime(ttl, max_ttl, issuer_validity, now);
        if validity.not_after <= validity.not_before || now >= issuer_validity.not_after {
            return Err(CaError::IssuerExpired {
                not_after: issuer_validity.not_after,
            });
        }
        let params = profile::svid(id, validity, dns_names)?;
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| hex::encode(s.to_bytes()))
            .unwrap_or_default();
        let cert = params.signed_by(public_key, &chain.issuer)?;
        let leaf = cert.der().clone();
        let chain_pem = certs_pem(&[leaf.clone(), chain.intermediate.clone()]);
        Ok(Svid {
            leaf,
            chain_pem,
            serial,
            validity,
            issuer: chain.intermediate_id.clone(),
        })
    }

    /// The trust domain this CA issues in.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.config.trust_domain
    }

    /// Trust roots as DER.
    pub fn bundle(&self) -> Vec<CertificateDer<'static>> {
        self.chain().roots.clone()
    }

    /// Trust roots as PEM.
    pub fn bundle_pem(&self) -> String {
        self.chain().bundle_pem.clone()
    }

    /// The active intermediate's validity (a leaf never outlives it).
    pub fn intermediate_validity(&self) -> Validity {
        self.chain().intermediate_validity
    }

    /// The active intermediate certificate.
    pub fn intermediate(&self) -> CertificateDer<'static> {
        self.chain().intermediate.clone()
    }

    /// The CA server's own SPIFFE ID (`spiffe://<td>/warden/ca`); never issued to a workload.
    pub fn server_id(&self) -> SpiffeId {
        server_id(&self.config.trust_domain)
    }
}

impl Chain {
    fn new(
        intermediate: CertificateDer<'static>,
        key: KeyPair,
        roots: Vec<CertificateDer<'static>>,
        records: Vec<AuthorityRecord>,
        source: &Path,
    ) -> Result<Self, CaError> {
        let intermediate_validity =
            validity_of(&intermediate).map_err(|what| CaError::BadFile {
                path: source.to_path_buf(),
                what,
            })?;
        let issuer = Issuer::from_ca_cert_der(&intermediate, key)?;
        Ok(Self {
            issuer,
            intermediate_id: cert_id(&intermediate),
            intermediate_validity,
            bundle_pem: certs_pem(&roots),
            intermediate,
            roots,
            records,
        })
    }
}

/// An external root must be a CA certificate whose public key is the given key's.
pub(crate) fn check_external_root(
    path: &Path,
    der: &CertificateDer<'_>,
    key: &KeyPair,
) -> Result<(), CaError> {
    let bad = |what: &str| CaError::BadFile {
        path: path.to_path_buf(),
        what: what.to_owned(),
    };
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| bad("not a certificate"))?;
    if !cert.is_ca() {
        return Err(bad(
            "the root certificate is not a CA (basicConstraints CA:TRUE missing)",
        ));
    }
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(bad("the root key does not belong to the root certificate"));
    }
    Ok(())
}
