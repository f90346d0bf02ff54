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
use crate::pending::CommitSchedule;
use crate::query::live::LiveLane;
use crate::storage::writer::TableWriter;
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
    /// The buffer, shared with live queries (`query::live`).
    pub live: Arc<LiveLane>,
    /// When the next commit is due: at NORMAL a buffer is flushed just
    /// before it, whatever its age.
    pub commit_schedule: Arc<CommitSchedule>,
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
    /// Rows collected for the next flush, and flushed rows until their
    /// commit, readable by live queries.
    buffer: Arc<LiveLane>,
    side: SideRows,
    /// Offset range covered by the buffer.
    range: Option<(i64, i64)>,
    oldest: Option<Instant>,
    /// Chunks received, so an idle flush can tell whether another came.
    chunks: u64,
    /// Flushes started, so a commit's flush can tell whether one came first.
    flushes: u64,
    /// The commit (its due, unix ms) the last commit's flush was for.
    served_due: i64,
    /// The buffer's last chunk ended where Kafka's log did: whatever
    /// flushes it (the idle flush, age, size) tells the committer so.
    caught_up: bool,
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
            buffer: params.live.clone(),
            partition_label: params.lane.partition.to_string(),
            params,
            writer,
            committer,
            supervisor,
            side: SideRows::default(),
            range: None,
            oldest: None,
            chunks: 0,
            flushes: 0,
            served_due: 0,
            caught_up: false,
            growth,
            counters: BatcherCounters::default(),
        }
    }

    fn is_due(&self) -> bool {
        let g = self.growth;
        self.buffer.buffered_rows() >= self.params.max_rows * g as usize
            || self.buffer.buffered_bytes() >= self.params.max_bytes * g as u64
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
        if let Some(fut) = self.flush_future() {
            ctx.wait(fut);
        }
    }

    /// The flush as one actor future, so a `Flush` request can reply exactly
    /// when its files were accepted. The files are caught up when the
    /// buffer's last chunk was, whatever flushes them: an age flush that
    /// comes before the idle flush must not leave the range waiting out the
    /// commit interval.
    fn flush_future(&mut self) -> Option<ResponseActFuture<Self, ()>> {
        let (first_offset, next_offset) = self.range.take()?;
        self.flushes += 1;
        let caught_up = std::mem::take(&mut self.caught_up);
        self.oldest = None;
        let side = std::mem::take(&mut self.side);
        let rows = self.buffer.buffered_rows() as u64;
        let batches = if rows == 0 {
            Ok(None)
        } else {
            self.buffer
                .flush(self.writer.arrow_schema(), next_offset)
                .map(Some)
                .map_err(|err| LaneError::Start(format!("failed to build a record batch: {err}")))
        };
        self.publish_buffered(0);
        let writer = self.writer.clone();
        let committer = self.committer.clone();
        let storage = self.params.storage.clone();
        let faults = self.params.faults.clone();
        let lane = self.params.lane;
        let live = self.buffer.clone();
        let fut = async move {
            let data_files = match batches? {
                Some(batches) => write_until_stored(&writer, &storage, &faults, &batches, lane).await,
                None => Vec::new(),
            };
            let paths: Vec<String> = data_files.iter().map(|f| f.file_path().to_string()).collect();
            live.written(next_offset, &paths);
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

    /// Flushes the buffer (started by this flush count) in time for the
    /// next commit due by the interval, at NORMAL: the age flush alone let
    /// a trade wait up to a batch age and then a whole interval. Degraded
    /// levels keep their larger batches.
    fn flush_for_commit(&mut self, flushes: u64, ctx: &mut Context<Self>) {
        if self.flushes != flushes || self.growth > 1 {
            // Flushed meanwhile (its next buffer aims at a commit of its own).
            return;
        }
        let Some((due, at)) = self.params.commit_schedule.flush_at(self.served_due) else {
            return;
        };
        let wait = at - crate::model::now_us() / 1000;
        if wait > 0 {
            // The commit moved later (one ran early: rows, bytes, caught up).
            ctx.run_later(Duration::from_millis(wait as u64), move |act, ctx| {
                act.flush_for_commit(flushes, ctx)
            });
            return;
        }
        self.served_due = due;
        self.flush(ctx);
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
    batches: &[arrow_array::RecordBatch],
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
            writer.write_all(batches).await
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
        let started = self.oldest.is_none();
        self.oldest.get_or_insert_with(Instant::now);
        let buffered = self.buffer.push(&chunk.trades);
        self.side.extend(chunk.side);
        self.publish_buffered(buffered);
        self.chunks += 1;
        self.caught_up = chunk.caught_up;
        if self.is_due() {
            if let Some(fut) = self.flush_future() {
                ctx.wait(fut);
            }
        } else {
            if started {
                // At NORMAL only: flush_for_commit checks the level.
                self.flush_for_commit(self.flushes, ctx);
            }
            if chunk.caught_up && !self.params.idle_flush.is_zero() {
                // Kafka had nothing more: flush unless another chunk comes soon.
                let seen = self.chunks;
                ctx.run_later(self.params.idle_flush, move |act, ctx| {
                    if act.chunks == seen
                        && let Some(fut) = act.flush_future()
                    {
                        ctx.wait(fut);
                    }
                });
            }
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::breaker::BreakerConfig;
    use crate::config::CatalogConfig;
    use crate::storage::catalog::open_catalog;
    use crate::storage::tables::{TableIdents, ensure_tables};

    /// Keeps what the batcher hands the committer.
    struct Collector(Arc<Mutex<Vec<FilesWritten>>>);

    impl Actor for Collector {
        type Context = Context<Self>;
    }

    impl Handler<FilesWritten> for Collector {
        type Result = ();

        fn handle(&mut self, files: FilesWritten, _: &mut Context<Self>) {
            self.0.lock().unwrap().push(files);
        }
    }

    struct Failures;

    impl Actor for Failures {
        type Context = Context<Self>;
    }

    impl Handler<LaneFailed> for Failures {
        type Result = ();

        fn handle(&mut self, failed: LaneFailed, _: &mut Context<Self>) {
            panic!("the batcher failed: {failed:?}");
        }
    }

    /// A batcher that flushes by age after 50 ms and would flush an idle
    /// caught-up buffer only after a minute; returns it and what it sent.
    async fn batcher(dir: &std::path::Path) -> (Addr<Batcher>, Arc<Mutex<Vec<FilesWritten>>>) {
        let schedule = Arc::new(CommitSchedule::new(Duration::from_secs(2)));
        batcher_with(dir, Duration::from_millis(50), schedule).await
    }

    async fn batcher_with(
        dir: &std::path::Path,
        max_age: Duration,
        commit_schedule: Arc<CommitSchedule>,
    ) -> (Addr<Batcher>, Arc<Mutex<Vec<FilesWritten>>>) {
        let config = CatalogConfig::sqlite_in(dir);
        let catalog = open_catalog(&config, dir).await.unwrap();
        let idents = TableIdents::new(&config.namespace);
        ensure_tables(catalog.as_ref(), &idents).await.unwrap();
        let table = catalog.load_table(&idents.trades).await.unwrap();
        let writer = TableWriter::new(&table, 1, 64 << 20).unwrap();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let collector = Collector(sent.clone()).start();
        let params = BatcherParams {
            lane: LaneId {
                partition: 3,
                incarnation: 1,
            },
            max_rows: 1_000_000,
            max_bytes: 1 << 30,
            max_age,
            idle_flush: Duration::from_secs(60),
            mailbox_capacity: 2,
            soft_growth: 1,
            level: DegradationLevel::Normal,
            storage: Arc::new(CircuitBreaker::new("storage", &BreakerConfig::default())),
            status: Arc::new(LaneStatus::default()),
            faults: Arc::new(crate::faults::Faults::default()),
            live: LiveLane::detached(LaneId {
                partition: 3,
                incarnation: 1,
            }),
            commit_schedule,
        };
        let batcher = Batcher::new(
            params,
            writer,
            collector.recipient(),
            Failures.start().recipient(),
        );
        (batcher.start(), sent)
    }

    fn chunk(first_offset: i64, next_offset: i64, caught_up: bool) -> TradeChunk {
        TradeChunk {
            lane: LaneId {
                partition: 3,
                incarnation: 1,
            },
            first_offset,
            next_offset,
            trades: Vec::new(),
            shed_symbols: Vec::new(),
            side: SideRows::default(),
            caught_up,
        }
    }

    /// Waits (at most 10 s) until the batcher has sent `n` flushes; returns
    /// their ranges and caught-up flags.
    async fn flushes(sent: &Mutex<Vec<FilesWritten>>, n: usize) -> Vec<(i64, i64, bool)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got: Vec<_> = sent
                .lock()
                .unwrap()
                .iter()
                .map(|f| (f.first_offset, f.next_offset, f.caught_up))
                .collect();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[actix_rt::test]
    async fn an_age_flush_of_a_caught_up_buffer_says_it_is_caught_up() {
        let dir = tempfile::tempdir().unwrap();
        let (batcher, sent) = batcher(dir.path()).await;
        // Not caught up: the age flush says so.
        batcher.send(chunk(0, 10, false)).await.unwrap();
        assert_eq!(flushes(&sent, 1).await, [(0, 10, false)]);
        // The lane read to the high watermark; the age flush comes long
        // before the idle one and carries the news, or the committer would
        // wait out its interval for this range.
        batcher.send(chunk(10, 20, false)).await.unwrap();
        batcher.send(chunk(20, 30, true)).await.unwrap();
        assert_eq!(flushes(&sent, 2).await, [(0, 10, false), (10, 30, true)]);
        // A later chunk that is not caught up starts over.
        batcher.send(chunk(30, 40, false)).await.unwrap();
        assert_eq!(flushes(&sent, 3).await[2], (30, 40, false));
    }

    #[actix_rt::test]
    async fn a_buffer_is_flushed_for_the_commit_due_whatever_its_age() {
        let dir = tempfile::tempdir().unwrap();
        // An interval of 1 s: flushes 100 ms before the due. Ages never flush.
        let schedule = Arc::new(CommitSchedule::new(Duration::from_secs(1)));
        let (batcher, sent) = batcher_with(dir.path(), Duration::from_secs(3600), schedule.clone()).await;
        let now_ms = || crate::model::now_us() / 1000;
        let start = now_ms();
        schedule.set_next_due(start + 600);
        batcher.send(chunk(0, 10, false)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            sent.lock().unwrap().is_empty(),
            "flushed long before the commit was due"
        );
        assert_eq!(flushes(&sent, 1).await, [(0, 10, false)]);
        assert!(now_ms() >= start + 500, "flushed before the lead");
        // Rows after that flush wait for the next commit: none published
        // yet, so an interval after the one served (flush at +1500 ms).
        batcher.send(chunk(10, 20, false)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sent.lock().unwrap().len(), 1, "flushed twice for one commit");
        // The commit ran late: the next is due later than that estimate.
        schedule.set_next_due(start + 2_000);
        assert_eq!(flushes(&sent, 2).await, [(0, 10, false), (10, 20, false)]);
        assert!(
            now_ms() >= start + 1_900,
            "flushed before the lead of the commit published"
        );
    }
}
