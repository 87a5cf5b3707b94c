//! The request pipeline's layers, one concern a file; [`crate::proxy::stack`] assembles them.

pub mod breaker;
pub mod cache;
pub mod compress;
pub mod concurrency;
pub mod path;
pub mod ratelimit;
pub mod request_headers;
pub mod retry;
pub mod shed;
