//! The `kairos` binary's library: configuration, the node that wires log, processor, state and
//! API together, demo data, the data-set readers, the evaluation harness (`kairos eval`) and the
//! benchmark suite (`kairos bench`).

pub mod bench;
pub mod config;
pub mod datasets;
pub mod demo;
pub mod eval;
#[cfg(feature = "redis")]
pub mod group;
pub mod node;
pub mod serve;
