//! Buffers a lane's trades as Arrow columns and writes them as Parquet data
//! files when the buffer reaches its row or byte target, or grows old —
//! whichever comes first. Each flush hands the files, the offset range they
//! cover and the chunks' side rows (dead letters, sequence events, probable
//! duplicates) to the committer, and waits until the
//! committer accepts them (backpressure when commits fall behind).

use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::error;

use crate::messages::{FilesWritten, Flush, LaneFailed, LaneId, StopLane, TradeChunk};
use crate::metrics as m;
use crate::model::SideRows;
use crate::storage::writer::{TableWriter, TradeBatchBuilder};

#[derive(Debug, Clone)]
pub struct BatcherParams {
    pub lane: LaneId,
    pub max_rows: usize,
    pub max_bytes: u64,
    pub max_age: Duration,
    pub mailbox_capacity: usize,
}

#[derive(Debug, Default)]
pub struct BatcherCounters {
    pub num_files: u64,
    pub num_rows: u64,
    pub num_file_bytes: u64,
}

impl BatcherCounters {
    fn record_flush(&mut self, files: usize, rows: u64, bytes: u64) {
        self.num_files += files as u64;
        self.num_rows += rows;
        self.num_file_bytes += bytes;
        metrics::counter!(m::DATA_FILES_WRITTEN).increment(files as u64);
        metrics::counter!(m::DATA_FILE_BYTES).increment(bytes);
    }
}

pub struct Batcher {
    params: BatcherParams,
    writer: TableWriter,
    committer: Recipient<FilesWritten>,
    supervisor: Recipient<LaneFailed>,
    buffer: TradeBatchBuilder,
    side: SideRows,
    /// Offset range covered by the buffer.
    range: Option<(i64, i64)>,
    oldest: Option<Instant>,
    partition_label: String,
    pub counters: BatcherCounters,
}

impl Batcher {
    pub fn new(
        params: BatcherParams,
        writer: TableWriter,
        committer: Recipient<FilesWritten>,
        supervisor: Recipient<LaneFailed>,
    ) -> Self {
        Self {
            buffer: TradeBatchBuilder::with_capacity(params.max_rows.min(65_536)),
            partition_label: params.lane.partition.to_string(),
            params,
            writer,
            committer,
            supervisor,
            side: SideRows::default(),
            range: None,
            oldest: None,
            counters: BatcherCounters::default(),
        }
    }

    fn is_due(&self) -> bool {
        self.buffer.len() >= self.params.max_rows
            || self.buffer.estimated_bytes() >= self.params.max_bytes
            || self.oldest.is_some_and(|t| t.elapsed() >= self.params.max_age)
    }

    /// Writes the buffer out and hands it to the committer, holding the
    /// actor (no other message) until the committer accepted the files.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if let Some(fut) = self.flush_future() {
            ctx.wait(fut);
        }
    }

    /// The flush as one actor future, so a `Flush` request can reply exactly
    /// when its files were accepted.
    fn flush_future(&mut self) -> Option<ResponseActFuture<Self, ()>> {
        let (first_offset, next_offset) = self.range.take()?;
        self.oldest = None;
        let side = std::mem::take(&mut self.side);
        let rows = self.buffer.len() as u64;
        let batch = if rows == 0 {
            Ok(None)
        } else {
            self.buffer
                .finish(self.writer.arrow_schema())
                .map(Some)
                .map_err(|err| format!("failed to build a record batch: {err}"))
        };
        metrics::gauge!(m::BATCHER_BUFFERED_BYTES, "partition" => self.partition_label.clone()).set(0.0);
        let writer = self.writer.clone();
        let committer = self.committer.clone();
        let lane = self.params.lane;
        let fut = async move {
            let data_files = match batch? {
                Some(batch) => writer
                    .write(batch)
                    .await
                    .map_err(|e| format!("failed to write data files: {e}"))?,
                None => Vec::new(),
            };
            let file_bytes = data_files.iter().map(|f| f.file_size_in_bytes()).sum();
            let files = data_files.len();
            committer
                .send(FilesWritten {
                    lane,
                    first_offset,
                    next_offset,
                    data_files,
                    rows,
                    file_bytes,
                    side,
                })
                .await
                .map_err(|e| format!("committer unreachable: {e}"))?;
            Ok::<_, String>((files, file_bytes))
        };
        Some(Box::pin(fut.into_actor(self).map(
            move |result, act, ctx| match result {
                Ok((files, bytes)) => act.counters.record_flush(files, rows, bytes),
                Err(err) => act.fail(ctx, err),
            },
        )))
    }

    fn fail(&mut self, ctx: &mut Context<Self>, error: String) {
        error!(lane = %self.params.lane, error = %error, "batcher failed");
        self.supervisor.do_send(LaneFailed {
            lane: self.params.lane,
            stage: "batcher",
            error,
        });
        ctx.stop();
    }
}

impl Actor for Batcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.params.mailbox_capacity);
        let tick = (self.params.max_age / 4).max(Duration::from_millis(10));
        ctx.run_interval(tick, |act, ctx| {
            if act.oldest.is_some_and(|t| t.elapsed() >= act.params.max_age) {
                act.flush(ctx);
            }
        });
    }
}

impl Handler<TradeChunk> for Batcher {
    type Result = ();

    fn handle(&mut self, chunk: TradeChunk, ctx: &mut Context<Self>) {
        let first = match self.range {
            Some((first, next)) => {
                if chunk.first_offset != next {
                    return self.fail(
                        ctx,
                        format!(
                            "chunk starts at offset {} but the buffer ends at {next}",
                            chunk.first_offset
                        ),
                    );
                }
                first
            }
            None => chunk.first_offset,
        };
        self.range = Some((first, chunk.next_offset));
        self.oldest.get_or_insert_with(Instant::now);
        for trade in &chunk.trades {
            self.buffer.push(trade);
        }
        self.side.extend(chunk.side);
        metrics::gauge!(m::BATCHER_BUFFERED_BYTES, "partition" => self.partition_label.clone())
            .set(self.buffer.estimated_bytes() as f64);
        if self.is_due() {
            self.flush(ctx);
        }
    }
}

impl Handler<Flush> for Batcher {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: Flush, _: &mut Context<Self>) -> Self::Result {
        let fut = self
            .flush_future()
            .unwrap_or_else(|| Box::pin(actix::fut::ready(())));
        AtomicResponse::new(fut)
    }
}

impl Handler<StopLane> for Batcher {
    type Result = ();

    fn handle(&mut self, _: StopLane, ctx: &mut Context<Self>) {
        metrics::gauge!(m::BATCHER_BUFFERED_BYTES, "partition" => self.partition_label.clone()).set(0.0);
        ctx.stop();
    }
}
