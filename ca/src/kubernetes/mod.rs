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
//!
//! What may cost the API server a call is bounded before it is made: a
//! token's own claims and `allow` must pass first, then one source address
//! may cause at most `reviews_per_source` TokenReviews a second (of the
//! [`MAX_REVIEWS_PER_SECOND`] every pod shares), so that one address
//! sending forged tokens cannot spend the whole budget. It is a share, not
//! isolation: a few sources together (five at the default 10 a second)
//! can spend it, and the others' attestations then wait (503, retried).

pub mod api;
pub mod claims;
pub mod keys;
pub mod review;

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use warden_config::kubernetes::{KubernetesConfig, Verify};
use warden_config::{SpiffeId, TrustDomain};

use api::Api;
use claims::{Expect, Subject};
use keys::{Keys, Source};

/// Pod UIDs whose attestation rate is remembered at most.
pub const MAX_RATED_PODS: usize = 16_384;
/// Source addresses whose TokenReviews are counted at most (a second each).
pub const MAX_RATED_SOURCES: usize = 16_384;
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
    #[error("{0} attests too often; retry in {1} s")]
    RateLimited(String, u64),
    /// Too many tokens from one source address waiting on a TokenReview.
    #[error(
        "too many attestations from this address this second (each costs the Kubernetes API a TokenReview); retry in {0} s"
    )]
    SourceRateLimited(u64),
    /// The CSR asks for another ID than the one the token attests.
    #[error("the CSR asks for {asked}, but this pod's ServiceAccount token attests only {allowed}")]
    CsrMismatch {
        /// What the CSR asked for.
        asked: String,
        /// The pod's ID.
        allowed: SpiffeId,
    },
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
            Self::SourceRateLimited(_) => "k8s_source_rate_limited",
            Self::CsrMismatch { .. } => "k8s_csr_mismatch",
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
            Self::NotAllowed(_) | Self::Disabled | Self::CsrMismatch { .. } => 403,
            Self::RateLimited(..) | Self::SourceRateLimited(_) => 429,
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
    /// Per source address: TokenReviews this second.
    sources: crate::ratelimit::PerMinute,
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
            sources: crate::ratelimit::PerMinute::per_window(
                cfg.reviews_per_source,
                Duration::from_secs(1),
                MAX_RATED_SOURCES,
            ),
            cfg,
            td,
            mode,
            reviews: Mutex::new((Instant::now(), 0)),
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
        })
    }

    /// The DNS names a pod attested as `id` may have in its certificate
    /// (`dns_names:` in `ca.yaml`; none by default).
    pub fn dns_names_of(&self, id: &SpiffeId) -> &[String] {
        self.cfg.dns_names_of(id)
    }

    /// Verifies `token`, sent from `source`, at `now` (seconds since the
    /// epoch) and returns the pod it attests. `claimed` is set to the pod
    /// the token names as soon as verified data says which (for the audit
    /// trail of a refusal).
    pub async fn attest(
        &self,
        token: &str,
        source: IpAddr,
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
        // What the token says must already pass before the API server is
        // asked (junk costs no call), and one address gets only its share
        // of the TokenReviews every pod's attestation needs.
        let stated = match &self.mode {
            Mode::Review(_) => {
                let stated = claims::check(&claims::unverified(token)?, &expect, now)?;
                let stated_id = self.id_of(&stated)?;
                if !self.cfg.allow.iter().any(|p| p.matches(&stated_id)) {
                    return Err(Refused::NotAllowed(stated_id));
                }
                self.sources
                    .check(&source_key(source))
                    .map_err(Refused::SourceRateLimited)?;
                Some(stated)
            }
            Mode::Keys(_) => None,
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
                match claims::check(&data.claims, &expect, now) {
                    Ok(subject) => subject,
                    Err(refused) => {
                        // The cluster signed these claims, so they say who
                        // is refused (for the trail). Counted apart from
                        // the pod's attestations, so that a leaked expired
                        // token cannot use up its pod's rate, but counted:
                        // a replayed token must not fill the trail.
                        if let Some(pod) = self.signed_pod(&data.claims) {
                            self.rates
                                .check(&format!("refused {}", rate_key(&pod.subject)))
                                .map_err(|wait| {
                                    Refused::RateLimited(rate_label(&pod.subject), wait)
                                })?;
                            *claimed = Some(pod);
                        }
                        return Err(refused);
                    }
                }
            }
            Mode::Review(api) => {
                self.review_budget()?;
                review::review(api, token, &self.cfg.audience).await?
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
        // The API server vouched for the token: its claims are the
        // cluster's, and must agree with the review.
        if let Some(stated) = &stated
            && (
                stated.namespace.as_str(),
                stated.service_account.as_str(),
                stated.pod_uid.as_str(),
            ) != (
                subject.namespace.as_str(),
                subject.service_account.as_str(),
                subject.pod_uid.as_str(),
            )
        {
            return Err(Refused::Subject(
                "the TokenReview and the token's claims name different pods".into(),
            ));
        }
        if !self.cfg.allow.iter().any(|p| p.matches(&id)) {
            return Err(Refused::NotAllowed(id));
        }
        if let Mode::Review(api) = &self.mode {
            review::pod_is_live(api, &subject).await?;
        }
        Ok(Pod { id, subject })
    }

    /// The pod that claims whose signature verified name, as far as they
    /// name one in Kubernetes' own terms (a namespace and ServiceAccount
    /// at least; the pod's name and UID when the token carries them).
    fn signed_pod(&self, c: &claims::Claims) -> Option<Pod> {
        let k = c.kubernetes.as_ref()?;
        let sa = k.serviceaccount.as_ref()?;
        let (pod, pod_uid) = k
            .pod
            .as_ref()
            .and_then(|p| Subject::new(&k.namespace, &sa.name, &p.name, &p.uid).ok())
            .map(|s| (s.pod, s.pod_uid))
            .unwrap_or_default();
        // The names must be Kubernetes names either way (no name adds a
        // segment to the ID): checked with a stand-in pod.
        let mut subject = Subject::new(&k.namespace, &sa.name, "unnamed", "none").ok()?;
        subject.pod = pod;
        subject.pod_uid = pod_uid;
        let id = self.id_of(&subject).ok()?;
        Some(Pod { id, subject })
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
            .check(&rate_key(s))
            .map_err(|wait| Refused::RateLimited(rate_label(s), wait))
    }
}

/// What a subject's rate is counted under: its pod's UID, or (a token
/// bound to no pod) its ServiceAccount; a UID holds no `/`.
fn rate_key(s: &Subject) -> String {
    if s.pod_uid.is_empty() {
        format!("{}/{}", s.namespace, s.service_account)
    } else {
        s.pod_uid.clone()
    }
}

/// How a rate refusal names who is limited.
fn rate_label(s: &Subject) -> String {
    if s.pod.is_empty() {
        format!("ServiceAccount {}/{}", s.namespace, s.service_account)
    } else {
        format!("pod {}/{}", s.namespace, s.pod)
    }
}

/// What the TokenReviews of `source` are counted under: the whole address,
/// IPv6 included. Not its /64: the pods of a node usually share one
/// (`--node-cidr-mask-size-ipv6=64`), so one pod's flood would limit its
/// neighbours; and pods do not choose their addresses.
fn source_key(source: IpAddr) -> String {
    source.to_canonical().to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sources_are_counted_by_their_whole_address_ipv6_included() {
        let key = |s: &str| source_key(s.parse().unwrap());
        assert_eq!(key("10.244.1.7"), "10.244.1.7");
        assert_eq!(key("::ffff:10.244.1.7"), "10.244.1.7");
        assert_eq!(key("2001:db8:1:2:aa::1"), "2001:db8:1:2:aa::1");
        assert_eq!(key("2001:0db8:1:2:aa:0:0:1"), key("2001:db8:1:2:aa::1"));
        // Two pods of one node's /64 are two sources.
        assert_ne!(key("2001:db8:1:2:bb::9"), key("2001:db8:1:2:aa::1"));
    }

    #[test]
    fn a_flooding_ipv6_pod_leaves_its_node_neighbours_alone() {
        let limiter =
            crate::ratelimit::PerMinute::per_window(10, Duration::from_secs(1), MAX_RATED_SOURCES);
        let flooder = source_key("2001:db8:1:2::a".parse().unwrap());
        let neighbour = source_key("2001:db8:1:2::b".parse().unwrap());
        let refused = (0..100)
            .filter(|_| limiter.check(&flooder).is_err())
            .count();
        assert!(refused >= 90, "{refused}");
        assert!(limiter.check(&neighbour).is_ok());
    }

    #[test]
    fn refusals_of_the_csr_and_of_a_source_are_fixed_and_final() {
        let id = SpiffeId::parse("spiffe://td/ns/shop/sa/cart").unwrap();
        let r = Refused::CsrMismatch {
            asked: "spiffe://td/ns/shop/sa/admin".into(),
            allowed: id,
        };
        assert_eq!((r.status(), r.reason()), (403, "k8s_csr_mismatch"));
        let r = Refused::SourceRateLimited(1);
        assert_eq!((r.status(), r.reason()), (429, "k8s_source_rate_limited"));
    }
}
