//! The last step of the escalation ladder: ask the CA that issued this
//! proxy's identity to deny a caller, so its certificate is not renewed and
//! it drops off the mesh when the current one expires. The call is made in
//! the background with the proxy's own SVID; the CA accepts it only from
//! identities listed in its `deny_reporters`.

use warden_config::SpiffeId;

use crate::identity::IdentityRx;

/// Sends deny reports to the CA of the proxy's identity.
#[derive(Clone)]
pub struct Reporter {
    identity: IdentityRx,
}

impl Reporter {
    /// A reporter using whatever identity the proxy holds when it reports.
    pub fn new(identity: IdentityRx) -> Self {
        Self { identity }
    }

    /// Reports `target` in the background; `done(ok)` is called with the outcome.
    pub fn report(
        &self,
        target: SpiffeId,
        reason: String,
        done: impl FnOnce(bool) + Send + 'static,
    ) {
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
