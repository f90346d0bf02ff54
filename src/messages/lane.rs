use actix::Message;

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
    pub stage: &'static str,
    pub error: String,
}

/// Stop a lane stage now, dropping anything it holds. The lane is being
/// rebuilt or its partition left this process; nothing in flight is trusted.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct StopLane;
