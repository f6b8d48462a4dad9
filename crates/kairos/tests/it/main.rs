//! Kairos integration tests: one test binary for the whole workspace (fast to link on 2 cores).
//!
//! - `api`: every endpoint and every error code, in-process against the real router.
//! - `golden`: a fixed event stream gives saved profiles and recommendations, straight through
//!   and with restarts in the middle.
//! - `crash`: a child `kairos serve` is killed with SIGKILL under concurrent ingest, several times;
//!   every acknowledged event is in the log exactly once and the state equals a clean replay.
//! - `web`: what browsers see: write keys, allowed origins and CORS, 429 with `Retry-After`, the
//!   tracker bundles and demo shop served by the binary, the catalogue listing.
//! - `eval`: `kairos eval` on hand-checked fixtures, its CLI output and determinism.
//! - `kafka_log`: the Kafka-protocol event log's contract against a real broker (tansu).
//! - `redis_state`: the profiles in Redis and Redis Cluster, against real `redis-server`s.
//! - `group`: `kairos process` replicas sharing a topic as a consumer group; one is killed with
//!   SIGKILL under load, and every acknowledged event is counted once in Redis.
//! - `api_replica`: `kairos api` replicas serve what a single node serves, from the model the
//!   processor replicas publish and the profiles in Redis; their cache follows the events.
//!
//! `api`, `golden` and `crash` run each scenario on the embedded log and on a Kafka topic with
//! the profiles in Redis (the scale-out mode); two `api` scenarios run with a Redis Cluster too.

mod api;
mod api_replica;
mod crash;
mod eval;
mod golden;
mod group;
mod kafka_log;
mod redis_state;
mod support;
mod web;
