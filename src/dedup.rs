//! Deduplication of (exchange, symbol, trade id). The symbol is part of the
//! key: Binance numbers trades per symbol.
//!
//! A record is dropped only when the very same key was seen: never on a hash
//! match. Two kinds of ids:
//! - [`OrderedIds`] for numeric ids that increase per symbol (exchange trade
//!   ids, feed sequence numbers): exact, a per-symbol run of contiguous ids
//!   seen plus a compressed bitmap of the ids seen outside it. Memory grows
//!   with symbols and holes, not with messages. Per lane, persisted with the
//!   lane's state at every commit epoch ([`crate::state`]).
//! - Any other id: an exact recent window ([`UnorderedWindows`]: an LRU
//!   cache of keys in commit order, expired after a TTL, default 1 h) and, for the long window (default 24 h), Bloom filters by
//!   event hour ([`crate::bloom`]). A Bloom hit the exact window cannot
//!   confirm is a *probable* duplicate: kept and recorded (or dropped and
//!   recorded, by policy), never silently dropped. Both windows hold
//!   committed ids only and are shared by the process's lanes; ids of an
//!   uncommitted epoch wait in the lane ([`LaneIds`]), so a rewind discards
//!   them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;

use roaring::RoaringTreemap;
use serde::{Deserialize, Serialize};

use crate::bloom::{LongWindow, LongWindowConfig};
use crate::model::Trade;
use crate::per_symbol::PerSymbol;
use crate::state::{Checkpoint, EpochState, Replay, Staged, lock};

/// The `[dedup]` config section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    /// How long an id without order stays in the exact recent window.
    pub recent_window_s: u64,
    /// Most ids the recent window holds (the oldest go first beyond it).
    pub recent_max_entries: u64,
    /// `keep`: a probable duplicate stays in the trades table; `drop`: it is
    /// left out. Either way it is recorded in `k2.probable_duplicates`.
    pub probable_duplicates: ProbablePolicy,
    /// Bloom filters by event hour for ids without order.
    pub long_window: LongWindowConfig,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            recent_window_s: 3_600,
            recent_max_entries: 10_000_000,
            probable_duplicates: ProbablePolicy::Keep,
            long_window: LongWindowConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbablePolicy {
    Keep,
    Drop,
}

/// What the deduplicator makes of one record's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdVerdict {
    New,
    /// The same key was seen: dropped.
    Duplicate,
    /// Only the Bloom filter has seen it.
    ProbableDuplicate,
}

/// Where a committed key came from, and when it entered the window.
#[derive(Debug, Clone, Copy)]
struct Seen {
    inserted: Instant,
    partition: i32,
    offset: i64,
}

/// The exact recent window: committed keys for `ttl`, at most `capacity`
/// of them. Keys enter once, in commit order, and lookups do not reorder
/// them, so the cache's least recently used end holds the oldest keys and
/// expiry is eviction from that end.
struct RecentWindow {
    keys: LruCache<Box<str>, Seen>,
    ttl: Duration,
    capacity: usize,
}

impl RecentWindow {
    fn contains(&self, key: &str, now: Instant) -> bool {
        self.keys
            .peek(key)
            .is_some_and(|seen| now.saturating_duration_since(seen.inserted) < self.ttl)
    }

    fn insert(&mut self, key: Box<str>, seen: Seen) {
        let now = seen.inserted;
        self.keys.put(key, seen);
        while self.keys.len() > self.capacity
            || self
                .keys
                .peek_lru()
                .is_some_and(|(_, seen)| now.saturating_duration_since(seen.inserted) >= self.ttl)
        {
            self.keys.pop_lru();
        }
    }

    /// Removes the keys of `partition` at or above `from`; returns how many.
    fn forget(&mut self, partition: i32, from: i64) -> usize {
        let gone: Vec<Box<str>> = self
            .keys
            .iter()
            .filter(|(_, seen)| seen.partition == partition && seen.offset >= from)
            .map(|(key, _)| key.clone())
            .collect();
        for key in &gone {
            self.keys.pop(key);
        }
        gone.len()
    }
}

/// How far ahead of the clock an event time may be for its id to enter the
/// Bloom filters.
const MAX_BLOOM_LEAD_US: i64 = 3_600_000_000;

/// Committed ids without order, shared by a process's lanes.
///
/// Ids enter only after the commit that made them durable was verified. If
/// the table is later found behind what this process committed for a
/// partition (a commit the catalog reported and then lost), the ids of that
/// partition from the table's offset on are dropped from the exact window
/// ([`UnorderedWindows::forget`]), and, since a Bloom filter cannot forget,
/// a Bloom hit of a record in the range this process had committed is kept
/// whatever the policy: the replayed trades are never dropped for having
/// been seen before.
pub struct UnorderedWindows {
    recent: Mutex<RecentWindow>,
    long: LongWindow,
    /// Per partition, the highest committed offset whose id entered.
    highest: Mutex<HashMap<i32, i64>>,
    /// Per partition, offsets `[from, to)` whose Bloom hits are not trusted.
    suspect: Mutex<HashMap<i32, (i64, i64)>>,
}

impl UnorderedWindows {
    pub fn new(config: &DedupConfig) -> Self {
        Self {
            recent: Mutex::new(RecentWindow {
                keys: LruCache::unbounded(),
                ttl: Duration::from_secs(config.recent_window_s),
                capacity: usize::try_from(config.recent_max_entries).unwrap_or(usize::MAX),
            }),
            long: LongWindow::new(&config.long_window),
            highest: Mutex::new(HashMap::new()),
            suspect: Mutex::new(HashMap::new()),
        }
    }

    fn verdict(&self, key: &str, event_time_us: i64, partition: i32, offset: i64) -> IdVerdict {
        if lock(&self.recent).contains(key, Instant::now()) {
            IdVerdict::Duplicate
        } else if self.long.contains(key.as_bytes(), event_time_us) {
            let untrusted = lock(&self.suspect)
                .get(&partition)
                .is_some_and(|(from, to)| (*from..*to).contains(&offset));
            if untrusted {
                IdVerdict::New
            } else {
                IdVerdict::ProbableDuplicate
            }
        } else {
            IdVerdict::New
        }
    }

    /// The table stands at `from` for `partition`, behind what this process
    /// committed: drops the partition's ids at or above `from` from the
    /// exact window and stops trusting Bloom hits in the range this process
    /// had committed. Returns how many ids were dropped.
    pub fn forget(&self, partition: i32, from: i64) -> usize {
        let forgotten = lock(&self.recent).forget(partition, from);
        if let Some(highest) = lock(&self.highest).get(&partition).copied()
            && highest >= from
        {
            let mut suspect = lock(&self.suspect);
            let range = suspect.entry(partition).or_insert((from, highest + 1));
            *range = (range.0.min(from), range.1.max(highest + 1));
        }
        metrics::counter!(crate::metrics::WINDOW_IDS_FORGOTTEN).increment(forgotten as u64);
        forgotten
    }

    /// Moves committed keys into both windows, under one lock. A key whose
    /// event time is more than an hour ahead of the clock stays out of the
    /// Bloom filters: its hour would move their window on and drop the
    /// hours it should still cover (the decoder accepts a day of skew).
    fn commit(&self, partition: i32, keys: impl Iterator<Item = (Box<str>, i64, i64)>) {
        let now = Instant::now();
        let latest_hour_us = crate::model::now_us() + MAX_BLOOM_LEAD_US;
        let mut recent = lock(&self.recent);
        let mut highest = None;
        for (key, event_time_us, offset) in keys {
            if event_time_us <= latest_hour_us {
                self.long.insert(key.as_bytes(), event_time_us);
            }
            recent.insert(
                key,
                Seen {
                    inserted: now,
                    partition,
                    offset,
                },
            );
            highest = highest.max(Some(offset));
        }
        drop(recent);
        if let Some(offset) = highest {
            let mut highest = lock(&self.highest);
            let entry = highest.entry(partition).or_insert(offset);
            *entry = (*entry).max(offset);
        }
    }

    /// Ids in the recent window.
    pub fn recent_len(&self) -> usize {
        lock(&self.recent).keys.len()
    }

    pub fn long_window(&self) -> &LongWindow {
        &self.long
    }
}

/// One lane's dedup state: exact ordered ids (persisted per epoch) and the
/// ids without order of its uncommitted epochs.
pub struct LaneIds {
    pub ordered: EpochState<OrderedIds>,
    pending: HashSet<Box<str>>,
    pending_log: VecDeque<(i64, Box<str>, i64)>,
    windows: Arc<UnorderedWindows>,
    partition: i32,
    key: String,
}

impl LaneIds {
    pub fn new(scope: String, windows: Arc<UnorderedWindows>, partition: i32) -> Self {
        Self {
            ordered: EpochState::new(scope, OrderedIds::default),
            pending: HashSet::new(),
            pending_log: VecDeque::new(),
            windows,
            partition,
            key: String::new(),
        }
    }

    /// Classifies the trade's id and remembers it unless it is a duplicate
    /// (a probable duplicate is remembered only if `keep_probable`).
    pub fn check(&mut self, trade: &Trade, keep_probable: bool) -> IdVerdict {
        if let Some(id) = numeric_id(&trade.trade_id) {
            return if self.ordered.working.insert(&trade.exchange, &trade.symbol, id) {
                self.ordered
                    .record(trade.offset, &trade.exchange, &trade.symbol, id);
                IdVerdict::New
            } else {
                IdVerdict::Duplicate
            };
        }
        self.key.clear();
        self.key.push_str(&trade.exchange);
        self.key.push('\u{1f}');
        self.key.push_str(&trade.symbol);
        self.key.push('\u{1f}');
        self.key.push_str(&trade.trade_id);
        if self.pending.contains(self.key.as_str()) {
            return IdVerdict::Duplicate;
        }
        let verdict = self
            .windows
            .verdict(&self.key, trade.event_time_us, trade.partition, trade.offset);
        if verdict == IdVerdict::New || (verdict == IdVerdict::ProbableDuplicate && keep_probable) {
            let key: Box<str> = self.key.as_str().into();
            self.pending.insert(key.clone());
            self.pending_log
                .push_back((trade.offset, key, trade.event_time_us));
        }
        verdict
    }

    /// Ids without order waiting for their epoch's commit.
    pub fn pending_unordered(&self) -> usize {
        self.pending.len()
    }

    fn committed(&mut self, next_offset: i64, promoted: bool) {
        if promoted {
            self.ordered.promoted(next_offset);
        }
        let committed = self
            .pending_log
            .iter()
            .take_while(|(offset, ..)| *offset < next_offset)
            .count();
        let pending = &mut self.pending;
        self.windows.commit(
            self.partition,
            self.pending_log
                .drain(..committed)
                .map(|(offset, key, event_time_us)| {
                    pending.remove(&key);
                    (key, event_time_us, offset)
                }),
        );
    }
}

impl Checkpoint for Mutex<LaneIds> {
    fn stage(&self, next_offset: i64) -> Staged {
        lock(self).ordered.stage(next_offset)
    }

    fn stage_whole(&self, next_offset: i64) -> Staged {
        lock(self).ordered.stage_whole(next_offset)
    }

    fn committed(&self, next_offset: i64, promoted: bool) {
        lock(self).committed(next_offset, promoted);
    }
}

/// The id as a number if `trade_id` is the canonical decimal form of one
/// (digits only, no sign, no leading zero): only then are two equal numbers
/// the same string, which exactness needs.
pub fn numeric_id(trade_id: &str) -> Option<u64> {
    let bytes = trade_id.as_bytes();
    let canonical = !bytes.is_empty()
        && bytes.len() <= 19
        && bytes.iter().all(u8::is_ascii_digit)
        && (bytes[0] != b'0' || bytes.len() == 1);
    canonical.then(|| trade_id.parse().ok()).flatten()
}

/// Ids seen for one symbol: every id in `low..=high` plus those in `others`.
#[derive(Debug, Default)]
struct SymbolIds {
    run: Option<(u64, u64)>,
    others: RoaringTreemap,
    inserts_since_optimize: u32,
}

impl SymbolIds {
    /// Bitmap inserts between two run-length compactions of `others`.
    const OPTIMIZE_EVERY: u32 = 4_096;

    fn insert(&mut self, id: u64) -> bool {
        let Some((low, high)) = self.run else {
            self.run = Some((id, id));
            return true;
        };
        if (low..=high).contains(&id) || self.others.contains(id) {
            return false;
        }
        if high.checked_add(1) == Some(id) {
            let mut high = id;
            // Ids that arrived early join the run once the hole before them closes.
            while let Some(next) = high.checked_add(1)
                && self.others.remove(next)
            {
                high = next;
            }
            self.run = Some((low, high));
        } else if low.checked_sub(1) == Some(id) {
            let mut low = id;
            while let Some(previous) = low.checked_sub(1)
                && self.others.remove(previous)
            {
                low = previous;
            }
            self.run = Some((low, high));
        } else {
            self.others.insert(id);
            self.inserts_since_optimize += 1;
            if self.inserts_since_optimize >= Self::OPTIMIZE_EVERY {
                self.others.optimize();
                self.inserts_since_optimize = 0;
            }
        }
        true
    }

    /// Version 1: `[1, has_run, low (8 bytes LE), high (8 bytes LE), bitmap]`.
    fn encode(&self) -> Vec<u8> {
        let (has_run, (low, high)) = match self.run {
            Some(run) => (1, run),
            None => (0, (0, 0)),
        };
        let mut bytes = Vec::with_capacity(18 + self.others.serialized_size());
        bytes.extend([1, has_run]);
        bytes.extend(low.to_le_bytes());
        bytes.extend(high.to_le_bytes());
        self.others
            .serialize_into(&mut bytes)
            .expect("writing to a Vec cannot fail");
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < 18 || bytes[0] != 1 {
            return Err("not a version-1 id set".to_string());
        }
        let number = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let run = (bytes[1] == 1).then(|| (number(2), number(10)));
        let others = RoaringTreemap::deserialize_from(&bytes[18..]).map_err(|e| format!("bitmap: {e}"))?;
        Ok(Self {
            run,
            others,
            inserts_since_optimize: 0,
        })
    }

    fn bitmap_bytes(&self) -> usize {
        if self.others.is_empty() {
            0
        } else {
            self.others.serialized_size()
        }
    }
}

/// A lane's committed copy replays the ids its records added.
impl Replay for OrderedIds {
    type Op = u64;

    fn replay(&mut self, exchange: &str, symbol: &str, &id: &u64) {
        self.insert(exchange, symbol, id);
    }

    fn encode(&self, exchange: &str, symbol: &str) -> Option<Vec<u8>> {
        self.symbols.get(exchange, symbol).map(SymbolIds::encode)
    }

    fn decode(&mut self, exchange: &str, symbol: &str, bytes: &[u8]) -> Result<(), String> {
        *self.symbols.get_or_default(exchange, symbol) = SymbolIds::decode(bytes)?;
        Ok(())
    }
}

/// Exact dedup of numeric ids that increase per (exchange, symbol).
#[derive(Debug, Default)]
pub struct OrderedIds {
    symbols: PerSymbol<SymbolIds>,
}

impl OrderedIds {
    /// Records the id; returns false if it was seen before.
    pub fn insert(&mut self, exchange: &str, symbol: &str, id: u64) -> bool {
        self.symbols.get_or_default(exchange, symbol).insert(id)
    }

    pub fn symbols(&self) -> usize {
        self.symbols.len()
    }

    /// Bytes the bitmaps take in their serialized form, which is close to
    /// their heap size; per-symbol overhead (map entry, names, the run) is
    /// on top and constant per symbol.
    pub fn bitmap_bytes(&self) -> usize {
        self.symbols.values().map(SymbolIds::bitmap_bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trade(exchange: &str, symbol: &str, trade_id: &str, offset: i64) -> Trade {
        Trade {
            exchange: exchange.into(),
            symbol: symbol.into(),
            sequence: offset + 1,
            trade_id: trade_id.into(),
            price: 1,
            quantity: 1,
            side: crate::model::Side::Buy,
            event_time_us: crate::model::now_us(),
            ingest_time_us: crate::model::now_us(),
            partition: 0,
            offset,
        }
    }

    fn lane(windows: &Arc<UnorderedWindows>) -> LaneIds {
        LaneIds::new("test:0:dedup".into(), windows.clone(), 0)
    }

    fn windows() -> Arc<UnorderedWindows> {
        let config = DedupConfig {
            long_window: LongWindowConfig {
                window_hours: 2,
                capacity: 20_000,
                false_positive_rate: 0.001,
            },
            ..DedupConfig::default()
        };
        Arc::new(UnorderedWindows::new(&config))
    }

    #[test]
    fn unordered_keys_are_exact_per_exchange_and_symbol() {
        let windows = windows();
        let mut ids = lane(&windows);
        let mut check = |e, s, id| ids.check(&trade(e, s, id, 0), true);
        assert_eq!(check("ASX", "BHP", "BHP-1"), IdVerdict::New);
        assert_eq!(check("ASX", "BHP", "BHP-1"), IdVerdict::Duplicate);
        assert_eq!(check("CHIX", "BHP", "BHP-1"), IdVerdict::New);
        // The separator keeps ("AS", "XBHP") apart from ("ASX", "BHP").
        assert_eq!(check("AS", "XBHP", "BHP-1"), IdVerdict::New);
        // Binance numbers trades per symbol: BTCUSDT #7 and ETHUSDT #7 are two trades.
        assert_eq!(check("BINANCE", "BTCUSDT", "7"), IdVerdict::New);
        assert_eq!(check("BINANCE", "ETHUSDT", "7"), IdVerdict::New);
        assert_eq!(check("BINANCE", "ETHUSDT", "7"), IdVerdict::Duplicate);
    }

    /// Records at offsets 0..10, half with numeric ids, half without.
    fn records() -> Vec<Trade> {
        (0..10)
            .map(|offset| match offset % 2 {
                0 => trade("BINANCE", "BTCUSDT", &(100 + offset).to_string(), offset),
                _ => trade("ASX", "BHP", &format!("BHP-{offset}"), offset),
            })
            .collect()
    }

    /// A lane commits offsets below 5, sees 5..10, and is rebuilt from the
    /// store at 5: replaying 5..10 finds no duplicate (those ids were only
    /// pending), while a second copy of anything below 5 is one.
    #[actix_rt::test]
    async fn a_rewind_forgets_the_ids_of_uncommitted_epochs_and_keeps_committed_ones() {
        use crate::state::{MemoryStore, StateStore};
        let store = MemoryStore::default();
        let windows = windows();
        let first = Mutex::new(lane(&windows));
        for t in &records() {
            assert_eq!(lock(&first).check(t, true), IdVerdict::New);
        }
        let staged = first.stage(5);
        store.stage("w", std::slice::from_ref(&staged)).await.unwrap();
        store.promote("w", &[(staged.scope.clone(), 5)]).await.unwrap();
        first.committed(5, true);
        drop(first); // the lane fails; offsets 5.. are read again

        let rebuilt = Mutex::new(lane(&windows));
        let entries = store.load(&staged.scope, 5).await.unwrap().expect("state at 5");
        let mut ids = lock(&rebuilt);
        ids.ordered.restore(5, &entries).unwrap();
        for t in &records()[5..] {
            assert_eq!(ids.check(t, true), IdVerdict::New, "replayed {t:?}");
        }
        for t in &records()[..5] {
            assert_eq!(ids.check(t, true), IdVerdict::Duplicate, "committed {t:?}");
        }
    }

    #[test]
    fn a_bloom_hit_the_exact_window_cannot_confirm_is_a_probable_duplicate() {
        let windows = windows();
        let mut ids = lane(&windows);
        let t = trade("ASX", "BHP", "BHP-1", 0);
        assert_eq!(ids.check(&t, true), IdVerdict::New);
        ids.committed(1, true);
        assert_eq!(ids.check(&t, true), IdVerdict::Duplicate, "in the recent window");
        lock(&windows.recent).keys.clear();
        assert_eq!(ids.check(&t, false), IdVerdict::ProbableDuplicate);
        assert_eq!(ids.pending_unordered(), 0, "dropped by policy: not remembered");
        assert_eq!(ids.check(&t, true), IdVerdict::ProbableDuplicate);
        assert_eq!(ids.pending_unordered(), 1, "kept: a second copy is a duplicate");
        assert_eq!(ids.check(&t, true), IdVerdict::Duplicate);
    }

    #[test]
    fn the_recent_window_forgets_keys_after_their_ttl_or_beyond_its_capacity() {
        let mut window = RecentWindow {
            keys: LruCache::unbounded(),
            ttl: Duration::from_secs(10),
            capacity: 2,
        };
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let seen = |s| Seen {
            inserted: at(s),
            partition: 0,
            offset: s as i64,
        };
        window.insert("a".into(), seen(0));
        assert!(window.contains("a", at(9)));
        assert!(!window.contains("a", at(10)), "expired");
        window.insert("b".into(), seen(5));
        window.insert("c".into(), seen(6));
        assert_eq!(window.keys.len(), 2, "over capacity: the oldest went");
        assert!(!window.contains("a", at(6)) && window.contains("b", at(6)));
        window.insert("d".into(), seen(15));
        assert!(
            !window.contains("b", at(15)),
            "expired keys are evicted on insert"
        );
        assert_eq!(window.keys.len(), 2);
    }

    #[test]
    fn a_trade_stamped_far_ahead_does_not_move_the_bloom_window() {
        let windows = windows();
        let mut ids = lane(&windows);
        let now = crate::model::now_us();
        let mut today = trade("ASX", "BHP", "BHP-1", 0);
        today.event_time_us = now;
        let mut tomorrow = trade("ASX", "BHP", "BHP-2", 1);
        tomorrow.event_time_us = now + 86_400_000_000;
        ids.check(&today, true);
        ids.check(&tomorrow, true);
        ids.committed(2, true);
        assert_eq!(windows.long_window().generations(), 1, "only today's hour");
        lock(&windows.recent).keys.clear();
        assert_eq!(
            ids.check(&today, true),
            IdVerdict::ProbableDuplicate,
            "today's hour kept"
        );
    }

    #[test]
    fn ordered_ids_survive_encoding() {
        let mut ids = OrderedIds::default();
        for id in [1, 2, 3, 7, 9] {
            ids.insert("X", "S", id);
        }
        let bytes = ids.encode("X", "S").unwrap();
        let mut restored = OrderedIds::default();
        restored.decode("X", "S", &bytes).unwrap();
        for id in [1, 2, 3, 7, 9] {
            assert!(!restored.insert("X", "S", id), "{id} was seen");
        }
        assert!(restored.insert("X", "S", 8));
        assert!(restored.decode("X", "S", b"junk").is_err());
    }

    #[test]
    fn only_canonical_decimal_ids_are_numeric() {
        assert_eq!(numeric_id("0"), Some(0));
        assert_eq!(numeric_id("123"), Some(123));
        assert_eq!(numeric_id("18446744073709551615"), None, "20 digits");
        for odd in ["", "007", "+7", "-7", "7 ", "BHP-7", "1e3"] {
            assert_eq!(numeric_id(odd), None, "{odd:?}");
        }
    }

    #[test]
    fn ordered_ids_are_exact_per_symbol_in_any_arrival_order() {
        let mut ids = OrderedIds::default();
        for id in [10, 11, 13, 12, 9, 15] {
            assert!(ids.insert("BINANCE", "BTCUSDT", id), "{id} is new");
        }
        for id in [9, 10, 11, 12, 13, 15] {
            assert!(!ids.insert("BINANCE", "BTCUSDT", id), "{id} was seen");
        }
        assert!(ids.insert("BINANCE", "BTCUSDT", 14), "a hole is not a duplicate");
        assert!(
            ids.insert("BINANCE", "BTCUSDT", 8),
            "below everything seen is new"
        );
        assert!(ids.insert("BINANCE", "ETHUSDT", 10), "other symbol");
        assert!(ids.insert("OKX", "BTCUSDT", 10), "other exchange");
        assert_eq!(ids.symbols(), 3);
    }

    #[test]
    fn ids_that_close_a_hole_fold_into_the_run_and_leave_the_bitmap() {
        let mut ids = OrderedIds::default();
        ids.insert("X", "S", 1);
        for id in 3..=1_000 {
            ids.insert("X", "S", id);
        }
        assert!(ids.bitmap_bytes() > 0);
        ids.insert("X", "S", 2);
        assert_eq!(ids.bitmap_bytes(), 0);
        let symbol = ids.symbols.get("X", "S").expect("tracked");
        assert_eq!(symbol.run, Some((1, 1_000)));
        assert!(symbol.others.is_empty());
    }

    /// Memory per symbol: an in-order stream keeps nothing in the bitmap; a
    /// stream with 1% of ids never arriving keeps a few bytes per hole.
    #[test]
    fn memory_grows_with_holes_not_with_messages() {
        let mut in_order = OrderedIds::default();
        let mut holes = OrderedIds::default();
        for id in 1..=1_000_000u64 {
            in_order.insert("X", "S", id);
            if id % 100 != 0 {
                holes.insert("X", "S", id);
            }
        }
        assert_eq!(in_order.bitmap_bytes(), 0);
        let per_hole = holes.bitmap_bytes() as f64 / 10_000.0;
        println!(
            "1M ids, 10,000 holes: {} bitmap bytes, {per_hole:.2} per hole",
            holes.bitmap_bytes()
        );
        // 990,000 ids with 10,000 holes: run-length containers keep ~4 bytes per run.
        assert!(per_hole < 8.0, "{per_hole:.2} bytes per hole");
    }
}
