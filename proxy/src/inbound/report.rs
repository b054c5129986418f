//! How the proxy sends the model guard's deny reports: to the CA that
//! issued this proxy's identity, in the background, with the proxy's own
//! SVID; the CA accepts them only from identities listed in its
//! `deny_reporters`.

use warden_config::SpiffeId;

use crate::identity::IdentityRx;
use warden_guard::report::Report;

/// Sends deny reports to the CA of the proxy's identity.
#[derive(Clone)]
pub struct CaReporter {
    identity: IdentityRx,
}

impl CaReporter {
    /// A reporter using whatever identity the proxy holds when it reports.
    pub fn new(identity: IdentityRx) -> Self {
        Self { identity }
    }
}

impl Report for CaReporter {
    fn report(&self, target: SpiffeId, reason: String, done: Box<dyn FnOnce(bool) + Send>) {
        let link = self.identity.borrow().as_ref().and_then(|id| id.ca.clone());
        let Some(link) = link else {
            tracing::warn!(peer = %target, "cannot report to the CA: this proxy's identity does not come from a CA");
            done(false);
            return;
        };
        tokio::spawn(async move {
            match link.client.report_deny(&link.creds, &target, &reason).await {
                Ok(()) => {
                    tracing::warn!(peer = %target, reason, "the CA denied this identity on our report");
                    done(true);
                }
                Err(e) => {
                    tracing::error!(peer = %target, error = %e, "the CA did not take our deny report");
                    done(false);
                }
            }
        });
    }
}
