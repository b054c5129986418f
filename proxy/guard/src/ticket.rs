//! An admitted request's claim on its limits, settled exactly once: when
//! its answer has been counted, or, if it is dropped first (the caller went
//! away, the app failed), at the full reservation. Nothing is ever refunded
//! that was not seen to be unused.

use std::sync::Arc;

use super::limits::{Ask, Hold, Plan, Store};
use super::metrics::RouteMetrics;
use super::record::Recorder;
use warden_config::SpiffeId;

/// What a ticket needs from its route.
pub struct Settler {
    /// The route's limits.
    pub plan: Plan,
    /// Where their state lives.
    pub store: Arc<Store>,
    /// The route's metrics.
    pub metrics: RouteMetrics,
    /// Where settled usage is recorded for sizing limits (`record:`).
    pub recorder: Option<Arc<Recorder>>,
}

/// One admitted request's hold.
pub struct Ticket {
    settler: Arc<Settler>,
    hold: Option<Hold>,
    reserved: Ask,
    /// Counted in the reservation and charge metrics (the budget's ticket,
    /// not the gate's).
    metered: bool,
    /// The caller, when its usage is recorded.
    peer: Option<SpiffeId>,
}

impl Ticket {
    /// A ticket of `peer` for `hold`, which reserved `reserved`; `metered`
    /// when it is counted in the reservation and charge metrics.
    pub fn new(
        settler: Arc<Settler>,
        peer: &SpiffeId,
        hold: Hold,
        reserved: Ask,
        metered: bool,
    ) -> Self {
        if metered {
            let m = &settler.metrics;
            m.reservations.inc();
            m.reserved_tokens
                .add(i64::try_from(reserved.tokens).unwrap_or(i64::MAX));
        }
        Self {
            peer: settler.recorder.as_ref().map(|_| peer.clone()),
            settler,
            hold: Some(hold),
            reserved,
            metered,
        }
    }

    /// Settles with what was used; `cut` when the proxy ended a stream.
    pub fn finish(mut self, used: Ask, cut: bool) {
        self.settle(used, cut);
    }

    fn settle(&mut self, used: Ask, cut: bool) {
        let Some(hold) = self.hold.take() else {
            return;
        };
        if let (Some(r), Some(peer)) = (&self.settler.recorder, &self.peer) {
            // The gate's ticket is the request; the budget's, what it used.
            r.record(peer, u64::from(!self.metered), &used);
        }
        let m = &self.settler.metrics;
        if self.metered {
            m.reservations.dec();
            m.reserved_tokens
                .sub(i64::try_from(self.reserved.tokens).unwrap_or(i64::MAX));
            for (c, n) in m.charged.iter().zip([
                used.tokens,
                used.logprob_tokens,
                used.logit_bias,
                used.vectors,
            ]) {
                if n > 0 {
                    c.inc_by(n);
                }
            }
            if cut {
                m.streams_cut.inc();
            }
        }
        if hold.reservations.is_empty() && hold.slots.is_empty() {
            return;
        }
        match &*self.settler.store {
            Store::Local(s) => s.settle(&self.settler.plan, &hold, &used, super::limits::now_us()),
            Store::Redis(_) => {
                let settler = self.settler.clone();
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        if let Err(e) = settler.store.settle(&settler.plan, &hold, &used).await {
                            tracing::warn!(route = %settler.metrics.route, error = %e, "cannot settle a model request; its reservation stays charged until its window ends");
                        }
                    });
                }
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let reserved = self.reserved;
        self.settle(reserved, false);
    }
}
