//! Model API protection: per-identity rate limits, token budgets with
//! reserve-then-settle, information limits, and extraction detection, for
//! OpenAI-compatible and generic predict APIs behind an inbound listener.
//!
//! Request in, decision out: a route ([`route::Route`]) admits a request or
//! refuses it with a typed [`refusal::GuardRefusal`], and counts the app's
//! answer ([`answer::AnswerBody`], generic over the body type). It runs no
//! server and answers nobody itself: the proxy renders its refusals with
//! its own, and this crate links no hyper.

#![forbid(unsafe_code)]

pub mod answer;
pub mod detect;
pub mod limits;
mod lru;
pub mod meter;
pub mod metrics;
pub mod outputs;
pub mod record;
pub mod refusal;
pub mod report;
pub mod request;
pub mod route;
pub mod sse;
pub mod ticket;
pub mod usage;
