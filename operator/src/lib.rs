//! The ApiPolicy operator.

pub mod agent;
pub mod args;
pub mod auth;
pub mod budgets;
pub mod caches;
pub mod certs;
pub mod check;
pub mod cli;
pub mod conflict;
pub mod context;
pub mod controller;
pub mod error;
#[cfg(test)]
mod fixtures;
pub mod hub;
pub mod inject;
pub mod leader;
pub mod metrics;
pub mod render;
pub mod run;
pub mod serve;
pub mod slo_merge;
pub mod status;
pub mod tls;
pub mod webhook;
