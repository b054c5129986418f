//! The CA's HTTPS API as data: the JSON bodies of `/v1/certify` and
//! `/v1/deny`, and the CA server's own SPIFFE ID, shared by the server (in
//! the CA crate) and its client (here).

use serde::{Deserialize, Serialize};

use warden_config::{SpiffeId, TrustDomain};

/// The JSON a client posts to `/v1/certify`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertifyBody {
    /// PEM certificate signing request.
    pub csr: String,
    /// One-time join token (bootstrap only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A Kubernetes projected ServiceAccount token for warden's audience
    /// (a pod's bootstrap: no join token, no client certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_token: Option<String>,
    /// Requested lifetime such as `1h`; the CA caps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// The JSON `/v1/certify` answers on success.
#[derive(Debug, Serialize, Deserialize)]
pub struct CertifyAnswer {
    /// The identity in the certificate.
    pub spiffe_id: String,
    /// Leaf then intermediate, PEM.
    pub certificate_chain: String,
    /// Trust roots, PEM.
    pub trust_bundle: String,
    /// Serial number, hex.
    pub serial: String,
    /// NotBefore, RFC 3339.
    pub not_before: String,
    /// NotAfter, RFC 3339.
    pub not_after: String,
}

/// The JSON a deny reporter posts to `/v1/deny`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyBody {
    /// The identity to deny.
    pub spiffe_id: String,
    /// Why, in 1-200 printable ASCII characters; goes into the audit trail.
    pub reason: String,
}

/// The JSON `/v1/deny` answers on success.
#[derive(Debug, Serialize, Deserialize)]
pub struct DenyAnswer {
    /// The identity that is now denied.
    pub spiffe_id: String,
    /// Always true on success.
    pub denied: bool,
    /// True when it was denied before this request.
    pub already_denied: bool,
}

/// Path of the trust feed: `GET /v1/watch?after=N` over mTLS answers the
/// current [`TrustAnswer`] at once when its sequence is not `N`, else waits
/// up to [`WATCH_HOLD`] for a change and answers 204 (nothing new) if none came.
pub const WATCH_PATH: &str = "/v1/watch";
/// Longest the CA holds a watch request open before answering 204.
pub const WATCH_HOLD: std::time::Duration = std::time::Duration::from_secs(25);
/// Header of a 204 watch answer: the sequence that is still current.
pub const TRUST_SEQUENCE_HEADER: &str = "warden-trust-sequence";

/// What the CA pushes to every proxy: whom to trust and whom not to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustAnswer {
    /// Grows with every change of the bundle or the deny list (shared by
    /// every CA replica: it lives in the store).
    pub sequence: u64,
    /// Trust roots, PEM (several while a root rotates).
    pub trust_bundle: String,
    /// SPIFFE IDs whose handshakes every proxy must refuse, sorted.
    pub denied: Vec<String>,
}

/// The CA server's SPIFFE ID in trust domain `td`.
pub fn server_id(td: &TrustDomain) -> SpiffeId {
    // A valid trust domain plus a constant valid path always parses.
    SpiffeId::new(td, warden_config::ca::SERVER_ID_PATH)
        .unwrap_or_else(|_| unreachable!("constant path is valid"))
}
