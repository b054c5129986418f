//! The CA's decisions: who gets which certificate, recorded in the store and
//! the audit trail together. The HTTP server, the CLI and the benchmark all
//! call this one place. Decisions are synchronous (a CSR check, a signature
//! and a few SQLite statements, well under a millisecond); the API server runs
//! each on tokio's blocking pool.

use std::path::PathBuf;
use std::time::Duration;

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use warden_config::SpiffeId;

use crate::audit::{self, Event};
use crate::authority::{Authority, CaError, Svid, files};
use crate::csr::{self, CsrError};
use crate::metrics::CaMetrics;
use crate::store::{self, IssuedRecord, Store, WriteTx};
use crate::token;

mod deny;

pub use deny::{Denial, DenyReport, MAX_DENY_REASON_LEN};

/// Longest join-token lifetime: a token is a bearer secret.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A request for a certificate.
#[derive(Debug, Clone, Default)]
pub struct CertifyRequest {
    /// PEM CSR.
    pub csr: String,
    /// A join token (bootstrap); absent for a renewal.
    pub token: Option<String>,
    /// Asked-for lifetime; capped by the CA.
    pub ttl: Option<Duration>,
}

/// What proved the caller's identity, as established by the transport.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Nothing beyond what the request carries (a token, perhaps).
    Anonymous,
    /// A client certificate that verified against the bundle at the
    /// handshake, with this ID and NotAfter (re-checked per request: a
    /// connection can outlive its certificate).
    Svid {
        /// The SPIFFE ID in the certificate.
        id: SpiffeId,
        /// Its NotAfter.
        not_after: OffsetDateTime,
        /// Its serial number, hex (as the store keeps it).
        serial: String,
    },
    /// A pod attested by its ServiceAccount token (see [`crate::kubernetes`]).
    Pod(crate::kubernetes::Pod),
}

/// A signed certificate and what the workload needs with it.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The identity in the certificate.
    pub spiffe_id: SpiffeId,
    /// The certificate.
    pub svid: Svid,
    /// Trust bundle, PEM.
    pub bundle_pem: String,
}

/// Why a request was refused. `reason()` is the metric label and problem type.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Neither a token nor a client certificate.
    #[error("no join token and no client certificate: nothing proves an identity")]
    Unauthenticated,
    /// The token hash is not in the store.
    #[error("join token is not known to this CA")]
    TokenUnknown,
    /// The token was used before.
    #[error("join token was already used")]
    TokenUsed,
    /// The token is past its expiry.
    #[error("join token expired")]
    TokenExpired,
    /// The client certificate expired after the connection was made.
    #[error("the client certificate has expired")]
    SvidExpired,
    /// A Kubernetes ServiceAccount token did not attest a pod.
    #[error(transparent)]
    Kubernetes(#[from] crate::kubernetes::Refused),
    /// The CSR is unacceptable.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// The identity is on the deny list.
    #[error("{0} is denied by the CA")]
    Denied(SpiffeId),
    /// The identity is reserved for the CA itself.
    #[error("{0} is reserved for the CA server")]
    Reserved(SpiffeId),
    /// The identity is outside this CA's trust domain.
    #[error("{0} is not in this CA's trust domain")]
    ForeignTrustDomain(SpiffeId),
    /// The caller may not ask the CA to deny identities: it presented no
    /// client certificate (`None`), or one whose ID `deny_reporters` does not list.
    #[error("{}", deny::not_reporter(.0.as_ref()))]
    NotReporter(Option<SpiffeId>),
    /// A deny report names an identity the CA cannot deny.
    #[error("cannot deny that identity: {0}")]
    BadTarget(String),
    /// The request is malformed (not a certify or deny request, a bad field).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The request body is over the limit.
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    /// A rotation step that must not happen now (and why).
    #[error("{0}")]
    Rotation(String),
    /// Over a per-caller limit (which one); retry after the seconds given.
    #[error("too many certify requests from this {0}; retry in {1} s")]
    RateLimited(&'static str, u64),
    /// The server has no room for another long poll; retry after the seconds given.
    #[error(
        "this CA server holds as many trust feed watchers as it takes; retry in {0} s (or add a replica)"
    )]
    Busy(u64),
    /// Something on the CA's side failed; nothing was issued.
    #[error("internal error: {0}")]
    Internal(#[from] CaError),
}

impl From<crate::store::StoreError> for Refusal {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Internal(e.into())
    }
}

impl Refusal {
    /// A fixed label for metrics, logs and the problem type.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::TokenUnknown => "token_unknown",
            Self::TokenUsed => "token_used",
            Self::TokenExpired => "token_expired",
            Self::SvidExpired => "svid_expired",
            Self::Kubernetes(k) => k.reason(),
            Self::Csr(e) => e.reason(),
            Self::Denied(_) => "denied",
            Self::Reserved(_) => "reserved_id",
            Self::ForeignTrustDomain(_) => "foreign_trust_domain",
            Self::NotReporter(_) => "not_a_reporter",
            Self::BadTarget(_) => "bad_target",
            Self::BadRequest(_) => "bad_request",
            Self::TooLarge(_) => "body_too_large",
            Self::Rotation(_) => "rotation_refused",
            Self::RateLimited(..) => "rate_limited",
            Self::Busy(_) => "busy",
            Self::Internal(_) => "internal",
        }
    }

    /// The HTTP status that answers it.
    pub fn status(&self) -> u16 {
        match self {
            Self::Unauthenticated
            | Self::TokenUnknown
            | Self::TokenUsed
            | Self::TokenExpired
            | Self::SvidExpired => 401,
            Self::Kubernetes(k) => k.status(),
            Self::Csr(_) | Self::BadRequest(_) | Self::BadTarget(_) => 400,
            Self::TooLarge(_) => 413,
            Self::Denied(_)
            | Self::Reserved(_)
            | Self::ForeignTrustDomain(_)
            | Self::NotReporter(_) => 403,
            Self::Rotation(_) => 409,
            Self::RateLimited(..) => 429,
            Self::Busy(_) => 503,
            Self::Internal(_) => 500,
        }
    }
}

/// The CA as a service: authority (keys), store, audit trail, metrics.
#[derive(Debug)]
pub struct CaService {
    /// Keys, certificates, settings.
    pub authority: Authority,
    /// State.
    pub store: Store,
    /// Metrics.
    pub metrics: CaMetrics,
    /// Attestation of pods, when `ca.yaml` has a `kubernetes:` section.
    pub kubernetes: Option<crate::kubernetes::Attestor>,
    /// What proxies are pushed (`GET /v1/watch`).
    pub trust: crate::trust::TrustFeed,
    /// Per-caller limits on certify requests (see [`crate::ratelimit`]).
    pub limits: IssuanceLimiters,
    audit_path: PathBuf,
}

/// Most callers each limiter keeps a window for.
pub const MAX_LIMITED_CALLERS: usize = 65_536;

/// The three per-caller limits of `rate_limits:` (the fourth, per pod UID,
/// is the attestor's).
#[derive(Debug)]
pub struct IssuanceLimiters {
    /// Per source address.
    pub source: crate::ratelimit::PerMinute,
    /// Per join token (its hash).
    pub token: crate::ratelimit::PerMinute,
    /// Per SPIFFE ID renewing over mTLS.
    pub identity: crate::ratelimit::PerMinute,
}

impl IssuanceLimiters {
    fn new(l: &warden_config::ca::IssuanceLimits) -> Self {
        use crate::ratelimit::PerMinute;
        Self {
            source: PerMinute::new(l.per_source, MAX_LIMITED_CALLERS),
            token: PerMinute::new(l.per_token, MAX_LIMITED_CALLERS),
            identity: PerMinute::new(l.per_identity, MAX_LIMITED_CALLERS),
        }
    }

    /// Counts one certify request from `source`, before its body is read.
    pub fn check_source(&self, source: std::net::IpAddr) -> Result<(), Refusal> {
        self.source
            .check(&source.to_string())
            .map_err(|wait| Refusal::RateLimited("source address", wait))
    }

    /// Counts one parsed certify request against its token or its SPIFFE ID.
    /// Counts a renewal against its SPIFFE ID (a join token is counted
    /// once the store knows it: see [`IssuanceLimiters::check_token`]).
    pub fn check_caller(&self, req: &CertifyRequest, caller: &Caller) -> Result<(), Refusal> {
        if let (None, Caller::Svid { id, .. }) = (&req.token, caller) {
            self.identity
                .check(id.as_str())
                .map_err(|wait| Refusal::RateLimited("SPIFFE ID", wait))?;
        }
        Ok(())
    }

    /// Counts a use of a join token the store knows (unknown ones take no
    /// slot: anyone can make them up).
    pub fn check_token(&self, hash: &str) -> Result<(), Refusal> {
        self.token
            .check(hash)
            .map_err(|wait| Refusal::RateLimited("join token", wait))
    }
}

/// The PostgreSQL store to use: `WARDEN_CA_STORE` (so a password can come
/// from a Secret), else `store:` in `ca.yaml`; `None`: the embedded one.
pub fn store_url(config: &warden_config::CaConfig) -> Option<String> {
    std::env::var("WARDEN_CA_STORE")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| config.store.clone())
}

fn unix(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

/// SHA-256 of a SubjectPublicKeyInfo, hex: identifies a key in the store.
fn key_fingerprint(key: &impl PublicKeyData) -> String {
    hex::encode(Sha256::digest(key.subject_public_key_info()))
}

impl CaService {
    /// Opens the CA of `authority` with its store (in `authority.state_dir`).
    pub fn open(authority: Authority) -> Result<Self, CaError> {
        let store = match store_url(&authority.config) {
            Some(url) => Store::open_postgres(&url)?,
            None => Store::open(&authority.state_dir.join(files::STATE))?,
        };
        let metrics = CaMetrics::new().map_err(|e| CaError::Setup(format!("metrics: {e}")))?;
        let audit_path = authority.state_dir.join(files::AUDIT);
        store.set_audit_file(audit_path.clone());
        let authority_limits = authority.config.rate_limits;
        let kubernetes = authority
            .config
            .kubernetes
            .clone()
            .map(|k| crate::kubernetes::Attestor::new(k, authority.trust_domain().clone()))
            .transpose()
            .map_err(|e| CaError::Setup(format!("kubernetes: {e}")))?;
        let svc = Self {
            authority,
            store,
            metrics,
            kubernetes,
            trust: crate::trust::TrustFeed::new(),
            limits: IssuanceLimiters::new(&authority_limits),
            audit_path,
        };
        svc.adopt_chain(OffsetDateTime::now_utc())?;
        svc.refresh_trust()?;
        Ok(svc)
    }

    /// The audit trail's file.
    pub(crate) fn audit_path(&self) -> &std::path::Path {
        &self.audit_path
    }

    /// Runs `f` in a write transaction and appends `event` (built from f's
    /// result) to the audit trail in the same transaction; both commit or neither.
    fn write<T>(
        &self,
        now: OffsetDateTime,
        f: impl FnOnce(&mut WriteTx<'_>) -> Result<T, Refusal>,
        event: impl FnOnce(&T) -> Event,
    ) -> Result<T, Refusal> {
        // Grouped: concurrent writes share one commit (see `Store::write_grouped`).
        self.store.write_grouped(|tx| {
            let value = f(tx)?;
            audit::append(tx, &self.audit_path, event(&value), now)?;
            Ok(value)
        })
    }

    /// Records `event` in the audit trail on its own (no other state changes).
    pub fn audit(&self, event: Event, now: OffsetDateTime) -> Result<(), CaError> {
        self.write(now, |_| Ok(()), |_| event).map_err(|r| match r {
            Refusal::Internal(e) => e,
            other => CaError::Audit(other.to_string()),
        })
    }

    /// Checks that the CA may issue `id` at all.
    fn check_issuable(&self, id: &SpiffeId) -> Result<(), Refusal> {
        if !id.is_in(self.authority.trust_domain()) {
            return Err(Refusal::ForeignTrustDomain(id.clone()));
        }
        if *id == self.authority.server_id() {
            return Err(Refusal::Reserved(id.clone()));
        }
        Ok(())
    }

    /// Handles `POST /v1/certify`: a CSR plus a join token (bootstrap), or a
    /// CSR from a caller holding a current SVID (renewal, same ID only).
    pub fn certify(
        &self,
        req: CertifyRequest,
        caller: Caller,
        now: OffsetDateTime,
    ) -> Result<Issued, Refusal> {
        let kind = kind_of(&req, &caller);
        let pod = match &caller {
            Caller::Pod(p) => Some(p.clone()),
            _ => None,
        };
        let mut claimed: Option<SpiffeId> = None;
        let result = self.try_certify(req, caller, now, &mut claimed);
        match &result {
            Ok(issued) => {
                self.metrics
                    .issuances
                    .with_label_values(&[kind, "issued"])
                    .inc();
                tracing::info!(kind, spiffe_id = %issued.spiffe_id, serial = %issued.svid.serial, "issued");
            }
            // An attested pod's refusal names it, as its attestation's would.
            Err(refusal) => match &pod {
                Some(pod) => self.record_pod_refusal(refusal, pod, now),
                None => self.record_refusal(kind, refusal, claimed.as_ref(), now),
            },
        }
        result
    }

    /// Counts, logs and audits a refused certificate request (see `note_refusal`).
    pub fn record_refusal(
        &self,
        kind: &'static str,
        refusal: &Refusal,
        id: Option<&SpiffeId>,
        now: OffsetDateTime,
    ) {
        self.metrics
            .issuances
            .with_label_values(&[kind, "refused"])
            .inc();
        self.note_refusal(kind, refusal, id, now);
    }

    /// Counts, logs and audits a refused attestation of a pod whose token
    /// verified (the trail names its namespace, ServiceAccount and pod).
    pub fn record_pod_refusal(
        &self,
        refusal: &Refusal,
        pod: &crate::kubernetes::Pod,
        now: OffsetDateTime,
    ) {
        self.metrics
            .issuances
            .with_label_values(&["kubernetes", "refused"])
            .inc();
        let s = &pod.subject;
        let mut fields: Vec<(&'static str, String)> = [
            ("namespace", &s.namespace),
            ("service_account", &s.service_account),
            // Empty for a token bound to no pod.
            ("pod", &s.pod),
            ("pod_uid", &s.pod_uid),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k, v.clone()))
        .collect();
        if let Refusal::Kubernetes(crate::kubernetes::Refused::CsrMismatch { asked, .. }) = refusal
        {
            // The CSR's own text: no longer in the trail than an ID may be.
            fields.push(("asked", asked.chars().take(2048).collect()));
        }
        self.note_refusal_with("kubernetes", refusal, Some(&pod.id), &fields, now);
    }

    /// Counts, logs and audits a refused request of any kind. Refusals that
    /// name no identity (junk, unknown tokens) are only counted and logged,
    /// rate-limited: anyone can send them, and they must not fill the disk or
    /// hold the store's write lock.
    fn note_refusal(
        &self,
        kind: &'static str,
        refusal: &Refusal,
        id: Option<&SpiffeId>,
        now: OffsetDateTime,
    ) {
        self.note_refusal_with(kind, refusal, id, &[], now);
    }

    fn note_refusal_with(
        &self,
        kind: &'static str,
        refusal: &Refusal,
        id: Option<&SpiffeId>,
        fields: &[(&'static str, String)],
        now: OffsetDateTime,
    ) {
        static REFUSAL_LOG: crate::ratelog::LogLimiter = crate::ratelog::LogLimiter::new(10);
        let reason = refusal.reason();
        self.metrics.refusals.with_label_values(&[reason]).inc();
        let id_text = id.map(|i| i.to_string()).unwrap_or_default();
        if REFUSAL_LOG.allow() {
            tracing::warn!(kind, reason, spiffe_id = %id_text, detail = %refusal, "refused");
        }
        // A limit refusal stays out of the trail: the limits bound it.
        let limited = matches!(
            refusal,
            Refusal::RateLimited(..)
                | Refusal::Kubernetes(
                    crate::kubernetes::Refused::RateLimited(..)
                        | crate::kubernetes::Refused::SourceRateLimited(_)
                )
        );
        if id.is_none() || limited {
            return;
        }
        let event = fields.iter().fold(
            Event::new("refused")
                .with("kind", kind)
                .with("reason", reason)
                .with("spiffe_id", id_text),
            |e, (k, v)| e.with(k, v.as_str()),
        );
        if let Err(e) = self.audit(event, now) {
            tracing::error!(error = %e, "could not audit a refusal");
        }
    }

    fn try_certify(
        &self,
        req: CertifyRequest,
        caller: Caller,
        now: OffsetDateTime,
        claimed: &mut Option<SpiffeId>,
    ) -> Result<Issued, Refusal> {
        let token_hash = req.token.as_deref().map(token::hash);
        let kind = kind_of(&req, &caller);
        let pod = match &caller {
            Caller::Pod(p) => Some(p.subject.clone()),
            _ => None,
        };
        let id = match (&token_hash, caller) {
            (Some(hash), _) => {
                let rec = store::token(&mut *self.store.lock(), hash).map_err(CaError::from)?;
                let rec = rec.ok_or(Refusal::TokenUnknown)?;
                self.limits.check_token(hash)?;
                let id = SpiffeId::parse(&rec.spiffe_id)
                    .map_err(|e| CaError::Corrupt(format!("a stored token has a bad id: {e}")))?;
                *claimed = Some(id.clone());
                if rec.used_at.is_some() {
                    return Err(Refusal::TokenUsed);
                }
                if rec.expires_at <= unix(now) {
                    return Err(Refusal::TokenExpired);
                }
                id
            }
            (
                None,
                Caller::Svid {
                    id,
                    not_after,
                    serial,
                },
            ) => {
                *claimed = Some(id.clone());
                if not_after <= now {
                    return Err(Refusal::SvidExpired);
                }
                // A pod proves itself again at every renewal (its pod may be
                // gone): its certificate alone renews nothing.
                let kind =
                    store::issued_kind(&mut *self.store.lock(), &serial).map_err(CaError::from)?;
                if kind.as_deref() == Some("kubernetes") {
                    return Err(crate::kubernetes::Refused::RenewWithToken.into());
                }
                id
            }
            (None, Caller::Pod(p)) => p.id,
            (None, Caller::Anonymous) => return Err(Refusal::Unauthenticated),
        };
        *claimed = Some(id.clone());
        self.check_issuable(&id)?;
        // Only a pod may have DNS names, and only those granted to its
        // identity (`kubernetes.dns_names`).
        let dns_allowed = match (&pod, &self.kubernetes) {
            (Some(_), Some(k)) => Some(k.dns_names_of(&id)),
            _ => None,
        };
        let (request, dns_names) =
            csr::check(&req.csr, &id, dns_allowed).map_err(|e| match (e, &pod) {
                // A pod asking for another ID than its token's is refused its
                // attestation (403, a k8s reason, final); a join token or a
                // renewal asking for another ID is a client's bad request
                // (400: a renewing proxy keeps its current certificate).
                (CsrError::SanMismatch { asked, allowed: _ }, Some(_)) => {
                    crate::kubernetes::Refused::CsrMismatch {
                        asked,
                        allowed: id.clone(),
                    }
                    .into()
                }
                (e, _) => Refusal::from(e),
            })?;
        let svid = self
            .authority
            .sign(&id, &request.public_key, req.ttl, now, &dns_names)?;
        let key_sha256 = key_fingerprint(&request.public_key);
        self.write(
            now,
            |tx| {
                // Checked inside the write lock, so a `deny` that commits
                // before this transaction is always honoured.
                if store::is_denied(tx, &id).map_err(CaError::from)? {
                    return Err(Refusal::Denied(id.clone()));
                }
                if let Some(hash) = &token_hash
                    && !store::consume_token(tx, hash, unix(now)).map_err(CaError::from)?
                {
                    // Lost a race with another request using the same token.
                    return Err(Refusal::TokenUsed);
                }
                let rec = issued_record(&id, &svid, key_sha256, kind);
                store::insert_issued(tx, &rec, unix(now)).map_err(CaError::from)?;
                Ok(rec)
            },
            |rec| match &pod {
                // Which pod it was, for whoever reads the trail.
                Some(p) => {
                    let e = issued_event(rec)
                        .with("namespace", p.namespace.as_str())
                        .with("service_account", p.service_account.as_str())
                        .with("pod", p.pod.as_str())
                        .with("pod_uid", p.pod_uid.as_str());
                    if dns_names.is_empty() {
                        e
                    } else {
                        e.with("dns_names", dns_names.join(","))
                    }
                }
                None => issued_event(rec),
            },
        )?;
        Ok(Issued {
            spiffe_id: id,
            svid,
            bundle_pem: self.authority.bundle_pem(),
        })
    }

    /// Issues a certificate and key made here (`ca issue`, and the CA
    /// server's own certificate). Returns the key as PEM with the SVID.
    pub fn issue_local(
        &self,
        id: &SpiffeId,
        ttl: Option<Duration>,
        kind: &'static str,
        now: OffsetDateTime,
    ) -> Result<(Issued, String), Refusal> {
        self.issue_local_with_dns(id, &[], ttl, kind, now)
    }

    /// As [`CaService::issue_local`], with DNS names beside the SPIFFE ID
    /// (`warden ca issue --dns-name`: the operator; otherwise only a pod's
    /// CSR may ask for names, those `kubernetes.dns_names` grants it).
    pub fn issue_local_with_dns(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Option<Duration>,
        kind: &'static str,
        now: OffsetDateTime,
    ) -> Result<(Issued, String), Refusal> {
        if kind != "self" {
            self.check_issuable(id)?;
        }
        if let Some(bad) = dns_names
            .iter()
            .find(|d| !crate::profile::valid_dns_name(d))
        {
            return Err(Refusal::BadRequest(format!(
                "{bad:?} is not a DNS name a certificate may carry (lowercase labels, no wildcard)"
            )));
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::from)?;
        let svid = self.authority.sign(id, &key, ttl, now, dns_names)?;
        self.write(
            now,
            |tx| {
                if kind != "self" && store::is_denied(tx, id).map_err(CaError::from)? {
                    return Err(Refusal::Denied(id.clone()));
                }
                let rec = issued_record(id, &svid, key_fingerprint(&key), kind);
                store::insert_issued(tx, &rec, unix(now)).map_err(CaError::from)?;
                Ok(rec)
            },
            issued_event,
        )?;
        self.metrics
            .issuances
            .with_label_values(&[kind, "issued"])
            .inc();
        let issued = Issued {
            spiffe_id: id.clone(),
            svid,
            bundle_pem: self.authority.bundle_pem(),
        };
        Ok((issued, key.serialize_pem()))
    }

    /// Creates a one-time join token for `id`; returns the token text (shown
    /// once; only its hash is stored) and its expiry.
    pub fn create_token(
        &self,
        id: &SpiffeId,
        ttl: Option<Duration>,
        now: OffsetDateTime,
    ) -> Result<(String, OffsetDateTime), Refusal> {
        self.check_issuable(id)?;
        let ttl = ttl.unwrap_or(self.authority.config.token_ttl);
        if ttl > MAX_TOKEN_TTL {
            return Err(Refusal::BadRequest(format!(
                "token lifetime is capped at {}",
                warden_config::HumanDuration(MAX_TOKEN_TTL)
            )));
        }
        let (text, hash) = token::generate();
        let expires = now + ttl;
        self.write(
            now,
            |tx| {
                store::insert_token(tx, &hash, id, unix(now), unix(expires))
                    .map_err(|e| CaError::from(e).into())
            },
            |_| {
                Event::new("token_created")
                    .with("spiffe_id", id.as_str())
                    .with("token_sha256", hash.as_str())
                    .with("expires_at", unix(expires))
            },
        )?;
        Ok((text, expires))
    }

    /// Denies (`deny = true`) or re-allows an identity; takes effect on the
    /// next request the running server handles. Returns whether it changed.
    pub fn set_denied(
        &self,
        id: &SpiffeId,
        deny: bool,
        now: OffsetDateTime,
    ) -> Result<bool, Refusal> {
        self.write(
            now,
            |tx| store::set_denied(tx, id, deny, unix(now)).map_err(|e| CaError::from(e).into()),
            |changed| denied_event(id, deny, *changed),
        )
    }
}

/// The audit event of a deny or allow; `changed` is false when `id` already was.
fn denied_event(id: &SpiffeId, deny: bool, changed: bool) -> Event {
    Event::new(if deny { "denied" } else { "allowed" })
        .with("spiffe_id", id.as_str())
        .with("changed", changed)
}

fn issued_record(id: &SpiffeId, svid: &Svid, key_sha256: String, kind: &str) -> IssuedRecord {
    IssuedRecord {
        serial: svid.serial.clone(),
        spiffe_id: id.to_string(),
        not_before: unix(svid.validity.not_before),
        not_after: unix(svid.validity.not_after),
        key_sha256,
        kind: kind.to_owned(),
        issuer: svid.issuer.clone(),
    }
}

/// How a certify request proves its identity: the label of metrics, logs
/// and the audit trail.
fn kind_of(req: &CertifyRequest, caller: &Caller) -> &'static str {
    match (req.token.is_some(), caller) {
        (true, _) => "bootstrap",
        (false, Caller::Pod(_)) => "kubernetes",
        (false, _) => "renewal",
    }
}

fn issued_event(rec: &IssuedRecord) -> Event {
    Event::new(if rec.kind == "renewal" {
        "renewed"
    } else {
        "issued"
    })
    .with("kind", rec.kind.as_str())
    .with("spiffe_id", rec.spiffe_id.as_str())
    .with("serial", rec.serial.as_str())
    .with("not_after", rec.not_after)
    .with("key_sha256", rec.key_sha256.as_str())
    .with("issuer", rec.issuer.as_str())
}
