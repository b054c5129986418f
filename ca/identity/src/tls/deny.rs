//! The identities the CA has denied, as it last pushed them (`GET
//! /v1/watch`). Verifiers refuse a denied peer's handshake with rustls's
//! `Revoked` (the peer sees a `certificate_revoked` alert), and open
//! connections wait on [`DenyList::until_denied`] to close themselves.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::watch;

use warden_config::SpiffeId;

/// A set of denied SPIFFE IDs.
pub type DeniedSet = Arc<HashSet<SpiffeId>>;

/// A read handle on the latest deny list; cheap to clone, one per verifier
/// and per open connection.
#[derive(Clone, Debug)]
pub struct DenyList(watch::Receiver<DeniedSet>);

impl DenyList {
    /// A list that is empty and never changes (identities from files, the
    /// CA's own server: nobody pushes them a list).
    pub fn none() -> Self {
        Self(watch::channel(DeniedSet::default()).1)
    }

    /// A list that follows whatever is sent on the returned sender.
    pub fn channel(initial: DeniedSet) -> (watch::Sender<DeniedSet>, Self) {
        let (tx, rx) = watch::channel(initial);
        (tx, Self(rx))
    }

    /// Whether anyone can still change this list (false for [`DenyList::none`]).
    pub fn can_change(&self) -> bool {
        self.0.has_changed().is_ok()
    }

    /// Whether `id` is denied now.
    pub fn contains(&self, id: &SpiffeId) -> bool {
        self.0.borrow().contains(id)
    }

    /// How many identities are denied now.
    pub fn len(&self) -> usize {
        self.0.borrow().len()
    }

    /// Whether no identity is denied now.
    pub fn is_empty(&self) -> bool {
        self.0.borrow().is_empty()
    }

    /// Resolves once `id` is denied; never, if the list can no longer change.
    pub async fn until_denied(mut self, id: SpiffeId) {
        loop {
            if self.0.borrow_and_update().contains(&id) {
                return;
            }
            if self.0.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;

    #[tokio::test]
    async fn until_denied_resolves_when_the_id_is_added_and_not_before() {
        let id = SpiffeId::parse("spiffe://example.org/web").unwrap();
        let other = SpiffeId::parse("spiffe://example.org/db").unwrap();
        let (tx, list) = DenyList::channel(DeniedSet::default());
        let mut wait = Box::pin(list.clone().until_denied(id.clone()));
        tx.send(Arc::new([other.clone()].into())).unwrap();
        assert!(
            futures_poll(&mut wait).is_pending(),
            "another identity's denial must not close this connection"
        );
        tx.send(Arc::new([other, id.clone()].into())).unwrap();
        wait.await;
        assert!(list.contains(&id));
        assert_eq!(list.len(), 2);
    }

    #[tokio::test]
    async fn a_list_nobody_sends_on_never_denies() {
        let id = SpiffeId::parse("spiffe://example.org/web").unwrap();
        let mut wait = Box::pin(DenyList::none().until_denied(id));
        tokio::task::yield_now().await;
        assert!(futures_poll(&mut wait).is_pending());
    }

    fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> std::task::Poll<F::Output> {
        let waker = std::task::Waker::noop();
        std::pin::Pin::new(f).poll(&mut std::task::Context::from_waker(waker))
    }
}
