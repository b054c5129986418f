//! The workload identity that both sides of warden share: the SPIFFE
//! verifiers and the [`tls::VerifiedPeer`] only they can make, the
//! hot-swappable certificate resolver, the CA client and its API types, PEM
//! and lifetime helpers; and the small HTTP pieces both servers use (problem
//! answers, the admin server, rate-limited logging).
//!
//! It exists so that the proxy links none of the CA's store and signing code
//! (`cargo tree -p warden-proxy` shows no rusqlite), and the CA none of the
//! proxy.

#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod client;
pub mod http;
pub mod lifetime;
pub mod pem;
pub mod ratelog;
pub mod tls;
