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
//! Each kept file carries an index of where each (exchange, symbol) starts
//! and ends in its sorted rows, so a query of one symbol passes over the
//! files without it at the cost of a lookup, and takes a slice of the rest.
//!
//! Files are kept only while queries come (`query.recent_idle_ms` after the
//! last), within `query.max_recent_bytes`, the oldest going first: a K2 that
//! nobody queries holds nothing here.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arrow_array::{Array, RecordBatch, StringArray};

#[derive(Debug)]
pub struct RecentFiles {
    max_bytes: u64,
    idle: Duration,
    inner: Mutex<Kept>,
}

#[derive(Debug, Default)]
struct Kept {
    /// Every query looks up every planned file here (thousands between two
    /// compactions): foldhash, not SipHash, over the paths.
    by_path: HashMap<String, KeptFile, foldhash::fast::RandomState>,
    /// Paths in the order they were kept, with their bytes.
    order: VecDeque<(String, u64)>,
    bytes: u64,
    last_query: Option<Instant>,
}

/// A kept file's rows, sorted by exchange, symbol and event time, and the
/// rows of each (exchange, symbol) in order; None when the batch has no
/// such string columns (nothing to narrow by).
#[derive(Debug)]
struct KeptFile {
    batch: RecordBatch,
    keys: Option<Vec<KeyRows>>,
    /// A bit for each symbol in `keys` ([`symbol_bit`]): a query of a
    /// symbol whose bit is clear passes the file over without searching
    /// its keys. A lane's file holds a few of the symbols, so most files a
    /// query plans are passed over here.
    symbols: u64,
}

/// The bit of [`KeptFile::symbols`] that stands for `symbol`.
fn symbol_bit(symbol: &str) -> u64 {
    1 << (foldhash::fast::FixedState::default().hash_one(symbol) & 63)
}

#[derive(Debug, PartialEq, Eq)]
struct KeyRows {
    exchange: Box<str>,
    symbol: Box<str>,
    start: usize,
    end: usize,
}

impl KeptFile {
    fn new(batch: RecordBatch) -> Self {
        let strings = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .filter(|c| c.null_count() == 0)
                .cloned()
        };
        let keys = strings("exchange")
            .zip(strings("symbol"))
            .map(|(exchanges, symbols)| {
                let mut keys: Vec<KeyRows> = Vec::new();
                for row in 0..batch.num_rows() {
                    let (exchange, symbol) = (exchanges.value(row), symbols.value(row));
                    match keys.last_mut() {
                        Some(last) if *last.exchange == *exchange && *last.symbol == *symbol => {
                            last.end = row + 1
                        }
                        _ => keys.push(KeyRows {
                            exchange: exchange.into(),
                            symbol: symbol.into(),
                            start: row,
                            end: row + 1,
                        }),
                    }
                }
                keys
            });
        // The index is only sound over rows sorted by (exchange, symbol).
        let sorted = keys.as_ref().is_none_or(|keys| {
            keys.windows(2)
                .all(|w| (&w[0].exchange, &w[0].symbol) < (&w[1].exchange, &w[1].symbol))
        });
        let keys = keys.filter(|_| sorted);
        let symbols = keys
            .iter()
            .flatten()
            .fold(0, |bits, key| bits | symbol_bit(&key.symbol));
        Self { keys, batch, symbols }
    }

    /// The rows with `exchange` and, given that, `symbol` (a symbol without
    /// its exchange narrows nothing).
    fn rows(&self, exchange: Option<&str>, symbol: Option<&str>) -> Held {
        let (Some(keys), Some(exchange)) = (&self.keys, exchange) else {
            return Held::Rows(self.batch.clone());
        };
        let (first, last) = match symbol {
            Some(symbol) if self.symbols & symbol_bit(symbol) == 0 => return Held::Nothing,
            Some(symbol) => {
                let at = keys.partition_point(|k| (&*k.exchange, &*k.symbol) < (exchange, symbol));
                (
                    at,
                    at + usize::from(
                        keys.get(at)
                            .is_some_and(|k| (&*k.exchange, &*k.symbol) == (exchange, symbol)),
                    ),
                )
            }
            None => (
                keys.partition_point(|k| &*k.exchange < exchange),
                keys.partition_point(|k| &*k.exchange <= exchange),
            ),
        };
        if first == last {
            return Held::Nothing;
        }
        let (start, end) = (keys[first].start, keys[last - 1].end);
        Held::Rows(self.batch.slice(start, end - start))
    }
}

/// What K2 holds of a data file, for one query.
#[derive(Debug)]
pub enum Held {
    /// Not held: the file is to be read.
    NotKept,
    /// Held, and none of its rows can match.
    Nothing,
    /// Held: the rows that may match.
    Rows(RecordBatch),
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
    pub fn keep(&self, path: String, batches: &[RecordBatch]) {
        {
            let mut kept = self.inner();
            if !self.wanted_by(&kept) {
                if !kept.by_path.is_empty() {
                    kept.clear();
                    metrics::gauge!(crate::metrics::QUERY_RECENT_BYTES).set(0.0);
                }
                return;
            }
        }
        // One batch, sorted, so that a query of one symbol takes a slice
        // (`crate::query::table`).
        let Some(first) = batches.first() else {
            return;
        };
        let Ok(batch) = crate::storage::writer::sorted_for_queries(&first.schema(), batches) else {
            return;
        };
        let bytes = batch.get_array_memory_size() as u64;
        self.hold(path, batch, bytes);
    }

    /// Whether files handed over now would be kept: a query came within
    /// `query.recent_idle_ms` and there is room at all.
    pub fn wanted(&self) -> bool {
        self.wanted_by(&self.inner())
    }

    fn wanted_by(&self, kept: &Kept) -> bool {
        self.max_bytes > 0 && kept.last_query.is_some_and(|at| at.elapsed() <= self.idle)
    }

    /// `batch` is the whole content of the data file at `path`, already in
    /// the order [`crate::storage::writer::sorted_for_queries`] gives (a
    /// compaction's output), costing `bytes` (a slice of a larger batch
    /// costs its share, not the whole buffer's). Kept like [`Self::keep`]'s,
    /// without sorting it again; if it is not in that order after all, it
    /// is kept without the index and read whole.
    pub fn keep_sorted(&self, path: String, batch: RecordBatch, bytes: u64) {
        if self.wanted() {
            self.hold(path, batch, bytes);
        }
    }

    /// Drops the files at `paths` (compaction replaced them, or they were
    /// never committed); a query that still plans one reads the file.
    pub fn forget<'a>(&self, paths: impl IntoIterator<Item = &'a str>) {
        let mut kept = self.inner();
        let mut gone = false;
        for path in paths {
            gone |= kept.by_path.remove(path).is_some();
        }
        if gone {
            let Kept {
                by_path,
                order,
                bytes,
                ..
            } = &mut *kept;
            order.retain(|(path, size)| {
                let stays = by_path.contains_key(path);
                if !stays {
                    *bytes -= size;
                }
                stays
            });
            metrics::gauge!(crate::metrics::QUERY_RECENT_BYTES).set(kept.bytes as f64);
        }
    }

    fn hold(&self, path: String, batch: RecordBatch, bytes: u64) {
        if bytes > self.max_bytes {
            return;
        }
        let file = KeptFile::new(batch);
        let mut kept = self.inner();
        if kept.by_path.insert(path.clone(), file).is_none() {
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

    /// The rows of the data file at `path`, if they are kept (queries take
    /// them through [`Self::rows`]).
    #[cfg(test)]
    pub fn get(&self, path: &str) -> Option<RecordBatch> {
        self.inner().by_path.get(path).map(|file| file.batch.clone())
    }

    /// The rows of the data file at `path` with `exchange` and, given that,
    /// `symbol` (a symbol without its exchange narrows nothing).
    pub fn rows(&self, path: &str, exchange: Option<&str>, symbol: Option<&str>) -> Held {
        match self.inner().by_path.get(path) {
            Some(file) => file.rows(exchange, symbol),
            None => Held::NotKept,
        }
    }

    /// `query.max_recent_bytes`.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
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
        recent.keep("a".into(), &[batch(1)]);
        assert!(recent.get("a").is_none(), "nobody queried");
        recent.queried();
        recent.keep("b".into(), &[batch(2)]);
        assert_eq!(recent.get("b"), Some(batch(2)));
        std::thread::sleep(Duration::from_millis(80));
        recent.keep("c".into(), &[batch(3)]);
        assert_eq!(recent.files(), 0, "idle: everything went");
        assert_eq!(recent.held_bytes(), 0);
    }

    #[test]
    fn a_kept_file_gives_the_rows_of_the_exchange_and_symbol_asked_for() {
        let batch = RecordBatch::try_from_iter([
            (
                "exchange",
                Arc::new(StringArray::from(vec!["A", "A", "A", "A", "B", "B"])) as _,
            ),
            (
                "symbol",
                Arc::new(StringArray::from(vec!["X", "Y", "Y", "Z", "Y", "Y"])) as _,
            ),
            (
                "kafka_offset",
                Arc::new(Int64Array::from(vec![0, 1, 2, 3, 4, 5])) as _,
            ),
        ])
        .unwrap();
        let file = KeptFile::new(batch);
        let offsets = |exchange: Option<&str>, symbol: Option<&str>| match file.rows(exchange, symbol) {
            Held::Rows(rows) => rows
                .column_by_name("kafka_offset")
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .values()
                .to_vec(),
            Held::Nothing => Vec::new(),
            Held::NotKept => unreachable!("the file is kept"),
        };
        assert_eq!(offsets(Some("A"), Some("Y")), vec![1, 2]);
        assert_eq!(offsets(Some("B"), Some("Y")), vec![4, 5]);
        assert_eq!(offsets(Some("A"), Some("Z")), vec![3]);
        assert_eq!(offsets(Some("A"), None), vec![0, 1, 2, 3]);
        assert_eq!(offsets(Some("B"), None), vec![4, 5]);
        assert!(matches!(file.rows(Some("A"), Some("W")), Held::Nothing));
        assert!(matches!(file.rows(Some("C"), Some("Y")), Held::Nothing));
        assert!(matches!(file.rows(Some("0"), None), Held::Nothing));
        assert_eq!(
            offsets(None, Some("Y")),
            vec![0, 1, 2, 3, 4, 5],
            "a symbol without its exchange narrows nothing"
        );
    }

    #[test]
    fn a_file_of_many_symbols_gives_each_its_rows_and_others_none() {
        // More symbols than the mask has bits: every bit set, so the keys
        // decide; then a file of a few, where the mask passes most over.
        let many: Vec<String> = (0..100).map(|i| format!("S{i:03}")).collect();
        let few: Vec<String> = ["S007", "S042", "S099"].map(String::from).to_vec();
        for symbols in [&many, &few] {
            let batch = RecordBatch::try_from_iter([
                (
                    "exchange",
                    Arc::new(StringArray::from(vec!["A"; symbols.len()])) as _,
                ),
                ("symbol", Arc::new(StringArray::from(symbols.clone())) as _),
            ])
            .unwrap();
            let file = KeptFile::new(batch);
            for i in 0..200 {
                let symbol = format!("S{i:03}");
                match file.rows(Some("A"), Some(&symbol)) {
                    Held::Rows(rows) => {
                        assert!(symbols.contains(&symbol), "{symbol} is not in the file");
                        assert_eq!(rows.num_rows(), 1);
                        let got = rows.column_by_name("symbol").unwrap();
                        let got = got.as_any().downcast_ref::<StringArray>().unwrap();
                        assert_eq!(got.value(0), symbol);
                    }
                    Held::Nothing => assert!(!symbols.contains(&symbol), "{symbol} was passed over"),
                    Held::NotKept => unreachable!("the file is kept"),
                }
            }
        }
    }

    #[test]
    fn rows_out_of_key_order_are_never_narrowed() {
        let batch = RecordBatch::try_from_iter([
            ("exchange", Arc::new(StringArray::from(vec!["A", "A", "A"])) as _),
            ("symbol", Arc::new(StringArray::from(vec!["Y", "X", "Y"])) as _),
        ])
        .unwrap();
        let file = KeptFile::new(batch);
        assert!(matches!(file.rows(Some("A"), Some("Y")), Held::Rows(rows) if rows.num_rows() == 3));
        let recent = RecentFiles::new(1 << 20, Duration::from_secs(60));
        assert!(matches!(recent.rows("nowhere", Some("A"), None), Held::NotKept));
    }

    #[test]
    fn forgotten_files_give_back_their_bytes_and_sorted_ones_are_charged_their_share() {
        let one = batch(1).get_array_memory_size() as u64;
        let recent = RecentFiles::new(1 << 20, Duration::from_secs(60));
        recent.keep_sorted("early".into(), batch(0), 7);
        assert_eq!(recent.files(), 0, "nobody queried yet");
        recent.queried();
        assert!(recent.wanted());
        recent.keep("a".into(), &[batch(1)]);
        recent.keep("b".into(), &[batch(2)]);
        recent.keep_sorted("c".into(), batch(3), 7);
        assert_eq!(recent.held_bytes(), 2 * one + 7);
        recent.forget(["a", "c", "never kept"]);
        assert_eq!(recent.held_bytes(), one);
        assert!(recent.get("a").is_none() && recent.get("c").is_none());
        assert_eq!(recent.get("b"), Some(batch(2)));
        // What is forgotten no longer counts against the bound.
        let bounded = RecentFiles::new(2 * one, Duration::from_secs(60));
        bounded.queried();
        bounded.keep("a".into(), &[batch(1)]);
        bounded.keep("b".into(), &[batch(2)]);
        bounded.forget(["a"]);
        bounded.keep("c".into(), &[batch(3)]);
        assert!(bounded.get("b").is_some() && bounded.get("c").is_some());
    }

    #[test]
    fn the_oldest_files_go_first_past_the_bound() {
        let one = batch(1).get_array_memory_size() as u64;
        let recent = RecentFiles::new(2 * one + one / 2, Duration::from_secs(60));
        recent.queried();
        recent.keep("a".into(), &[batch(1)]);
        recent.keep("b".into(), &[batch(2)]);
        recent.keep("c".into(), &[batch(3)]);
        assert!(recent.get("a").is_none());
        assert!(recent.get("b").is_some() && recent.get("c").is_some());
        assert_eq!(recent.held_bytes(), 2 * one);
        let huge = RecordBatch::try_from_iter([(
            "kafka_offset",
            Arc::new(Int64Array::from_iter_values(0..1_000)) as _,
        )])
        .unwrap();
        recent.keep("huge".into(), &[huge]);
        assert!(recent.get("huge").is_none(), "larger than the bound");
        assert_eq!(recent.held_bytes(), 2 * one);
    }
}
