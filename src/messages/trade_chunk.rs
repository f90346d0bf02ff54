use actix::{Message, Recipient};

use super::{Flush, LaneError, LaneFailed, LaneId, Stage};
use crate::model::{SideRows, Trade};

/// A run of consecutive Kafka records of one partition, decoded.
///
/// `[first_offset, next_offset)` is the offset range the chunk accounts for:
/// every offset in it is either a trade here, a dead letter here, or was
/// dropped on purpose by a stage (duplicate, shed) and recorded — never
/// unaccounted for. `side` also carries what stages noticed (sequence gaps,
/// probable duplicates, shed ranges) for K2's own tables. Ranges of
/// consecutive chunks of a lane are contiguous.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct TradeChunk {
    pub lane: LaneId,
    pub first_offset: i64,
    pub next_offset: i64,
    pub trades: Vec<Trade>,
    /// (exchange, symbol) of records shed by their Kafka key before they
    /// were decoded (their offsets are in `side.shed`); the sequencer
    /// restarts their tracking.
    pub shed_symbols: Vec<(String, String)>,
    pub side: SideRows,
    /// The partition consumer read everything Kafka had: its queue was
    /// empty and the chunk ends at the high watermark last fetched. Unless
    /// another chunk follows soon, the batcher flushes it at once and the
    /// committer commits it without waiting out batch age and its interval.
    pub caught_up: bool,
}

/// The next stage of a lane, as seen by the stage before it, and where a
/// stage reports that the next one is gone.
#[derive(Clone)]
pub struct ChunkSink {
    pub chunks: Recipient<TradeChunk>,
    pub flush: Recipient<Flush>,
    pub failures: Recipient<LaneFailed>,
    /// The injected `slow_stage` fault delays the forward.
    pub faults: std::sync::Arc<crate::faults::Faults>,
}

impl ChunkSink {
    /// Sends `chunk` on, waiting while the next stage's mailbox is full. If
    /// the next stage is gone, the chunk is lost to this lane: the lane is
    /// reported failed (and rebuilt from the table), never left short. A
    /// stage the `slow_stage` fault targets waits first, holding its lane.
    pub fn forward(&self, chunk: TradeChunk, from: Stage) -> impl Future<Output = ()> + 'static {
        let lane = chunk.lane;
        let delay = self.faults.chunk_delay(from, lane.partition);
        let failures = self.failures.clone();
        let send = match delay {
            // Sent only after the delay: `send` enqueues at once when it can.
            Some(delay) => {
                let chunks = self.chunks.clone();
                futures::future::Either::Left(async move {
                    tokio::time::sleep(delay).await;
                    chunks.send(chunk).await
                })
            }
            None => futures::future::Either::Right(self.chunks.send(chunk)),
        };
        async move {
            if let Err(err) = send.await {
                report(&failures, lane, from, err);
            }
        }
    }

    /// Sends a flush on and waits until everything downstream flushed.
    pub fn forward_flush(&self, lane: LaneId, from: Stage) -> impl Future<Output = ()> + 'static {
        let send = self.flush.send(Flush);
        let failures = self.failures.clone();
        async move {
            if let Err(err) = send.await {
                report(&failures, lane, from, err);
            }
        }
    }
}

fn report(failures: &Recipient<LaneFailed>, lane: LaneId, stage: Stage, err: actix::MailboxError) {
    tracing::warn!(%lane, %stage, error = %err, "the next stage of the lane is gone");
    failures.do_send(LaneFailed {
        lane,
        stage,
        error: LaneError::NextStageGone(err.to_string()),
    });
}
