//! warden's certificate authority: keys and certificate shapes, SVID issuance
//! from CSRs after attestation (join tokens, or a current SVID for renewal),
//! the store and the hash-chained audit trail, the HTTPS API server, and the
//! client the proxy uses to obtain and renew its identity.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod authority;
pub mod bundle;
pub mod client;
pub mod csr;
pub mod files_out;
pub mod http;
pub mod lifetime;
pub mod metrics;
pub mod profile;
pub mod ratelog;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
pub mod token;

pub use authority::{Authority, CaError, InitOptions, Svid};
pub use service::{CaService, Caller, CertifyRequest, Issued, Refusal};
