use actix::Message;

/// Partitions handed to this process, each with the offset it was
/// positioned at (None: no offset in the table yet, positioned by
/// `start_from`). Their record queues are in the pipeline's `LaneQueues`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct PartitionsAssigned {
    pub partitions: Vec<(i32, Option<i64>)>,
    /// False when the table's offsets could not be read (catalog down): the
    /// partitions are positioned at the log end, read nothing K2 keeps, and
    /// the supervisor starts their lanes once the table answers.
    pub offsets_known: bool,
}

/// Partitions taken away from this process. Replies once their lanes stopped.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct PartitionsRevoked {
    pub partitions: Vec<i32>,
}

/// A record of `partition` reached the consumer's main queue instead of its
/// lane: the lane must rewind so the record is read again.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StrayRecord {
    pub partition: i32,
    pub offset: i64,
}
