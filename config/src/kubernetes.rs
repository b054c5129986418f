//! The `kubernetes:` section of `ca.yaml`: how the CA attests a pod by its
//! projected ServiceAccount token, and which pods it will attest at all.
//!
//! ```yaml
//! kubernetes:
//!   allow: [spiffe://example.org/ns/shop/*]   # default: nobody
//!   verify: tokenreview                       # or jwks
//!   # audience: warden
//!   # issuer: https://kubernetes.default.svc.cluster.local
//!   # max_token_lifetime: 24h
//!   # attestations_per_minute: 6
//!   # reviews_per_source: 10                  # TokenReviews a second one address may cause
//!   # api: {url: https://10.0.0.1:443, ca_file: k8s-ca.pem, token_file: reviewer.token}
//!   # jwks_file: jwks.json                    # jwks without calling the API
//!   # dns_names:                              # names a pod of that identity may have
//!   #   - {spiffe_id: spiffe://example.org/ns/warden/sa/warden-webhook,
//!   #      names: [warden-webhook.warden.svc]}
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::diagnostic::Collector;
use crate::duration::HumanDuration;
use crate::pattern::IdentityPattern;
use crate::spiffe::{SpiffeId, TrustDomain};

/// The audience warden's tokens carry unless configured otherwise.
pub const DEFAULT_AUDIENCE: &str = "warden";
/// Longest token lifetime (`exp - iat`) accepted by default: a projected
/// token asks for 1 h by default, and the kubelet refreshes it at 80%.
pub const DEFAULT_MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Attestations per pod UID and minute, by default.
pub const DEFAULT_ATTESTATIONS_PER_MINUTE: u32 = 6;
/// TokenReviews one source address may cause per second, by default:
/// a fifth of the CA's 50 a second, so no one address can spend the budget
/// every pod shares, and still a node's 110 pods behind one SNAT address
/// attest again within about 11 s.
pub const DEFAULT_REVIEWS_PER_SOURCE: u32 = 10;
/// Where a pod finds its own ServiceAccount credentials (in-cluster config).
pub const IN_CLUSTER_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// How a token's signature and liveness are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// The API server reviews the token (`TokenReview`), then the pod it
    /// names is fetched and its UID compared: notices deleted pods.
    TokenReview,
    /// The token's signature is checked against the cluster's keys: from
    /// `jwks_file`, or from the OIDC discovery document of the API.
    Jwks {
        /// A JWKS file; `None`: fetched through the discovery document.
        file: Option<PathBuf>,
    },
}

/// How to reach the Kubernetes API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiAccess {
    /// `https://host:port`; in-cluster: from `KUBERNETES_SERVICE_HOST` and
    /// `_PORT` at start.
    pub url: Option<String>,
    /// CA certificate(s) the API's serving certificate verifies against.
    pub ca_file: PathBuf,
    /// Bearer token the CA authenticates with (re-read on every call: the
    /// kubelet rotates it).
    pub token_file: PathBuf,
}

/// The Kubernetes attestor's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// The audience a token must be for (never the API server's default).
    pub audience: String,
    /// The issuer (`iss`) tokens must name; required with `jwks`.
    pub issuer: Option<String>,
    /// Longest `exp - iat` accepted.
    pub max_token_lifetime: Duration,
    /// Which identities may be attested (default: none).
    pub allow: Vec<IdentityPattern>,
    /// Attestations per pod UID and minute.
    pub attestations_per_minute: u32,
    /// TokenReviews per source address and second: attempts whose token
    /// nobody has verified yet, counted before the API server is asked.
    pub reviews_per_source: u32,
    /// How tokens are verified.
    pub verify: Verify,
    /// The API (TokenReview, pods, discovery).
    pub api: ApiAccess,
    /// DNS names a pod attested as an identity may put in its CSR beside
    /// its SPIFFE ID (a service that TLS clients such as the API server
    /// verify by name: the admission webhook). Nobody else gets any.
    pub dns_names: Vec<DnsGrant>,
}

/// The DNS names one identity may have in its certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsGrant {
    /// The pod identity.
    pub spiffe_id: SpiffeId,
    /// The names.
    pub names: Vec<String>,
}

impl KubernetesConfig {
    /// The DNS names `id` may have (none unless granted).
    pub fn dns_names_of(&self, id: &SpiffeId) -> &[String] {
        self.dns_names
            .iter()
            .find(|g| g.spiffe_id == *id)
            .map_or(&[], |g| g.names.as_slice())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKubernetes {
    audience: Option<Spanned<String>>,
    issuer: Option<Spanned<String>>,
    max_token_lifetime: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    allow: Vec<Spanned<IdentityPattern>>,
    attestations_per_minute: Option<Spanned<u32>>,
    reviews_per_source: Option<Spanned<u32>>,
    verify: Option<Spanned<String>>,
    api: Option<Spanned<RawApi>>,
    jwks_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    dns_names: Vec<RawDnsGrant>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDnsGrant {
    spiffe_id: Spanned<SpiffeId>,
    names: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    url: Option<String>,
    ca_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
}

impl RawKubernetes {
    /// Validates the section; `base` is the config file's directory.
    pub(crate) fn validate(
        self,
        td: &TrustDomain,
        base: &Path,
        errors: &mut Collector<'_>,
    ) -> KubernetesConfig {
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let audience = match self.audience {
            Some(a) if a.value.trim().is_empty() => {
                errors.at(&a, "audience must not be empty");
                DEFAULT_AUDIENCE.to_owned()
            }
            Some(a) => a.value,
            None => DEFAULT_AUDIENCE.to_owned(),
        };
        let jwks_file = self.jwks_file.as_ref().map(|f| resolve(&f.value));
        let verify = match self.verify.as_ref().map(|v| v.value.as_str()) {
            None | Some("tokenreview") => {
                if let Some(f) = &self.jwks_file {
                    errors.at(f, "jwks_file is for verify: jwks");
                }
                Verify::TokenReview
            }
            Some("jwks") => Verify::Jwks { file: jwks_file },
            Some(other) => {
                if let Some(v) = &self.verify {
                    errors.at(v, format!("verify is tokenreview or jwks, not {other:?}"));
                }
                Verify::TokenReview
            }
        };
        if matches!(verify, Verify::Jwks { .. })
            && self.issuer.is_none()
            && let Some(v) = &self.verify
        {
            errors.at(
                v,
                "verify: jwks needs `issuer` (the tokens' iss, as the API server's --service-account-issuer)",
            );
        }
        if let Some(i) = &self.issuer
            && i.value.trim().is_empty()
        {
            errors.at(i, "issuer must not be empty");
        }
        let max_token_lifetime = match &self.max_token_lifetime {
            Some(d)
                if d.value.0 < Duration::from_secs(600)
                    || d.value.0 > Duration::from_secs(7 * 24 * 3600) =>
            {
                errors.at(
                    d,
                    "max_token_lifetime must be between 10m (the kubelet's shortest) and 7d",
                );
                DEFAULT_MAX_TOKEN_LIFETIME
            }
            Some(d) => d.value.0,
            None => DEFAULT_MAX_TOKEN_LIFETIME,
        };
        let attestations_per_minute = match &self.attestations_per_minute {
            Some(n) if n.value == 0 || n.value > 600 => {
                errors.at(n, "attestations_per_minute must be between 1 and 600");
                DEFAULT_ATTESTATIONS_PER_MINUTE
            }
            Some(n) => n.value,
            None => DEFAULT_ATTESTATIONS_PER_MINUTE,
        };
        let reviews_per_source = match &self.reviews_per_source {
            Some(n) if n.value == 0 || n.value > 50 => {
                errors.at(
                    n,
                    "reviews_per_source must be between 1 and 50 (the TokenReviews the CA asks a second in all)",
                );
                DEFAULT_REVIEWS_PER_SOURCE
            }
            Some(n) => n.value,
            None => DEFAULT_REVIEWS_PER_SOURCE,
        };
        for p in &self.allow {
            if !p.value.is_in(td) {
                errors.at(
                    p,
                    format!(
                        "allow pattern {} is not in this CA's trust domain {td}",
                        p.value
                    ),
                );
            } else if let IdentityPattern::Prefix { prefix, .. } = &p.value
                && !prefix.starts_with("/ns/")
            {
                errors.at(
                    p,
                    format!("allow pattern {} can never match a pod: pods are spiffe://{td}/ns/<namespace>/sa/<service account>", p.value),
                );
            } else if let IdentityPattern::Exact(id) = &p.value
                && !is_pod_path(id.path())
            {
                errors.at(
                    p,
                    format!("allow pattern {} is not a pod identity (spiffe://{td}/ns/<namespace>/sa/<service account>)", p.value),
                );
            }
        }
        let mut dns_names: Vec<DnsGrant> = Vec::new();
        for g in self.dns_names {
            let id = &g.spiffe_id;
            if !id.value.is_in(td) || !is_pod_path(id.value.path()) {
                errors.at(
                    id,
                    format!("{} is not a pod identity of this CA (spiffe://{td}/ns/<namespace>/sa/<service account>)", id.value),
                );
            } else if dns_names.iter().any(|d| d.spiffe_id == id.value) {
                errors.at(id, format!("{} is granted names twice", id.value));
            }
            if g.names.is_empty() {
                errors.at(id, "names must list at least one DNS name");
            }
            for n in &g.names {
                if !crate::dns::valid_dns_name(&n.value) {
                    errors.at(
                        n,
                        format!("{:?} is not a DNS name a certificate may carry (lowercase labels, no wildcard)", n.value),
                    );
                }
            }
            dns_names.push(DnsGrant {
                spiffe_id: g.spiffe_id.value,
                names: g.names.into_iter().map(|n| n.value).collect(),
            });
        }
        let in_cluster = Path::new(IN_CLUSTER_DIR);
        let api = match self.api.map(|a| a.value) {
            Some(a) => ApiAccess {
                url: a.url,
                ca_file: a
                    .ca_file
                    .map_or_else(|| in_cluster.join("ca.crt"), |p| resolve(&p)),
                token_file: a
                    .token_file
                    .map_or_else(|| in_cluster.join("token"), |p| resolve(&p)),
            },
            None => ApiAccess {
                url: None,
                ca_file: in_cluster.join("ca.crt"),
                token_file: in_cluster.join("token"),
            },
        };
        KubernetesConfig {
            audience,
            issuer: self
                .issuer
                .map(|i| i.value.trim_end_matches('/').to_owned()),
            max_token_lifetime,
            allow: self.allow.into_iter().map(|p| p.value).collect(),
            attestations_per_minute,
            reviews_per_source,
            verify,
            api,
            dns_names,
        }
    }
}

/// `/ns/<namespace>/sa/<service account>`.
fn is_pod_path(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    matches!(parts.as_slice(), ["", "ns", ns, "sa", sa] if !ns.is_empty() && !sa.is_empty())
}
