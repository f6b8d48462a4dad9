//! Kairos state: user profiles, item statistics, item-to-item relations and the session model.
//!
//! The data flow is `log -> processor -> State::apply -> recommender`. [`State`] is plain data plus
//! the deterministic update rules; [`StateStore`] is the seam between the processor/API and a backend
//! (the embedded in-memory store with snapshots here, Redis for scale-out).
//!
//! ## Memory bounds
//! Everything per user and per item is bounded by [`StateConfig`]: see [`profile`] (about 1 KiB per
//! active profile with the defaults) and [`items`] (about 1 KiB per item plus its catalogue strings).
//! The session model has its own global bound (see [`session_model`]).

pub mod config;
pub mod decay;
pub mod intern;
pub mod items;
pub mod portable;
pub mod profile;
#[cfg(feature = "redis")]
pub mod redis_mirror;
#[cfg(feature = "redis")]
pub mod redis_model;
#[cfg(feature = "redis")]
pub mod redis_reader;
pub mod session_model;
pub mod state;
pub mod store;

pub use config::{EventWeights, RedisSettings, StateConfig};
pub use state::{
    anonymous_key, user_key, Applied, Checkpoint, GroupView, LogPosition, State, StateMemory,
};
pub use store::{
    ApplyReport, EmbeddedStore, SnapshotInfo, SnapshotJob, StateError, StateStats, StateStore,
};
