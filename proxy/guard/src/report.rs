//! The last step of the escalation ladder: a caller that reaches deny is
//! reported, so the CA stops renewing its certificate and it drops off the
//! mesh when the current one expires. The guard only decides; whoever
//! embeds it says how a report is sent ([`Report`]).

use std::sync::Arc;

use warden_config::SpiffeId;

/// Sends deny reports (for the proxy: to the CA of its own identity).
pub trait Report: Send + Sync {
    /// Reports `target` for `reason` in the background; `done(ok)` is
    /// called with the outcome (it counts the report in a metric).
    fn report(&self, target: SpiffeId, reason: String, done: Box<dyn FnOnce(bool) + Send>);
}

/// A shared reporter, as the routes hold it.
pub type Reporter = Arc<dyn Report>;
