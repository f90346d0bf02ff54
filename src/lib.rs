//! K2: market data from Kafka into Apache Iceberg, exactly once.
//!
//! See `docs/ARCHITECTURE.md` for the actor graph built in [`pipeline`].

pub mod actors;
pub mod backfill;
pub mod bench;
pub mod bloom;
pub mod breaker;
pub mod chunked_log;
pub mod config;
pub mod decode;
pub mod dedup;
pub mod degradation;
pub mod demo;
pub mod embedded;
pub mod faults;
pub mod kafka;
pub mod lane;
pub mod loadgen;
pub mod maintain;
pub mod messages;
pub mod metrics;
pub mod model;
pub mod pending;
pub mod per_symbol;
pub mod pipeline;
pub mod query;
pub mod sequence;
pub mod service;
pub mod shedding;
pub mod state;
pub mod storage;
pub mod supervision;
pub mod tour;
pub mod tui;
pub mod web;
