//! warden's configuration: file schemas, validation that names file, line and
//! column, and the identity types everything else is keyed on (`SpiffeId`,
//! `TrustDomain`, `IdentityPattern`), and the request-path normal form that
//! rules are written in and requests are matched in. No network, no I/O
//! beyond reading files.

#![forbid(unsafe_code)]

pub mod ca;
pub mod diagnostic;
pub mod dns;
pub mod duration;
pub mod kubernetes;
mod lint;
pub mod model;
pub mod normalize;
pub mod pattern;
pub mod policy;
pub mod proxy;
mod ratelimit;
pub mod reference;
pub mod spiffe;

pub use ca::CaConfig;
pub use diagnostic::{Diagnostic, Diagnostics, Warnings};
pub use duration::HumanDuration;
pub use pattern::IdentityPattern;
pub use proxy::ProxyConfig;
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
