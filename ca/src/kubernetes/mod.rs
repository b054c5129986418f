//! Kubernetes attestation: a pod proves who it is with its projected
//! ServiceAccount token (a JWT for warden's audience, bound to the pod), and
//! gets `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
//!
//! Two ways to verify, as SPIRE's `k8s_psat` and Istio do:
//! - `tokenreview` ([`review`]): the API server checks the token, then the
//!   pod is fetched and its UID compared, so a deleted pod's token stops
//!   working at once;
//! - `jwks` ([`keys`]): the signature is checked against the cluster's keys,
//!   offline, with no call to the API per attestation.
//!
//! Either way the claims are then checked alike ([`claims`]): issuer,
//! audience (never the API server's default), lifetime, `sub` against the
//! `kubernetes.io` claims, a bound pod; then the allowlist and a rate per
//! pod UID. Every refusal has a fixed reason.

pub mod api;
pub mod claims;
pub mod keys;
pub mod review;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use warden_config::kubernetes::{KubernetesConfig, Verify};
use warden_config::{SpiffeId, TrustDomain};

use api::Api;
use claims::{Expect, Subject};
use keys::{Keys, Source};

/// Pod UIDs whose attestation rate is remembered at most.
pub const MAX_RATED_PODS: usize = 16_384;
/// Attestations in flight at most (each may call the API server).
pub const MAX_IN_FLIGHT: usize = 32;
/// TokenReviews asked of the API server per second at most.
pub const MAX_REVIEWS_PER_SECOND: u32 = 50;

/// Why a token does not attest a pod. [`Refused::reason`] is the fixed
/// label of the metric, the log line and the problem type.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refused {
    /// This CA has no `kubernetes:` section.
    #[error("this CA does not attest Kubernetes pods (no `kubernetes:` in ca.yaml)")]
    Disabled,
    /// Not a JWT, or claims of the wrong shape.
    #[error("the ServiceAccount token is malformed: {0}")]
    Malformed(String),
    /// `alg` is `none`, HMAC, or another algorithm a cluster does not sign with.
    #[error("the token's algorithm {0:?} is not accepted (public-key signatures only)")]
    Algorithm(String),
    /// No key of the cluster has this `kid`.
    #[error("the token is signed with key {0:?}, which the cluster does not publish")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("the token's signature does not verify")]
    Signature,
    /// The API server did not authenticate it.
    #[error("the Kubernetes API rejected the token: {0}")]
    Rejected(String),
    /// `iss` is not the cluster's.
    #[error("the token's issuer {0:?} is not this cluster's")]
    Issuer(String),
    /// The audience is not warden's.
    #[error("the token is not for audience {0:?} (project it with `audience: {0}`)")]
    Audience(String),
    /// Past `exp`.
    #[error("the token has expired")]
    Expired,
    /// Before `nbf` or `iat`.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `exp - iat` above the cap.
    #[error(
        "the token lives {0} s, longer than the {1} s this CA accepts (lower expirationSeconds)"
    )]
    Lifetime(i64, i64),
    /// `sub` and the `kubernetes.io` claims disagree, or are missing.
    #[error("the token's subject is inconsistent: {0}")]
    Subject(String),
    /// Not bound to a pod (`kubectl create token` without a bound object).
    #[error("the token is not bound to a pod (use a projected volume, not `kubectl create token`)")]
    NoPod,
    /// The pod is gone.
    #[error("pod {0} no longer exists")]
    PodGone(String),
    /// The pod's UID or ServiceAccount is not the token's.
    #[error("{0}")]
    PodChanged(String),
    /// The identity is not in `allow`.
    #[error("{0} is not allowed by this CA's kubernetes.allow")]
    NotAllowed(SpiffeId),
    /// Too many attestations of one pod.
    #[error("pod {0} attests too often; retry in {1} s")]
    RateLimited(String, u64),
    /// A pod's certificate presented for renewal over mTLS.
    #[error(
        "a pod's certificate is renewed with its ServiceAccount token (k8s_token), not over mTLS"
    )]
    RenewWithToken,
    /// The API or the keys could not be reached: nothing is issued.
    #[error("cannot verify the token now: {0}")]
    Unavailable(String),
}

impl Refused {
    /// The fixed label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Disabled => "k8s_disabled",
            Self::Malformed(_) => "k8s_malformed",
            Self::Algorithm(_) => "k8s_algorithm",
            Self::UnknownKey(_) => "k8s_unknown_key",
            Self::Signature => "k8s_bad_signature",
            Self::Rejected(_) => "k8s_rejected",
            Self::Issuer(_) => "k8s_wrong_issuer",
            Self::Audience(_) => "k8s_wrong_audience",
            Self::Expired => "k8s_expired",
            Self::NotYetValid => "k8s_not_yet_valid",
            Self::Lifetime(..) => "k8s_lifetime",
            Self::Subject(_) => "k8s_subject",
            Self::NoPod => "k8s_no_pod",
            Self::PodGone(_) => "k8s_pod_gone",
            Self::PodChanged(_) => "k8s_pod_changed",
            Self::NotAllowed(_) => "k8s_not_allowed",
            Self::RateLimited(..) => "k8s_rate_limited",
            Self::Unavailable(_) => "k8s_unavailable",
            Self::RenewWithToken => "k8s_renew_with_token",
        }
    }

    /// What the client is told: the API server's own words and addresses
    /// stay in the CA's log.
    pub fn public(&self) -> String {
        match self {
            Self::Rejected(_) => {
                "the Kubernetes API did not authenticate the token (the CA's log says why)".into()
            }
            Self::Unavailable(_) => {
                "cannot verify the token now; retry (the CA's log says why)".into()
            }
            other => other.to_string(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotAllowed(_) | Self::Disabled => 403,
            Self::RateLimited(..) => 429,
            Self::Unavailable(_) => 503,
            _ => 401,
        }
    }
}

/// An attested pod.
#[derive(Debug, Clone)]
pub struct Pod {
    /// `spiffe://<td>/ns/<namespace>/sa/<service account>`.
    pub id: SpiffeId,
    /// Namespace, ServiceAccount, pod name and UID.
    pub subject: Subject,
}

enum Mode {
    Review(Api),
    Keys(Keys),
}

/// The attestor, shared by every request.
pub struct Attestor {
    cfg: KubernetesConfig,
    td: TrustDomain,
    mode: Mode,
    /// Per pod UID: the minute's start and attestations in it.
    rates: crate::ratelimit::PerMinute,
    /// The current second's start and TokenReviews in it.
    reviews: Mutex<(Instant, u32)>,
    in_flight: tokio::sync::Semaphore,
}

impl std::fmt::Debug for Attestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attestor")
            .field("verify", &self.cfg.verify)
            .finish_non_exhaustive()
    }
}

impl Attestor {
    /// Builds the attestor (reads the API's CA file; calls nothing yet).
    pub fn new(cfg: KubernetesConfig, td: TrustDomain) -> Result<Self, String> {
        let mode = match &cfg.verify {
            Verify::TokenReview => Mode::Review(Api::new(&cfg.api)?),
            Verify::Jwks { file: Some(f) } => Mode::Keys(Keys::new(Source::File(f.clone()))),
            Verify::Jwks { file: None } => Mode::Keys(Keys::new(Source::Discovery {
                api: Api::new(&cfg.api)?,
                issuer: cfg.issuer.clone().unwrap_or_default(),
            })),
        };
        Ok(Self {
            rates: crate::ratelimit::PerMinute::new(cfg.attestations_per_minute, MAX_RATED_PODS),
            cfg,
            td,
            mode,
            reviews: Mutex::new((Instant::now(), 0)),
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
        })
    }

    /// Verifies `token` at `now` (seconds since the epoch) and returns the
    /// pod it attests. `claimed` is set to the pod the token names as soon
    /// as verified data says which (for the audit trail of a refusal).
    pub async fn attest(
        &self,
        token: &str,
        now: i64,
        claimed: &mut Option<Pod>,
    ) -> Result<Pod, Refused> {
        let token = token.trim();
        let header = claims::header(token)?;
        let expect = Expect {
            issuer: self.cfg.issuer.as_deref(),
            audience: &self.cfg.audience,
            max_lifetime_s: i64::try_from(self.cfg.max_token_lifetime.as_secs())
                .unwrap_or(i64::MAX),
        };
        let _slot = match tokio::time::timeout(api::CALL_TIMEOUT, self.in_flight.acquire()).await {
            Ok(Ok(slot)) => slot,
            _ => {
                return Err(Refused::Unavailable(
                    "too many attestations in flight".into(),
                ));
            }
        };
        let subject = match &self.mode {
            Mode::Keys(keys) => {
                let kid = header
                    .kid
                    .as_deref()
                    .ok_or(Refused::UnknownKey(String::new()))?;
                let key = keys.key(kid).await?;
                let mut v = jsonwebtoken::Validation::new(header.alg);
                // Every claim is checked below, against `now`.
                v.validate_exp = false;
                v.validate_aud = false;
                v.required_spec_claims.clear();
                let data =
                    jsonwebtoken::decode::<claims::Claims>(token, &key, &v).map_err(|e| match e
                        .kind()
                    {
                        jsonwebtoken::errors::ErrorKind::InvalidSignature => Refused::Signature,
                        jsonwebtoken::errors::ErrorKind::InvalidAlgorithm
                        | jsonwebtoken::errors::ErrorKind::InvalidKeyFormat => {
                            Refused::Algorithm(format!("{:?} with this key", header.alg))
                        }
                        _ => Refused::Malformed(e.to_string()),
                    })?;
                claims::check(&data.claims, &expect, now)?
            }
            Mode::Review(api) => {
                // What the token says must already pass before the API
                // server is asked: junk costs no call.
                let stated = claims::check(&claims::unverified(token)?, &expect, now)?;
                let stated_id = self.id_of(&stated)?;
                if !self.cfg.allow.iter().any(|p| p.matches(&stated_id)) {
                    return Err(Refused::NotAllowed(stated_id));
                }
                self.review_budget()?;
                let reviewed = review::review(api, token, &self.cfg.audience).await?;
                // The API server vouched for the token: its claims are the
                // cluster's, and must agree with the review.
                if (
                    stated.namespace.as_str(),
                    stated.service_account.as_str(),
                    stated.pod_uid.as_str(),
                ) != (
                    reviewed.namespace.as_str(),
                    reviewed.service_account.as_str(),
                    reviewed.pod_uid.as_str(),
                ) {
                    return Err(Refused::Subject(
                        "the TokenReview and the token's claims name different pods".into(),
                    ));
                }
                reviewed
            }
        };
        let id = self.id_of(&subject)?;
        // Counted before anything else is done for a verified pod, so that
        // no pod can make the CA work (or write its trail) without bound.
        self.rate(&subject)?;
        *claimed = Some(Pod {
            id: id.clone(),
            subject: subject.clone(),
        });
        if !self.cfg.allow.iter().any(|p| p.matches(&id)) {
            return Err(Refused::NotAllowed(id));
        }
        if let Mode::Review(api) = &self.mode {
            review::pod_is_live(api, &subject).await?;
        }
        Ok(Pod { id, subject })
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service account>`.
    fn id_of(&self, s: &Subject) -> Result<SpiffeId, Refused> {
        SpiffeId::new(
            &self.td,
            &format!("/ns/{}/sa/{}", s.namespace, s.service_account),
        )
        .map_err(|e| Refused::Subject(format!("not a SPIFFE ID path: {e}")))
    }

    /// TokenReviews the CA may still ask for this second (a token that
    /// looks right but is not costs the API server a call; at most
    /// [`MAX_REVIEWS_PER_SECOND`] of them).
    fn review_budget(&self) -> Result<(), Refused> {
        let Ok(mut w) = self.reviews.lock() else {
            return Err(Refused::Unavailable("review state poisoned".into()));
        };
        if w.0.elapsed() >= Duration::from_secs(1) {
            *w = (Instant::now(), 0);
        }
        if w.1 >= MAX_REVIEWS_PER_SECOND {
            return Err(Refused::Unavailable(
                "too many TokenReviews this second".into(),
            ));
        }
        w.1 += 1;
        Ok(())
    }

    /// Counts one attestation of the pod; refuses past the rate.
    fn rate(&self, s: &Subject) -> Result<(), Refused> {
        self.rates
            .check(&s.pod_uid)
            .map_err(|wait| Refused::RateLimited(format!("{}/{}", s.namespace, s.pod), wait))
    }
}
