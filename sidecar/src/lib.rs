//! The ApiPolicy sidecar: a reverse proxy that enforces one ApiPolicy in front of one app.

pub mod accounting;
pub mod admin;
pub mod agent;
pub mod body;
pub mod cache;
pub mod cli;
pub mod clientip;
pub mod compress;
pub mod demo;
pub mod error;
pub mod forwarded;
pub mod headers;
pub mod health;
pub mod lane;
pub mod metrics;
pub mod outbound;
pub mod proxy;
pub mod ratelimit;
pub mod request_id;
pub mod routes;
pub mod server;
pub mod signal;
pub mod slo;
pub mod state;
pub mod upstream;
pub mod values;
