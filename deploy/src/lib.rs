//! warden on Kubernetes. One mutation ([`inject`]) serves `warden inject`
//! and the admission webhook alike, so that the CLI and the webhook can
//! never give a pod two different sidecars; [`sidecar`] is what it adds,
//! [`webhook`] the webhook's answer, [`server`] its HTTPS server,
//! [`serving`] its certificate and
//! [`limits`] what one caller of it can hold;
//! [`install`] the control plane's manifests, [`root_secret`] a root brought
//! in a cert-manager Secret.

#![forbid(unsafe_code)]

pub mod inject;
pub mod install;
pub mod limits;
pub mod root_secret;
pub mod server;
pub mod serving;
pub mod sidecar;
pub mod webhook;
