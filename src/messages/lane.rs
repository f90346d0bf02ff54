use actix::Message;

use super::Stage;

/// Identifies one incarnation of a lane. A rebuilt lane gets a new
/// incarnation, so anything still in flight from the old one is recognised
/// and discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LaneId {
    pub partition: i32,
    pub incarnation: u64,
}

impl std::fmt::Display for LaneId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p{}#{}", self.partition, self.incarnation)
    }
}

/// A stage of a lane failed; the supervisor rebuilds the lane from the last
/// committed offsets.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct LaneFailed {
    pub lane: LaneId,
    pub stage: Stage,
    pub error: LaneError,
}

/// Why a lane failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaneError {
    #[error("the stage panicked (the panic message is in the log)")]
    Panicked,
    #[error("the next stage of the lane is gone: {0}")]
    NextStageGone(String),
    #[error("the committer is unreachable: {0}")]
    CommitterGone(String),
    #[error("cannot load the stage's state: {0}")]
    StateLoad(String),
    #[error(
        "a record at offset {offset} arrived below the lane's position {position}: the partition was \
         repositioned under the lane"
    )]
    BelowPosition { position: i64, offset: i64 },
    #[error(
        "offsets [{position}, {offset}) were skipped and Kafka still holds {position}: not retention. \
         A transactional or compacted topic skips offsets on purpose: set kafka.offset_gaps = \"accept\""
    )]
    UnexplainedGap { position: i64, offset: i64 },
    #[error("a chunk starts at offset {first_offset} but the lane's data ends at {expected}")]
    NotContiguous { expected: i64, first_offset: i64 },
    #[error("fenced: the table stands at offset {table_next:?}")]
    Fenced { table_next: Option<i64> },
    #[error(
        "the committer refused this lane's files as stale for {stale_ms} ms (its current lane is {current:?})"
    )]
    Stale { stale_ms: u64, current: Option<u64> },
    #[error("the committed epoch's stage state could not be put in force: {0}")]
    StateNotInForce(String),
    #[error("a record at offset {offset} bypassed the lane")]
    StrayRecord { offset: i64 },
    #[error("the lane could not start: {0}")]
    Start(String),
    #[error("the partition could not be restarted after retention overtook it: {0}")]
    Restart(String),
}

/// Stop a lane stage now, dropping anything it holds. The lane is being
/// rebuilt or its partition left this process; nothing in flight is trusted.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct StopLane;
