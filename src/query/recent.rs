//! Files K2 committed a moment ago, kept in memory while queries come.
//!
//! Until maintenance compacts them, the newest part of the trades table is
//! K2's own small files: every lane writes one about once a second, each
//! holding its partition's mix of symbols, so their bounds prune little and
//! a query of the last minutes would open hundreds of them. K2 wrote those
//! files from Arrow batches it still holds at the commit (a lane's flushed
//! batches, [`crate::query::live`]); this keeps them a while longer, by file
//! path, and a query's scan takes a planned file's rows from here instead of
//! reading the file (`crate::query::table`).
//!
//! A batch stands for its file exactly: the file is what K2 wrote from it.
//! The scan uses it only for files the snapshot it reads lists, so a file
//! that compaction replaced is read in its compacted form, never twice.
//!
//! Files are kept only while queries come (`query.recent_idle_ms` after the
//! last), within `query.max_recent_bytes`, the oldest going first: a K2 that
//! nobody queries holds nothing here.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;

#[derive(Debug)]
pub struct RecentFiles {
    max_bytes: u64,
    idle: Duration,
    inner: Mutex<Kept>,
}

#[derive(Debug, Default)]
struct Kept {
    by_path: HashMap<String, RecordBatch>,
    /// Paths in the order they were kept, with their bytes.
    order: VecDeque<(String, u64)>,
    bytes: u64,
    last_query: Option<Instant>,
}

impl Kept {
    fn clear(&mut self) {
        self.by_path.clear();
        self.order.clear();
        self.bytes = 0;
    }
}

impl RecentFiles {
    /// Keeps at most `max_bytes` (0: nothing) while a query came within `idle`.
    pub fn new(max_bytes: u64, idle: Duration) -> Arc<Self> {
        Arc::new(Self {
            max_bytes,
            idle,
            inner: Mutex::new(Kept::default()),
        })
    }

    fn inner(&self) -> MutexGuard<'_, Kept> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A query is about to read: files committed from now on are kept.
    pub fn queried(&self) {
        self.inner().last_query = Some(Instant::now());
    }

    /// `batch` is the whole content of the data file at `path`, just
    /// committed. Kept, sorted by exchange, symbol and event time in buffers
    /// of its own size (a flushed batch has its builder's spare capacity),
    /// if a query came lately and it fits.
    pub fn keep(&self, path: String, batch: &RecordBatch) {
        {
            let mut kept = self.inner();
            let querying = kept.last_query.is_some_and(|at| at.elapsed() <= self.idle);
            if !querying || self.max_bytes == 0 {
                if !kept.by_path.is_empty() {
                    kept.clear();
                    metrics::gauge!(crate::metrics::QUERY_RECENT_BYTES).set(0.0);
                }
                return;
            }
        }
        // Sorted, so that a query of one symbol takes a slice (`crate::query::table`).
        let Ok(batch) = crate::storage::writer::sorted_for_queries(batch) else {
            return;
        };
        let bytes = batch.get_array_memory_size() as u64;
        if bytes > self.max_bytes {
            return;
        }
        let mut kept = self.inner();
        if kept.by_path.insert(path.clone(), batch).is_none() {
            kept.order.push_back((path, bytes));
            kept.bytes += bytes;
        }
        while kept.bytes > self.max_bytes {
            let Some((oldest, bytes)) = kept.order.pop_front() else {
                break;
            };
            kept.by_path.remove(&oldest);
            kept.bytes -= bytes;
        }
        metrics::gauge!(crate::metrics::QUERY_RECENT_BYTES).set(kept.bytes as f64);
    }

    /// The rows of the data file at `path`, if they are kept.
    pub fn get(&self, path: &str) -> Option<RecordBatch> {
        self.inner().by_path.get(path).cloned()
    }

    pub fn held_bytes(&self) -> u64 {
        self.inner().bytes
    }

    pub fn files(&self) -> usize {
        self.inner().by_path.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Int64Array;

    fn batch(n: i64) -> RecordBatch {
        RecordBatch::try_from_iter([("kafka_offset", Arc::new(Int64Array::from(vec![n])) as _)]).unwrap()
    }

    #[test]
    fn nothing_is_kept_until_a_query_comes_nor_after_it_went_idle() {
        let recent = RecentFiles::new(1 << 20, Duration::from_millis(50));
        recent.keep("a".into(), &batch(1));
        assert!(recent.get("a").is_none(), "nobody queried");
        recent.queried();
        recent.keep("b".into(), &batch(2));
        assert_eq!(recent.get("b"), Some(batch(2)));
        std::thread::sleep(Duration::from_millis(80));
        recent.keep("c".into(), &batch(3));
        assert_eq!(recent.files(), 0, "idle: everything went");
        assert_eq!(recent.held_bytes(), 0);
    }

    #[test]
    fn the_oldest_files_go_first_past_the_bound() {
        let one = batch(1).get_array_memory_size() as u64;
        let recent = RecentFiles::new(2 * one + one / 2, Duration::from_secs(60));
        recent.queried();
        recent.keep("a".into(), &batch(1));
        recent.keep("b".into(), &batch(2));
        recent.keep("c".into(), &batch(3));
        assert!(recent.get("a").is_none());
        assert!(recent.get("b").is_some() && recent.get("c").is_some());
        assert_eq!(recent.held_bytes(), 2 * one);
        let huge = RecordBatch::try_from_iter([(
            "kafka_offset",
            Arc::new(Int64Array::from_iter_values(0..1_000)) as _,
        )])
        .unwrap();
        recent.keep("huge".into(), &huge);
        assert!(recent.get("huge").is_none(), "larger than the bound");
        assert_eq!(recent.held_bytes(), 2 * one);
    }
}
