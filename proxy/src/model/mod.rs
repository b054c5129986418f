//! Model API protection: per-identity rate limits, token budgets with
//! reserve-then-settle, information limits, and extraction detection, for
//! OpenAI-compatible and generic predict APIs behind an inbound listener.

pub mod limits;
pub mod answer;
pub mod meter;
pub mod metrics;
pub mod request;
pub mod ticket;
