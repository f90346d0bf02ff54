//! The pipeline's actors, one per file. Logic that is not about actors lives
//! in plain modules beside them.

pub mod batcher;
pub mod deduplicator;
pub mod iceberg_committer;
pub mod load_shedder;
mod panic_report;
pub mod partition_consumer;
pub mod sequencer;
mod stage_state;
pub mod supervisor;
pub mod table_maintainer;

pub use batcher::Batcher;
pub use deduplicator::Deduplicator;
pub use iceberg_committer::IcebergCommitter;
pub use load_shedder::LoadShedder;
pub(crate) use panic_report::PanicReport;
pub use partition_consumer::PartitionConsumer;
pub use sequencer::Sequencer;
pub use supervisor::Supervisor;
pub use table_maintainer::TableMaintainer;
