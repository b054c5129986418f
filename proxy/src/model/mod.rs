//! Model API protection: per-identity rate limits, token budgets with
//! reserve-then-settle, information limits, and extraction detection, for
//! OpenAI-compatible and generic predict APIs behind an inbound listener.

pub mod answer;
pub mod detect;
pub mod limits;
mod lru;
pub mod meter;
pub mod metrics;
pub mod outputs;
pub mod refusal;
pub mod report;
pub mod request;
pub mod route;
pub mod sse;
pub mod ticket;
pub mod usage;
