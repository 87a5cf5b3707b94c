//! The ApiPolicy operator.

pub mod check;
pub mod cli;
