//! Everything K2 knows about Iceberg: table definitions, the catalog (with the
//! commit fence that makes offsets-in-snapshots safe), the offsets recorded in
//! snapshot summaries, Arrow batch building and Parquet data-file writing.
//!
//! Nothing here knows about actix or Kafka.

pub mod catalog;
pub mod commit;
pub mod maintenance;
pub mod offsets;
pub mod reader;
pub mod tables;
pub mod writer;
