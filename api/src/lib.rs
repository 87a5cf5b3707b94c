//! The ApiPolicy API: the custom resource's types, validation with field paths, compilation
//! into the sidecar's config, and the wire types between the sidecar and the operator.
//! Pure: no I/O and no async runtime.

mod compile;
pub mod contract;
pub mod duration;
pub mod locate;
pub mod manifest;
pub mod quantity;
pub mod report;
pub mod slo;
mod types;
mod validate;

pub use compile::*;
pub use duration::Duration;
pub use quantity::ByteSize;
pub use types::*;
pub use validate::{DEFAULT_ROUTE, ValidationError, compile_path_regex, is_token, prefix_matches, validate};
