use std::collections::BTreeMap;

use actix::Message;

/// An Iceberg commit succeeded: these partitions are durable up to (not
/// including) these offsets.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Committed {
    /// Sequence number of this process's successful commits.
    pub epoch: u64,
    pub offsets: BTreeMap<i32, i64>,
    pub rows: u64,
    pub snapshot_id: Option<i64>,
}
