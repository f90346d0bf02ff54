use actix::Message;
use iceberg::spec::DataFile;

use super::LaneId;
use crate::model::SideRows;

/// A batcher wrote data files covering `[first_offset, next_offset)` of its
/// partition; the committer makes them durable in the next commit.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct FilesWritten {
    pub lane: LaneId,
    pub first_offset: i64,
    pub next_offset: i64,
    pub data_files: Vec<DataFile>,
    pub rows: u64,
    pub file_bytes: u64,
    /// Dead letters, sequence events and probable duplicates of the range.
    pub side: SideRows,
    /// Flushed because the lane read all Kafka had and nothing followed:
    /// the committer need not wait out its interval.
    pub caught_up: bool,
}
