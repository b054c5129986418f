//! The workload identity that both sides of warden share: the SPIFFE
//! verifiers and the [`tls::VerifiedPeer`] only they can make, the
//! hot-swappable certificate resolver, the CA client and its API types, PEM
//! and lifetime helpers, credential files; and the small HTTP pieces both servers use (problem
//! answers, the admin server, listeners, rate-limited logging).
//!
//! It exists so that the proxy links none of the CA's store and signing code
//! (`cargo tree -p warden-proxy` shows no rusqlite), and the CA none of the
//! proxy. Without its default `full` feature it is only [`ratelog`], which
//! is all the model guard takes.

#![forbid(unsafe_code)]

#[cfg(feature = "full")]
pub mod admin;
#[cfg(feature = "full")]
pub mod api;
#[cfg(feature = "full")]
pub mod client;
#[cfg(feature = "full")]
pub mod files_out;
#[cfg(feature = "full")]
pub mod http;
#[cfg(feature = "full")]
pub mod lifetime;
#[cfg(feature = "full")]
pub mod listen;
#[cfg(feature = "full")]
pub mod pem;
pub mod ratelog;
#[cfg(feature = "full")]
pub mod tls;
