use serde::Serialize;

/// A stage of K2's pipeline: what failed, what a fault targets, what a
/// restart is counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    PartitionConsumer,
    Sequencer,
    Deduplicator,
    LoadShedder,
    Batcher,
    IcebergCommitter,
    Supervisor,
}

impl Stage {
    /// The stages of a lane, upstream first.
    pub const LANE: [Stage; 5] = [
        Stage::PartitionConsumer,
        Stage::Sequencer,
        Stage::Deduplicator,
        Stage::LoadShedder,
        Stage::Batcher,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::PartitionConsumer => "partition_consumer",
            Stage::Sequencer => "sequencer",
            Stage::Deduplicator => "deduplicator",
            Stage::LoadShedder => "load_shedder",
            Stage::Batcher => "batcher",
            Stage::IcebergCommitter => "iceberg_committer",
            Stage::Supervisor => "supervisor",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
