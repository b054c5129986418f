//! Protection of AI model APIs behind the proxy: detecting identities that
//! copy a model through its API, and limiting what its answers reveal.

pub mod detect;
pub mod outputs;
