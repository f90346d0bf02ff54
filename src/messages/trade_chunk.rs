use actix::{Message, Recipient};

use super::{Flush, LaneId};
use crate::model::{SideRows, Trade};

/// A run of consecutive Kafka records of one partition, decoded.
///
/// `[first_offset, next_offset)` is the offset range the chunk accounts for:
/// every offset in it is either a trade here, a dead letter here, or was
/// dropped on purpose by a stage (duplicate) — never unaccounted for.
/// `side` also carries what stages noticed (sequence gaps, probable
/// duplicates) for K2's own tables. Ranges
/// of consecutive chunks of a lane are contiguous.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct TradeChunk {
    pub lane: LaneId,
    pub first_offset: i64,
    pub next_offset: i64,
    pub trades: Vec<Trade>,
    pub side: SideRows,
}

/// The next stage of a lane, as seen by the stage before it.
#[derive(Clone)]
pub struct ChunkSink {
    pub chunks: Recipient<TradeChunk>,
    pub flush: Recipient<Flush>,
}
