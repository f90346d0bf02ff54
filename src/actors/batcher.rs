//! Buffers a lane's trades as Arrow columns and writes them as Parquet data
//! files when the buffer reaches its row or byte target, or grows old —
//! whichever comes first. Each flush hands the files, the offset range they
//! cover and the chunks' side rows (dead letters, sequence events, probable
//! duplicates) to the committer, and waits until the
//! committer accepts them (backpressure when commits fall behind).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::{error, warn};

use crate::breaker::{BreakerError, CircuitBreaker};
use crate::degradation::DegradationLevel;
use crate::messages::{
    FilesWritten, Flush, LaneError, LaneFailed, LaneId, LevelChanged, Stage, StopLane, TradeChunk,
};
use crate::metrics as m;
use crate::model::SideRows;
use crate::storage::writer::{TableWriter, TradeBatchBuilder};
use crate::supervision::LaneStatus;

#[derive(Debug, Clone)]
pub struct BatcherParams {
    pub lane: LaneId,
    pub max_rows: usize,
    pub max_bytes: u64,
    pub max_age: Duration,
    /// Flush this long after a caught-up chunk if no other follows (zero: never).
    pub idle_flush: Duration,
    pub mailbox_capacity: usize,
    /// SOFT and above multiply the three targets by this.
    pub soft_growth: u32,
    /// The level in force when the lane starts.
    pub level: DegradationLevel,
    /// Storage calls go through it; a failed write is retried while the
    /// lane holds (it backs up, and its partition pauses if commits fail too).
    pub storage: Arc<CircuitBreaker>,
    pub status: Arc<LaneStatus>,
    pub faults: Arc<crate::faults::Faults>,
}

/// Wait between attempts to write a buffer whose write failed.
const WRITE_RETRY: Duration = Duration::from_millis(500);

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
    _panic: crate::actors::PanicReport,
    writer: TableWriter,
    committer: Recipient<FilesWritten>,
    supervisor: Recipient<LaneFailed>,
    buffer: TradeBatchBuilder,
    side: SideRows,
    /// Offset range covered by the buffer.
    range: Option<(i64, i64)>,
    oldest: Option<Instant>,
    /// Chunks received, so an idle flush can tell whether another came.
    chunks: u64,
    /// Targets grow at SOFT and above (fewer, larger files and commits).
    growth: u32,
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
        let growth = growth_at(params.level, params.soft_growth);
        Self {
            _panic: crate::actors::PanicReport {
                lane: params.lane,
                stage: Stage::Batcher,
                supervisor: supervisor.clone(),
            },
            buffer: TradeBatchBuilder::with_capacity(params.max_rows.min(65_536)),
            partition_label: params.lane.partition.to_string(),
            params,
            writer,
            committer,
            supervisor,
            side: SideRows::default(),
            range: None,
            oldest: None,
            chunks: 0,
            growth,
            counters: BatcherCounters::default(),
        }
    }

    fn is_due(&self) -> bool {
        let g = self.growth;
        self.buffer.len() >= self.params.max_rows * g as usize
            || self.buffer.estimated_bytes() >= self.params.max_bytes * g as u64
            || self.is_old()
    }

    fn is_old(&self) -> bool {
        self.oldest
            .is_some_and(|t| t.elapsed() >= self.params.max_age * self.growth)
    }

    fn publish_buffered(&self, bytes: u64) {
        self.params.status.buffered_bytes.store(bytes, Relaxed);
        metrics::gauge!(m::BATCHER_BUFFERED_BYTES, "partition" => self.partition_label.clone())
            .set(bytes as f64);
    }

    /// Writes the buffer out and hands it to the committer, holding the
    /// actor (no other message) until the committer accepted the files.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if let Some(fut) = self.flush_future(false) {
            ctx.wait(fut);
        }
    }

    /// The flush as one actor future, so a `Flush` request can reply exactly
    /// when its files were accepted.
    fn flush_future(&mut self, caught_up: bool) -> Option<ResponseActFuture<Self, ()>> {
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
                .map_err(|err| LaneError::Start(format!("failed to build a record batch: {err}")))
        };
        self.publish_buffered(0);
        let writer = self.writer.clone();
        let committer = self.committer.clone();
        let storage = self.params.storage.clone();
        let faults = self.params.faults.clone();
        let lane = self.params.lane;
        let fut = async move {
            let data_files = match batch? {
                Some(batch) => write_until_stored(&writer, &storage, &faults, batch, lane).await,
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
                    caught_up,
                })
                .await
                .map_err(|e| LaneError::CommitterGone(e.to_string()))?;
            Ok::<_, LaneError>((files, file_bytes))
        };
        Some(Box::pin(fut.into_actor(self).map(
            move |result, act, ctx| match result {
                Ok((files, bytes)) => act.counters.record_flush(files, rows, bytes),
                Err(err) => act.fail(ctx, err),
            },
        )))
    }

    fn fail(&mut self, ctx: &mut Context<Self>, error: LaneError) {
        error!(lane = %self.params.lane, error = %error, "batcher failed");
        self.supervisor.do_send(LaneFailed {
            lane: self.params.lane,
            stage: Stage::Batcher,
            error,
        });
        ctx.stop();
    }
}

fn growth_at(level: DegradationLevel, soft_growth: u32) -> u32 {
    if level >= DegradationLevel::Soft {
        soft_growth.max(1)
    } else {
        1
    }
}

/// Writes `batch`, retrying through the storage breaker until it is stored.
/// The lane holds meanwhile: nothing is dropped, and the records stay
/// uncommitted (the lane is rebuilt from Kafka if it is stopped). The
/// injected `storage_down` fault fails each write before it reaches the
/// store, as an unreachable store would.
async fn write_until_stored(
    writer: &TableWriter,
    storage: &CircuitBreaker,
    faults: &crate::faults::Faults,
    batch: arrow_array::RecordBatch,
    lane: LaneId,
) -> Vec<iceberg::spec::DataFile> {
    let mut attempt = 0u32;
    loop {
        let write = async {
            if faults.storage_down() {
                return Err(iceberg::Error::new(
                    iceberg::ErrorKind::Unexpected,
                    "injected fault: object storage is down",
                ));
            }
            writer.write(batch.clone()).await
        };
        match storage.call(write).await {
            Ok(files) => return files,
            Err(err) => {
                attempt += 1;
                if attempt == 1 || attempt.is_power_of_two() {
                    match &err {
                        BreakerError::Open(open) => {
                            warn!(%lane, attempt, error = %open, "holding the buffer")
                        }
                        BreakerError::Failed(err) => {
                            warn!(%lane, attempt, error = %err, "failed to write data files; retrying")
                        }
                    }
                }
                tokio::time::sleep(WRITE_RETRY).await;
            }
        }
    }
}

impl Actor for Batcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.params.mailbox_capacity);
        let tick = (self.params.max_age / 4).max(Duration::from_millis(10));
        ctx.run_interval(tick, |act, ctx| {
            if act.is_old() {
                act.flush(ctx);
            }
        });
    }
}

impl Handler<TradeChunk> for Batcher {
    type Result = ();

    fn handle(&mut self, chunk: TradeChunk, ctx: &mut Context<Self>) {
        self.params
            .faults
            .check_panic(Stage::Batcher, chunk.lane.partition);
        let first = match self.range {
            Some((first, next)) => {
                if chunk.first_offset != next {
                    return self.fail(
                        ctx,
                        LaneError::NotContiguous {
                            expected: next,
                            first_offset: chunk.first_offset,
                        },
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
        self.publish_buffered(self.buffer.estimated_bytes());
        self.chunks += 1;
        if self.is_due() {
            if let Some(fut) = self.flush_future(chunk.caught_up) {
                ctx.wait(fut);
            }
        } else if chunk.caught_up && !self.params.idle_flush.is_zero() {
            // Kafka had nothing more: flush unless another chunk comes soon.
            let seen = self.chunks;
            ctx.run_later(self.params.idle_flush, move |act, ctx| {
                if act.chunks == seen
                    && let Some(fut) = act.flush_future(true)
                {
                    ctx.wait(fut);
                }
            });
        }
    }
}

impl Handler<Flush> for Batcher {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: Flush, _: &mut Context<Self>) -> Self::Result {
        let fut = self
            .flush_future(false)
            .unwrap_or_else(|| Box::pin(actix::fut::ready(())));
        AtomicResponse::new(fut)
    }
}

impl Handler<StopLane> for Batcher {
    type Result = ();

    fn handle(&mut self, _: StopLane, ctx: &mut Context<Self>) {
        self.publish_buffered(0);
        ctx.stop();
    }
}

impl Handler<LevelChanged> for Batcher {
    type Result = ();

    fn handle(&mut self, msg: LevelChanged, _: &mut Context<Self>) {
        self.growth = growth_at(msg.level, self.params.soft_growth);
    }
}
