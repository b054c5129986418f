//! What every request stage is made of, inbound and outbound alike.
//!
//! A stage is a tower `Layer` + `Service` over one request type ([`Req`])
//! and one answer type ([`Resp`]); a stage that refuses returns a typed
//! [`Refusal`] as its error, and one layer near the top (`respond`) turns it
//! into the answer. A stage that only looks at the request and perhaps
//! rewrites it implements [`Check`] and is wrapped in a [`CheckLayer`]: no
//! allocation, no boxed future, no task.

pub mod body;
pub mod observe;

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tower::{Layer, Service};

use crate::respond::Refusal;

pub use body::{Body, Req, ReqBody, Resp};
/// A boxed stage future, for the stages that must wait on something.
pub type StageFuture = Pin<Box<dyn Future<Output = Result<Resp, Refusal>> + Send>>;

/// One connection's stack as hyper's service. hyper calls a service by
/// shared reference; tower's adapter (`TowerToHyperService`) clones the
/// whole stack for every request to get the `&mut` that tower's `call`
/// takes, which costs a reference count per stage, a pooled client's
/// handles included. A connection's requests are dispatched one at a time
/// from its own task, so the stack is borrowed instead.
pub struct Serve<S>(RefCell<S>);

impl<S> Serve<S> {
    /// Serves a connection's requests with `stack`.
    pub fn new(stack: S) -> Self {
        Self(RefCell::new(stack))
    }
}

impl<S, R> hyper::service::Service<R> for Serve<S>
where
    S: tower::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: R) -> Self::Future {
        let mut stack = self.0.borrow_mut();
        // No stage waits in `poll_ready` (the in-flight slots are taken in
        // `observe`, which answers 503 past them): this keeps tower's
        // contract, it never returns `Pending`.
        let _ready = stack.poll_ready(&mut Context::from_waker(Waker::noop()));
        stack.call(req)
    }
}

/// A synchronous stage: it checks (and may rewrite) the request, or refuses it.
pub trait Check: Clone + Send + Sync + 'static {
    /// `Ok` passes the request on; `Err` answers it without going further.
    fn check(&self, req: &mut Req) -> Result<(), Refusal>;
}

/// Wraps a [`Check`] as a layer.
#[derive(Clone, Debug)]
pub struct CheckLayer<C>(pub C);

impl<C: Clone, S> Layer<S> for CheckLayer<C> {
    type Service = Checked<C, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Checked {
            check: self.0.clone(),
            inner,
        }
    }
}

/// A [`Check`] in front of the rest of the stack.
#[derive(Clone, Debug)]
pub struct Checked<C, S> {
    check: C,
    inner: S,
}

impl<C, S> Service<Req> for Checked<C, S>
where
    C: Check,
    S: Service<Req, Response = Resp, Error = Refusal>,
    S::Future: Unpin,
{
    type Response = Resp;
    type Error = Refusal;
    type Future = Step<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        match self.check.check(&mut req) {
            Ok(()) => Step::Next(self.inner.call(req)),
            Err(r) => Step::Refused(Some(r)),
        }
    }
}

/// The future of a [`Checked`] stage: the rest of the stack's, or the refusal.
pub enum Step<F> {
    /// Passed: waiting on the next stages.
    Next(F),
    /// Refused (taken once polled).
    Refused(Option<Refusal>),
}

impl<F> Future for Step<F>
where
    F: Future<Output = Result<Resp, Refusal>> + Unpin,
{
    type Output = Result<Resp, Refusal>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Self::Next(f) => Pin::new(f).poll(cx),
            Self::Refused(r) => Poll::Ready(Err(r.take().unwrap_or(Refusal::Internal))),
        }
    }
}

/// The future of a stage that waits on something only for some requests:
/// the rest of the stack's future as it is, or the stage's own, boxed.
pub enum Branch<F> {
    /// The stage had nothing to do.
    Pass(F),
    /// The stage's own work, then the rest of the stack.
    Staged(StageFuture),
}

impl<F> Future for Branch<F>
where
    F: Future<Output = Result<Resp, Refusal>> + Unpin,
{
    type Output = Result<Resp, Refusal>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Self::Pass(f) => Pin::new(f).poll(cx),
            Self::Staged(f) => f.as_mut().poll(cx),
        }
    }
}

/// An error and its causes, outermost first: what `source()` chains, with
/// the error inside an `io::Error` looked into (tokio-rustls and hyper wrap
/// theirs so); at most 16.
pub fn causes<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    let mut next = Some(err);
    std::iter::from_fn(move || {
        let mut cur = next?;
        while let Some(inner) = cur
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            cur = inner;
        }
        next = cur.source();
        Some(cur)
    })
    .take(16)
}

/// An error and its causes on one line, for logs: hyper's own says only
/// `client error (Connect)`, its causes say what happened.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    causes(e)
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}
