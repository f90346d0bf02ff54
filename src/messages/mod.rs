//! Messages that travel between actors. A message an actor only sends to
//! itself stays in that actor's file; the queries the HTTP layer sends an
//! actor stay with that actor.

mod committed;
mod files_written;
mod flush;
mod group;
mod lane;
mod level;
mod register;
mod stage;
mod trade_chunk;

pub use committed::Committed;
pub use files_written::FilesWritten;
pub use flush::Flush;
pub use group::{PartitionsAssigned, PartitionsRevoked, StrayRecord};
pub use lane::{LaneError, LaneFailed, LaneId, StopLane};
pub use level::LevelChanged;
pub use register::{
    LoadOffsets, OffsetsUnavailable, RegisterError, RegisterLane, ReleasePartitions, Superseded,
};
pub use stage::Stage;
pub use trade_chunk::{ChunkSink, TradeChunk};
