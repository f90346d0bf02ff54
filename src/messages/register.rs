use std::collections::BTreeMap;
use std::sync::Arc;

use actix::Message;

use super::LaneId;
use crate::state::Checkpoint;

/// A lane (re)starts for a partition: the committer makes it the
/// partition's current incarnation and drops older incarnations' files.
/// Replies with the next offset the table records for the partition (None:
/// none yet), where the lane must start. A registration older than one the
/// committer has already seen for the partition is refused.
#[derive(Message)]
#[rtype(result = "Result<Option<i64>, RegisterError>")]
pub struct RegisterLane {
    pub lane: LaneId,
    /// The lane's stage state, staged and promoted with its commits.
    pub checkpoints: Vec<Arc<dyn Checkpoint>>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RegisterError {
    /// A newer lane of the partition registered first: this one must not start.
    #[error(transparent)]
    Superseded(#[from] Superseded),
    /// The table's offsets could not be read (catalog down, breaker open).
    #[error(transparent)]
    Offsets(#[from] OffsetsUnavailable),
}

/// Partitions that left this process: the committer drops their lanes'
/// pending files.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ReleasePartitions {
    pub partitions: Vec<i32>,
}

/// Asks the committer for the next offsets the table records for these
/// partitions (the rebalance callback, before it positions them).
#[derive(Debug, Message)]
#[rtype(result = "Result<BTreeMap<i32, i64>, OffsetsUnavailable>")]
pub struct LoadOffsets {
    pub partitions: Vec<i32>,
}

/// The trades table's offsets could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("failed to read offsets from Iceberg: {0}")]
pub struct OffsetsUnavailable(pub String);

/// A registration that came after a newer one for the same partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("lane {lane} was superseded by incarnation {newest} of its partition")]
pub struct Superseded {
    pub lane: LaneId,
    pub newest: u64,
}
