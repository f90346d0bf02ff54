//! Messages that travel between stages. A message an actor only sends to
//! itself stays in that actor's file.

mod committed;
mod files_written;
mod flush;
mod lane;
mod level;
mod trade_chunk;

pub use committed::Committed;
pub use files_written::FilesWritten;
pub use flush::Flush;
pub use lane::{LaneFailed, LaneId, StopLane};
pub use level::LevelChanged;
pub use trade_chunk::{ChunkSink, TradeChunk};
