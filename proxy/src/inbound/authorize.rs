//! The authorization stage (micro-segmentation): may this verified caller
//! make this request? Default deny; the rules are `crate::authz`'s. A
//! refused request gets 403 (counted with the rule that refused it); in
//! audit mode it is logged and let through. The deciding rule and the
//! authorized path ride in the answer for the access log.
//!
//! The policy comes compiled ([`CompiledPolicy`]): with it, every rule's
//! decision counters resolved once per (re)load, so a request touches
//! atomics only.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus::{IntCounter, IntCounterVec};
use tower::{Layer, Service};

use warden_config::proxy::Policy;
use warden_identity::ratelog::LogLimiter;
use warden_identity::tls::VerifiedPeer;

use crate::authz::{self, Decision, Request as AuthzRequest};
use crate::ratelimit::RateLimits;
use crate::respond::Refusal;
use crate::stack::observe::{Authorized, Logged};
use crate::stack::{Req, Resp};
use warden_guard::limits::Store;

static DECISION_LOG: LogLimiter = LogLimiter::new(20);

/// The policy an inbound listener enforces now (replaced by a reload).
pub type PolicyRx = tokio::sync::watch::Receiver<Arc<CompiledPolicy>>;

/// A policy with its rules' names shared, their counters resolved and its
/// rate limits compiled.
#[derive(Debug)]
pub struct CompiledPolicy {
    /// The rules.
    pub policy: Policy,
    /// Its rate limits, on the listener's store.
    pub rate_limits: RateLimits,
    /// Per rule, then `default` last: its name and allow/deny/audit_deny counters.
    rules: Vec<RuleHandles>,
}

#[derive(Debug)]
struct RuleHandles {
    name: Arc<str>,
    allow: IntCounter,
    deny: IntCounter,
    audit_deny: IntCounter,
}

impl CompiledPolicy {
    /// Compiles `policy` of listener `listener`, counting in `family`
    /// (labels: listener, rule, result), with its rate limits in `store`.
    pub fn new(policy: Policy, family: &IntCounterVec, listener: &str, store: Arc<Store>) -> Self {
        let names = policy
            .rules
            .iter()
            .map(|r| r.name.as_str())
            .chain(["default"]);
        let rules = names
            .map(|name| RuleHandles {
                name: name.into(),
                allow: family.with_label_values(&[listener, name, "allow"]),
                deny: family.with_label_values(&[listener, name, "deny"]),
                audit_deny: family.with_label_values(&[listener, name, "audit_deny"]),
            })
            .collect();
        let rate_limits = RateLimits::new(listener, &policy, store);
        Self {
            policy,
            rate_limits,
            rules,
        }
    }

    /// Decides a request on a connection accepted on `local_port`, counts
    /// the decision, and names the deciding rule.
    pub fn decide(
        &self,
        peer: &VerifiedPeer,
        local_port: u16,
        req: AuthzRequest<'_>,
    ) -> (Decision<'_>, Arc<str>) {
        let d = authz::decide_on(&self.policy, peer, local_port, req);
        let i = d.index.unwrap_or(self.policy.rules.len());
        let Some(h) = self.rules.get(i) else {
            return (d, Arc::from(d.rule));
        };
        match d.result {
            "allow" => h.allow.inc(),
            "deny" => h.deny.inc(),
            _ => h.audit_deny.inc(),
        }
        (d, h.name.clone())
    }
}

/// The layer, for one connection's verified caller.
#[derive(Debug, Clone)]
pub struct AuthorizeLayer {
    listener: Arc<str>,
    policy: PolicyRx,
    peer: Arc<VerifiedPeer>,
    local_port: u16,
}

impl AuthorizeLayer {
    /// Authorizes `peer`'s requests on `listener`, on a connection accepted
    /// on `local_port`, under the latest `policy`.
    pub fn new(
        listener: Arc<str>,
        policy: PolicyRx,
        peer: Arc<VerifiedPeer>,
        local_port: u16,
    ) -> Self {
        Self {
            listener,
            policy,
            peer,
            local_port,
        }
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`AuthorizeLayer`].
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
    layer: AuthorizeLayer,
}

impl<S> Service<Req> for Authorize<S>
where
    S: Service<Req, Response = Resp, Error = Refusal>,
    S::Future: Unpin,
{
    type Response = Resp;
    type Error = Refusal;
    type Future = Decided<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let l = &self.layer;
        let compiled = l.policy.borrow().clone();
        let (d, rule) = compiled.decide(
            &l.peer,
            l.local_port,
            AuthzRequest {
                method: Some(req.method().as_str()),
                path: Some(req.uri().path()),
            },
        );
        let log = || {
            tracing::info!(listener = %l.listener, peer = %l.peer.id(), method = %req.method(), path = %req.uri().path(), rule = %rule, "request denied");
        };
        if !d.allowed {
            if DECISION_LOG.allow() {
                log();
            }
            return Decided::Refused(Some(Refusal::Forbidden { rule }));
        }
        if d.result == "audit_deny" && DECISION_LOG.allow() {
            tracing::warn!(listener = %l.listener, peer = %l.peer.id(), method = %req.method(), path = %req.uri().path(), rule = %rule, "audit: would deny this request");
        }
        let note = req
            .extensions()
            .get::<Logged>()
            .and(req.uri().path_and_query().cloned())
            .map(|path| Authorized { rule, path });
        Decided::Next(self.inner.call(req), note)
    }
}

/// The future of [`Authorize`]: the rest of the stack's, with the decision noted.
pub enum Decided<F> {
    /// Allowed: waiting on the next stages.
    Next(F, Option<Authorized>),
    /// Refused (taken once polled).
    Refused(Option<Refusal>),
}

impl<F> Future for Decided<F>
where
    F: Future<Output = Result<Resp, Refusal>> + Unpin,
{
    type Output = Result<Resp, Refusal>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Self::Next(f, note) => Pin::new(f).poll(cx).map_ok(|mut resp| {
                if let Some(n) = note.take() {
                    resp.extensions_mut().insert(n);
                }
                resp
            }),
            Self::Refused(r) => Poll::Ready(Err(r.take().unwrap_or(Refusal::Internal))),
        }
    }
}
