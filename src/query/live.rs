//! The trades K2 has consumed and not yet committed, readable by queries.
//!
//! Each lane's batcher keeps its buffer in a [`LiveLane`]: the rows it is
//! still collecting, and the batches it flushed whose files wait for a
//! commit. Both sit behind one short lock, so a flush moves rows from the
//! buffer to the flushed list atomically: a reader of a lane sees each row
//! once, whatever the batcher is doing. The committer drops a lane's flushed
//! batches once a commit that covers them is in the catalog
//! ([`LiveRows::committed`]); a query reads the lanes *before* it loads the
//! table and keeps, per partition, only the live rows at or above the offset
//! the table's snapshot records (`crate::query::Cut`). A row is in the
//! snapshot or in the live rows, never both and never neither.
//!
//! A flushed batch shares its Arrow buffers with the batch being written, so
//! keeping it until the commit costs no copy, but it holds that memory until
//! the commit. All lanes together keep at most `query.max_live_bytes` of
//! flushed batches: a lane whose flush would pass the bound drops what it
//! keeps and is *incomplete* until a commit covers everything it flushed (a
//! query then fails with the reason rather than miss those rows).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arrow_array::{Int64Array, RecordBatch};
use arrow_schema::{ArrowError, SchemaRef};

use crate::messages::LaneId;
use crate::model::Trade;
use crate::query::recent::RecentFiles;
use crate::query::table::ManifestCache;
use crate::storage::writer::TradeBuffer;

/// Every lane's live rows, by partition: the newest incarnation of each.
pub struct LiveRows {
    lanes: Mutex<HashMap<i32, Arc<LiveLane>>>,
    budget: Arc<Budget>,
    /// Where a committed batch goes, by the path of the file written from it.
    recent: Arc<RecentFiles>,
    /// The trades table's parsed manifests, shared by the queries and table
    /// maintenance, which stages a rewrite's before it commits.
    manifests: Arc<ManifestCache>,
}

/// Bytes of flushed batches all lanes keep, against their bound.
#[derive(Debug)]
struct Budget {
    max_bytes: u64,
    held: AtomicU64,
}

impl Budget {
    fn take(&self, bytes: u64) -> bool {
        let before = self.held.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes > self.max_bytes {
            self.held.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn give(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// A query cannot have a lane's live rows.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error(
        "partition {partition} holds more rows waiting for a commit than query.max_live_bytes keeps \
         (up to offset {until}); they are queryable again once committed"
    )]
    Incomplete { partition: i32, until: i64 },
    #[error(transparent)]
    Arrow(#[from] ArrowError),
}

impl LiveRows {
    /// Lanes keep at most `max_bytes` of flushed batches between them and
    /// hand what a commit covers to `recent`.
    pub fn new(max_bytes: u64, recent: Arc<RecentFiles>) -> Arc<Self> {
        Arc::new(Self {
            lanes: Mutex::new(HashMap::new()),
            budget: Arc::new(Budget {
                max_bytes,
                held: AtomicU64::new(0),
            }),
            recent,
            manifests: Arc::default(),
        })
    }

    /// The files committed lately, kept while queries come.
    pub fn recent(&self) -> &Arc<RecentFiles> {
        &self.recent
    }

    /// The trades table's manifests, parsed once for every query.
    pub fn manifests(&self) -> &Arc<ManifestCache> {
        &self.manifests
    }

    /// Bytes of flushed batches the lanes keep now.
    pub fn held_bytes(&self) -> u64 {
        self.budget.held.load(Ordering::Relaxed)
    }

    fn lanes(&self) -> MutexGuard<'_, HashMap<i32, Arc<LiveLane>>> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The buffer of a new lane. It replaces an older incarnation's: the
    /// committer dropped that lane's uncommitted files when the new one
    /// registered, and the new lane reads them again from Kafka.
    pub fn open(&self, lane: LaneId) -> Arc<LiveLane> {
        let keep = Keep {
            budget: self.budget.clone(),
            recent: self.recent.clone(),
        };
        let live = Arc::new(LiveLane::new(lane, Some(keep)));
        let mut lanes = self.lanes();
        match lanes.get(&lane.partition) {
            Some(current) if current.lane.incarnation > lane.incarnation => {}
            _ => {
                lanes.insert(lane.partition, live.clone());
            }
        }
        live
    }

    /// The partition left this process: its rows are another's now.
    pub fn release(&self, partition: i32) {
        self.lanes().remove(&partition);
    }

    /// A commit up to `next_offset` of `partition` is in the catalog.
    pub fn committed(&self, partition: i32, next_offset: i64) {
        let lane = self.lanes().get(&partition).cloned();
        if let Some(lane) = lane {
            lane.committed(next_offset);
        }
    }

    /// Every lane's rows at this moment, each lane read under its own lock.
    pub fn snapshot(&self, schema: &SchemaRef) -> Result<Vec<PartitionRows>, LiveError> {
        let lanes: Vec<Arc<LiveLane>> = self.lanes().values().cloned().collect();
        lanes.iter().map(|lane| lane.snapshot(schema)).collect()
    }
}

/// One partition's live rows, as read at one moment.
#[derive(Debug, Clone)]
pub struct PartitionRows {
    pub partition: i32,
    pub batches: Vec<RecordBatch>,
}

impl PartitionRows {
    /// The rows at or above `from_offset` (the table holds the rest).
    pub fn from_offset(self, from_offset: Option<i64>) -> Result<Vec<RecordBatch>, ArrowError> {
        let Some(from) = from_offset else {
            return Ok(self.batches);
        };
        let mut kept = Vec::with_capacity(self.batches.len());
        for batch in self.batches {
            let offsets = batch
                .column_by_name("kafka_offset")
                .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
                .ok_or_else(|| ArrowError::SchemaError("live rows without kafka_offset".into()))?;
            // Offsets rise through a lane's batches: most are wholly in or out.
            let n = offsets.len();
            if n == 0 || offsets.value(n - 1) < from {
                continue;
            }
            if offsets.value(0) >= from {
                kept.push(batch);
                continue;
            }
            let mask = arrow_ord::cmp::gt_eq(offsets, &Int64Array::new_scalar(from))?;
            kept.push(arrow_select::filter::filter_record_batch(&batch, &mask)?);
        }
        Ok(kept)
    }
}

/// A lane's buffer and its flushed, uncommitted batches, behind one lock.
pub struct LiveLane {
    lane: LaneId,
    inner: Mutex<LiveInner>,
}

struct LiveInner {
    buffer: TradeBuffer,
    /// Batches flushed and not yet committed, oldest first.
    flushed: VecDeque<Flushed>,
    /// Where flushed batches are accounted and committed ones go; None:
    /// none are kept (a lane outside a pipeline, as in a stage's unit test,
    /// has no reader).
    keep: Option<Keep>,
    /// The lane dropped flushed rows below this offset to stay in budget:
    /// its live rows are incomplete until a commit reaches it.
    incomplete_until: Option<i64>,
}

struct Keep {
    budget: Arc<Budget>,
    recent: Arc<RecentFiles>,
}

struct Flushed {
    /// The offset after the batch's last row.
    end: i64,
    bytes: u64,
    /// The flush's rows, one batch per chunk of the buffer.
    batches: Vec<RecordBatch>,
    /// The data file written from the batch, once stored (None as well when
    /// the flush was split into several files).
    file: Option<String>,
}

impl Drop for LiveInner {
    fn drop(&mut self) {
        if let Some(keep) = &self.keep {
            keep.budget.give(self.flushed.iter().map(|f| f.bytes).sum());
        }
    }
}

impl std::fmt::Debug for LiveLane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveLane")
            .field("lane", &self.lane)
            .finish_non_exhaustive()
    }
}

impl LiveLane {
    fn new(lane: LaneId, keep: Option<Keep>) -> Self {
        Self {
            lane,
            inner: Mutex::new(LiveInner {
                // Chunks of 2,048 rows: a flushed batch is charged to
                // `query.max_live_bytes` for what its buffers hold, its last
                // chunk's room included. A buffer pre-sized for 65,536 rows
                // held ~7.5 MiB from a lane's first flush, so with 64 lanes
                // about half the first batches passed the 256 MiB default
                // and queries refused those partitions until their first
                // commit.
                buffer: TradeBuffer::new(),
                flushed: VecDeque::new(),
                keep,
                incomplete_until: None,
            }),
        }
    }

    /// A buffer no query reads: flushed batches are not kept.
    pub fn detached(lane: LaneId) -> Arc<Self> {
        Arc::new(Self::new(lane, None))
    }

    fn inner(&self) -> MutexGuard<'_, LiveInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends trades to the buffer; returns its estimated bytes after.
    pub fn push(&self, trades: &[Trade]) -> u64 {
        let mut inner = self.inner();
        for trade in trades {
            inner.buffer.push(trade);
        }
        inner.buffer.estimated_bytes()
    }

    pub fn buffered_rows(&self) -> usize {
        self.inner().buffer.len()
    }

    pub fn buffered_bytes(&self) -> u64 {
        self.inner().buffer.estimated_bytes()
    }

    /// Takes the buffer as batches (one per chunk), to write; they stay
    /// readable as a flushed batch, ending before `next_offset`, until a
    /// commit covers it.
    pub fn flush(&self, schema: &SchemaRef, next_offset: i64) -> Result<Vec<RecordBatch>, ArrowError> {
        let mut guard = self.inner();
        let inner = &mut *guard;
        let batches = inner.buffer.finish(schema)?;
        let Some(Keep { budget, .. }) = &inner.keep else {
            return Ok(batches);
        };
        let bytes = batches.iter().map(|b| b.get_array_memory_size() as u64).sum();
        if inner.incomplete_until.is_none() && budget.take(bytes) {
            inner.flushed.push_back(Flushed {
                end: next_offset,
                bytes,
                batches: batches.clone(),
                file: None,
            });
        } else {
            if inner.incomplete_until.is_none() {
                tracing::warn!(
                    lane = %self.lane,
                    held = budget.held.load(Ordering::Relaxed),
                    max = budget.max_bytes,
                    "rows waiting for a commit passed query.max_live_bytes: \
                     queries refuse this partition until they are committed"
                );
            }
            budget.give(inner.flushed.drain(..).map(|f| f.bytes).sum());
            inner.incomplete_until = Some(next_offset);
        }
        Ok(batches)
    }

    /// The batch flushed up to `next_offset` was written as `files`.
    pub fn written(&self, next_offset: i64, files: &[String]) {
        let mut inner = self.inner();
        if let [file] = files
            && let Some(flushed) = inner.flushed.iter_mut().rev().find(|f| f.end == next_offset)
        {
            flushed.file = Some(file.clone());
        }
    }

    fn committed(&self, next_offset: i64) {
        let mut guard = self.inner();
        let inner = &mut *guard;
        let mut files = Vec::new();
        while inner.flushed.front().is_some_and(|f| f.end <= next_offset) {
            let Some(flushed) = inner.flushed.pop_front() else {
                break;
            };
            if let Some(keep) = &inner.keep {
                keep.budget.give(flushed.bytes);
                if let Some(file) = flushed.file {
                    files.push((file, flushed.batches));
                }
            }
        }
        if inner.incomplete_until.is_some_and(|until| until <= next_offset) {
            inner.incomplete_until = None;
        }
        // Outside the lane's lock: keeping copies the batch.
        let recent = inner.keep.as_ref().map(|keep| keep.recent.clone());
        drop(guard);
        if let Some(recent) = recent {
            for (file, batches) in files {
                recent.keep(file, &batches);
            }
        }
    }

    fn snapshot(&self, schema: &SchemaRef) -> Result<PartitionRows, LiveError> {
        let inner = self.inner();
        if let Some(until) = inner.incomplete_until {
            return Err(LiveError::Incomplete {
                partition: self.lane.partition,
                until,
            });
        }
        let mut batches: Vec<RecordBatch> = inner
            .flushed
            .iter()
            .flat_map(|f| f.batches.iter().cloned())
            .collect();
        batches.extend(inner.buffer.snapshot(schema)?);
        Ok(PartitionRows {
            partition: self.lane.partition,
            batches,
        })
    }

    #[cfg(test)]
    fn rows(&self) -> usize {
        let inner = self.inner();
        inner.buffer.len()
            + inner
                .flushed
                .iter()
                .flat_map(|f| &f.batches)
                .map(RecordBatch::num_rows)
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Side, Trade};

    fn trade(offset: i64) -> Trade {
        Trade {
            exchange: "BINANCE".into(),
            symbol: "BTCUSDT".into(),
            sequence: offset,
            trade_id: format!("t{offset}").into(),
            price: 100_000_000,
            quantity: 1,
            side: Side::Buy,
            event_time_us: 1_700_000_000_000_000 + offset,
            ingest_time_us: 1_700_000_000_000_000,
            partition: 3,
            offset,
        }
    }

    fn schema() -> SchemaRef {
        Arc::new(
            iceberg::arrow::schema_to_arrow_schema(&crate::storage::tables::trades_schema())
                .expect("the trades schema converts"),
        )
    }

    fn no_recent() -> Arc<RecentFiles> {
        RecentFiles::new(0, std::time::Duration::ZERO)
    }

    fn offsets(batches: &[RecordBatch]) -> Vec<i64> {
        batches
            .iter()
            .flat_map(|b| {
                let col = b.column_by_name("kafka_offset").unwrap();
                col.as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect()
    }

    fn lane(incarnation: u64) -> LaneId {
        LaneId {
            partition: 3,
            incarnation,
        }
    }

    #[test]
    fn a_row_is_live_from_its_push_until_a_commit_covers_it() {
        let rows = LiveRows::new(u64::MAX, no_recent());
        let schema = schema();
        let live = rows.open(lane(1));
        live.push(&[trade(10), trade(11)]);
        live.flush(&schema, 12).unwrap();
        live.push(&[trade(12)]);
        let read = |rows: &LiveRows| {
            let mut all = rows.snapshot(&schema).unwrap();
            assert_eq!(all.len(), 1);
            offsets(&all.pop().unwrap().batches)
        };
        assert_eq!(
            read(&rows),
            vec![10, 11, 12],
            "flushed and buffered rows, once each"
        );
        rows.committed(3, 11);
        assert_eq!(
            read(&rows),
            vec![10, 11, 12],
            "a commit short of the batch keeps it"
        );
        rows.committed(3, 12);
        assert_eq!(
            read(&rows),
            vec![12],
            "the committed batch left; the buffer stays"
        );
    }

    #[test]
    fn the_first_batches_of_64_lanes_fit_the_default_live_budget() {
        let rows = LiveRows::new(crate::config::QueryConfig::default().max_live_bytes, no_recent());
        let schema = schema();
        let lanes: Vec<_> = (0..64)
            .map(|partition| {
                rows.open(LaneId {
                    partition,
                    incarnation: 1,
                })
            })
            .collect();
        for live in &lanes {
            let chunk: Vec<Trade> = (0..2_000).map(trade).collect();
            live.push(&chunk);
            live.flush(&schema, 2_000).unwrap();
        }
        // One chunk is ~250 KB as Arrow: 64 of them are ~16 MB, far below
        // 256 MiB, and no partition may be refused for it.
        assert!(rows.held_bytes() < 64 * 1024 * 1024, "held {}", rows.held_bytes());
        let parts = rows.snapshot(&schema).unwrap();
        assert_eq!(parts.len(), 64);
    }

    #[test]
    fn rows_below_the_snapshot_offset_are_left_to_the_table() {
        let rows = LiveRows::new(u64::MAX, no_recent());
        let schema = schema();
        let live = rows.open(lane(1));
        live.push(&[trade(10), trade(11)]);
        live.flush(&schema, 12).unwrap();
        live.push(&[trade(12), trade(13)]);
        let part = rows.snapshot(&schema).unwrap().pop().unwrap();
        assert_eq!(
            offsets(&part.clone().from_offset(None).unwrap()),
            vec![10, 11, 12, 13]
        );
        assert_eq!(
            offsets(&part.clone().from_offset(Some(11)).unwrap()),
            vec![11, 12, 13]
        );
        assert_eq!(
            offsets(&part.clone().from_offset(Some(12)).unwrap()),
            vec![12, 13]
        );
        assert!(part.from_offset(Some(14)).unwrap().is_empty());
    }

    #[test]
    fn a_new_incarnation_replaces_the_old_lane_and_an_older_one_does_not() {
        let rows = LiveRows::new(u64::MAX, no_recent());
        let schema = schema();
        let old = rows.open(lane(1));
        old.push(&[trade(10)]);
        let new = rows.open(lane(2));
        new.push(&[trade(20)]);
        let stale = rows.open(lane(1));
        stale.push(&[trade(30)]);
        let part = rows.snapshot(&schema).unwrap().pop().unwrap();
        assert_eq!(offsets(&part.batches), vec![20]);
        rows.release(3);
        assert!(rows.snapshot(&schema).unwrap().is_empty());
    }

    #[test]
    fn past_the_byte_bound_a_lane_is_refused_until_a_commit_covers_what_it_flushed() {
        let schema = schema();
        let one_batch = {
            let probe = LiveLane::detached(lane(1));
            probe.push(&[trade(10), trade(11)]);
            let batches = probe.flush(&schema, 12).unwrap();
            batches.iter().map(|b| b.get_array_memory_size() as u64).sum()
        };
        // Room for the first flushed batch and nothing more.
        let rows = LiveRows::new(one_batch, no_recent());
        let live = rows.open(lane(1));
        live.push(&[trade(10), trade(11)]);
        live.flush(&schema, 12).unwrap();
        assert_eq!(rows.held_bytes(), one_batch);
        live.push(&[trade(12), trade(13)]);
        live.flush(&schema, 14).unwrap();
        assert_eq!(rows.held_bytes(), 0, "the lane dropped what it kept");
        let refused = rows.snapshot(&schema).unwrap_err();
        assert!(
            matches!(
                refused,
                LiveError::Incomplete {
                    partition: 3,
                    until: 14
                }
            ),
            "{refused}"
        );
        live.push(&[trade(14)]);
        rows.committed(3, 12);
        assert!(
            rows.snapshot(&schema).is_err(),
            "offsets 12 and 13 are still nowhere"
        );
        rows.committed(3, 14);
        let part = rows.snapshot(&schema).unwrap().pop().unwrap();
        assert_eq!(offsets(&part.batches), vec![14]);
        // Keeping again, and giving back what it kept when it goes.
        live.flush(&schema, 15).unwrap();
        assert!(rows.held_bytes() > 0);
        rows.release(3);
        drop(live);
        assert_eq!(rows.held_bytes(), 0);
    }

    #[test]
    fn a_committed_batch_is_kept_by_its_file_while_queries_come() {
        let schema = schema();
        let recent = RecentFiles::new(u64::MAX, std::time::Duration::from_secs(60));
        let rows = LiveRows::new(u64::MAX, recent.clone());
        let live = rows.open(lane(1));
        recent.queried();
        live.push(&[trade(10), trade(11)]);
        live.flush(&schema, 12).unwrap();
        live.written(12, &["file-a".to_string()]);
        live.push(&[trade(12)]);
        live.flush(&schema, 13).unwrap();
        live.written(13, &["file-b".to_string(), "file-c".to_string()]);
        rows.committed(3, 13);
        let kept = recent.get("file-a").expect("the batch of file-a");
        assert_eq!(offsets(&[kept]), vec![10, 11]);
        assert!(
            recent.get("file-b").is_none() && recent.get("file-c").is_none(),
            "a batch split into two files stands for neither"
        );
        assert_eq!(rows.held_bytes(), 0, "the live budget got its bytes back");
    }

    #[test]
    fn a_detached_lane_keeps_no_flushed_batch() {
        let schema = schema();
        let live = LiveLane::detached(lane(1));
        live.push(&[trade(10)]);
        live.flush(&schema, 11).unwrap();
        assert_eq!(live.rows(), 0);
    }
}
