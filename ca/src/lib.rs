//! warden's certificate authority: keys and certificate shapes, SVID issuance
//! from CSRs after attestation (join tokens, Kubernetes ServiceAccount
//! tokens, or a current SVID for renewal),
//! the store and the hash-chained audit trail, the HTTPS API server, and the
//! client the proxy uses to obtain and renew its identity.

#![forbid(unsafe_code)]

pub mod audit;
pub mod authority;
pub mod backup;
pub mod bundle;
pub mod csr;
pub mod kubernetes;
pub mod metrics;
pub mod profile;
pub mod ratelimit;
pub mod rotation;
pub mod sealed;
pub mod server;
pub mod service;
pub mod store;
pub mod token;
pub mod trust;

// The pieces the proxy shares live in `warden-identity`; re-exported so the
// CA's own paths read as before.
pub use warden_identity::{admin, api, client, files_out, http, lifetime, pem, ratelog, tls};

pub use authority::{Authority, CaError, InitOptions, Svid};
pub use service::{CaService, Caller, CertifyRequest, Issued, Refusal};
