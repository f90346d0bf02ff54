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
//! - Any other id: an exact recent window ([`UnorderedWindows`]: keys in
//!   commit order, expired after a TTL, default 1 h, kept as 128-bit hashes
//!   ([`IdKey`]), under 40 bytes an id) and, for the long window (default
//!   24 h), Bloom filters by event hour ([`crate::bloom`]). A Bloom hit the exact window cannot
//!   confirm is a *probable* duplicate: kept and recorded (or dropped and
//!   recorded, by policy), never silently dropped. Both windows hold
//!   committed ids only and are shared by the process's lanes; ids of an
//!   uncommitted epoch wait in the lane ([`LaneIds`]), so a rewind discards
//!   them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roaring::RoaringTreemap;
use serde::{Deserialize, Serialize};

use crate::bloom::{LongWindow, LongWindowConfig};
use crate::chunked_log::ChunkedLog;
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

/// An id without order, as the windows keep it: a 128-bit hash of
/// (exchange, symbol, trade id), seeded per process.
///
/// Fixed width instead of the text: 16 bytes, no allocation, one
/// comparison. Two different keys collide with probability about
/// n² / 2¹²⁹, 1.5 · 10⁻²⁵ for the window's default 10M keys: a trade is
/// never dropped for a hash match in any practical sense, where a 64-bit
/// hash would collide once in ~10¹¹ trades. The seed is random per
/// process (the windows are not persisted), so ids crafted to collide
/// cannot be prepared in advance. The low half indexes hash tables, the
/// high half feeds the Bloom filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdKey {
    lo: u64,
    hi: u64,
}

impl IdKey {
    fn of(key: &[u8], seed: u64) -> Self {
        let hash = xxhash_rust::xxh3::xxh3_128_with_seed(key, seed);
        Self {
            lo: hash as u64,
            hi: (hash >> 64) as u64,
        }
    }
}

/// Entries of the recent window per chunk of its ring.
const CHUNK: usize = 4_096;

/// Keys that entered the recent window within a short span, in commit
/// order, as columns (28 bytes an entry, no padding).
struct Chunk {
    keys: Vec<IdKey>,
    partitions: Vec<i32>,
    /// The record's offset; [`DEAD`] once the entry left the window early.
    offsets: Vec<i64>,
    first: Instant,
    newest: Instant,
}

/// The offset of an entry that was forgotten or superseded.
const DEAD: i64 = -1;

/// The exact recent window: committed keys for `ttl`, at most `capacity`
/// of them.
///
/// Keys enter once, in commit order, into a ring of chunks; an index maps
/// each key to its ring position (a `u32`: the ring never spans 2³² entries).
/// About 28 bytes an entry in the ring plus 5 to 11 in the index (its load
/// between resizes): ≤ 40 bytes an id, against ~138 for an LRU cache of
/// boxed strings.
///
/// Time is kept per chunk, not per entry: a chunk takes keys for at most
/// `ttl / 64`, and leaves the window whole once its newest key is `ttl`
/// old. So a key stays at least `ttl` and at most `ttl · 65/64`: staying
/// longer only catches more duplicates.
struct RecentWindow {
    index: hashbrown::HashTable<u32>,
    chunks: VecDeque<Chunk>,
    /// Ring position of `chunks[0]`'s first entry.
    first_position: u64,
    /// Entries of `chunks[0]` already gone from the front.
    head: usize,
    /// Entries in the index.
    live: usize,
    ttl: Duration,
    capacity: usize,
}

impl RecentWindow {
    fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            index: hashbrown::HashTable::new(),
            chunks: VecDeque::new(),
            first_position: 0,
            head: 0,
            live: 0,
            ttl,
            // Positions are kept as u32 in the index: the ring spans fewer
            // than 2³² entries with room to spare.
            capacity: capacity.min(1 << 31),
        }
    }

    /// Chunk and slot of a ring position given as its low 32 bits.
    fn locate(&self, position: u32) -> (usize, usize) {
        let from_first = position.wrapping_sub(self.first_position as u32) as usize;
        (from_first / CHUNK, from_first % CHUNK)
    }

    fn key_at(chunks: &VecDeque<Chunk>, first_position: u64, position: u32) -> IdKey {
        let from_first = position.wrapping_sub(first_position as u32) as usize;
        chunks[from_first / CHUNK].keys[from_first % CHUNK]
    }

    fn find(&self, key: IdKey) -> Option<u32> {
        let (chunks, first) = (&self.chunks, self.first_position);
        self.index
            .find(key.lo, |&p| Self::key_at(chunks, first, p) == key)
            .copied()
    }

    fn contains(&self, key: IdKey, now: Instant) -> bool {
        self.find(key).is_some_and(|position| {
            let (chunk, _) = self.locate(position);
            now.saturating_duration_since(self.chunks[chunk].newest) < self.ttl
        })
    }

    fn insert(&mut self, key: IdKey, partition: i32, offset: i64, now: Instant) {
        if let Some(old) = self.find(key) {
            // The same trade committed from another partition: the newer
            // entry stands for it from now on.
            self.unindex(key, old);
        }
        let span = self.ttl / 64;
        let open = self
            .chunks
            .back()
            .is_some_and(|c| c.keys.len() < CHUNK && now.saturating_duration_since(c.first) < span);
        if !open {
            self.pad_last_chunk();
            self.chunks.push_back(Chunk {
                keys: Vec::new(),
                partitions: Vec::new(),
                offsets: Vec::new(),
                first: now,
                newest: now,
            });
        }
        let position = self.first_position + self.ring_len() as u64;
        let chunk = self.chunks.back_mut().expect("pushed above");
        chunk.keys.push(key);
        chunk.partitions.push(partition);
        chunk.offsets.push(offset);
        chunk.newest = chunk.newest.max(now);
        let (chunks, first) = (&self.chunks, self.first_position);
        self.index
            .insert_unique(key.lo, position as u32, |&p| Self::key_at(chunks, first, p).lo);
        self.live += 1;
        self.evict(now);
    }

    /// Entries the ring holds, from position `first_position` on.
    fn ring_len(&self) -> usize {
        match self.chunks.len() {
            0 => 0,
            n => (n - 1) * CHUNK + self.chunks[n - 1].keys.len(),
        }
    }

    /// A chunk closed early (its span ran out) is filled up with dead
    /// entries, so that every chunk but the last holds [`CHUNK`] positions.
    fn pad_last_chunk(&mut self) {
        if let Some(chunk) = self.chunks.back_mut() {
            let missing = CHUNK - chunk.keys.len();
            if missing > 0 {
                chunk.keys.resize(CHUNK, IdKey { lo: 0, hi: 0 });
                chunk.partitions.resize(CHUNK, 0);
                chunk.offsets.resize(CHUNK, DEAD);
                chunk.keys.shrink_to_fit();
                chunk.partitions.shrink_to_fit();
                chunk.offsets.shrink_to_fit();
            }
        }
    }

    fn unindex(&mut self, key: IdKey, position: u32) {
        if let Ok(entry) = self.index.find_entry(key.lo, |&p| p == position) {
            entry.remove();
            self.live -= 1;
        }
        let (chunk, slot) = self.locate(position);
        self.chunks[chunk].offsets[slot] = DEAD;
    }

    /// Drops entries from the front: beyond capacity, or in a chunk whose
    /// newest key is `ttl` old.
    fn evict(&mut self, now: Instant) {
        while let Some(front) = self.chunks.front() {
            let expired = now.saturating_duration_since(front.newest) >= self.ttl;
            if !expired && self.live <= self.capacity {
                break;
            }
            let slot = self.head;
            if slot < front.keys.len() && front.offsets[slot] != DEAD {
                let key = front.keys[slot];
                self.unindex(key, (self.first_position + slot as u64) as u32);
            }
            self.head += 1;
            let len = self.chunks[0].keys.len();
            if self.head >= len {
                if self.chunks.len() == 1 && len < CHUNK {
                    // The open chunk emptied: start the ring afresh after it.
                    self.first_position += len as u64;
                } else {
                    self.first_position += CHUNK as u64;
                }
                self.chunks.pop_front();
                self.head = 0;
            }
        }
    }

    /// Removes the keys of `partition` at or above `from`; returns how many.
    fn forget(&mut self, partition: i32, from: i64) -> usize {
        let mut gone = Vec::new();
        for (c, chunk) in self.chunks.iter().enumerate() {
            let start = if c == 0 { self.head } else { 0 };
            for slot in start..chunk.keys.len() {
                if chunk.partitions[slot] == partition && chunk.offsets[slot] >= from {
                    let position = self.first_position + (c * CHUNK + slot) as u64;
                    gone.push((chunk.keys[slot], position as u32));
                }
            }
        }
        for &(key, position) in &gone {
            self.unindex(key, position);
        }
        gone.len()
    }

    fn len(&self) -> usize {
        self.live
    }

    #[cfg(test)]
    fn clear(&mut self) {
        *self = Self::new(self.ttl, self.capacity);
    }

    /// Bytes the window holds on the heap (index and ring).
    fn memory_bytes(&self) -> usize {
        let ring: usize = self
            .chunks
            .iter()
            .map(|c| {
                c.keys.capacity() * std::mem::size_of::<IdKey>()
                    + c.partitions.capacity() * std::mem::size_of::<i32>()
                    + c.offsets.capacity() * std::mem::size_of::<i64>()
            })
            .sum();
        self.index.allocation_size() + ring + self.chunks.capacity() * std::mem::size_of::<Chunk>()
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
    /// Seeds [`IdKey`]s: random per process.
    seed: u64,
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
            seed: rand::random(),
            recent: Mutex::new(RecentWindow::new(
                Duration::from_secs(config.recent_window_s),
                usize::try_from(config.recent_max_entries).unwrap_or(usize::MAX),
            )),
            long: LongWindow::new(&config.long_window),
            highest: Mutex::new(HashMap::new()),
            suspect: Mutex::new(HashMap::new()),
        }
    }

    /// The window key of (exchange, symbol, trade id) joined by `\u{1f}`.
    pub fn key(&self, joined: &[u8]) -> IdKey {
        IdKey::of(joined, self.seed)
    }

    fn verdict(&self, key: IdKey, event_time_us: i64, partition: i32, offset: i64) -> IdVerdict {
        if lock(&self.recent).contains(key, Instant::now()) {
            IdVerdict::Duplicate
        } else if self.long.contains_hash(key.hi, event_time_us) {
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
    fn commit(&self, partition: i32, keys: impl Iterator<Item = (IdKey, i64, i64)>) {
        let now = Instant::now();
        let latest_hour_us = crate::model::now_us() + MAX_BLOOM_LEAD_US;
        let mut recent = lock(&self.recent);
        let mut highest = None;
        for (key, event_time_us, offset) in keys {
            if event_time_us <= latest_hour_us {
                self.long.insert_hash(key.hi, event_time_us);
            }
            recent.insert(key, partition, offset, now);
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
        lock(&self.recent).len()
    }

    /// Heap bytes of the recent window.
    pub fn recent_memory_bytes(&self) -> usize {
        lock(&self.recent).memory_bytes()
    }

    pub fn long_window(&self) -> &LongWindow {
        &self.long
    }
}

/// One lane's dedup state: exact ordered ids (persisted per epoch) and the
/// ids without order of its uncommitted epochs.
pub struct LaneIds {
    pub ordered: EpochState<OrderedIds>,
    pending: PendingIds,
    windows: Arc<UnorderedWindows>,
    partition: i32,
    key: String,
}

impl LaneIds {
    pub fn new(scope: String, windows: Arc<UnorderedWindows>, partition: i32) -> Self {
        Self {
            ordered: EpochState::new(scope, OrderedIds::default),
            pending: PendingIds::default(),
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
        let key = self.windows.key(self.key.as_bytes());
        if self.pending.contains(key) {
            return IdVerdict::Duplicate;
        }
        let verdict = self
            .windows
            .verdict(key, trade.event_time_us, trade.partition, trade.offset);
        if verdict == IdVerdict::New || (verdict == IdVerdict::ProbableDuplicate && keep_probable) {
            self.pending.push(trade.offset, key, trade.event_time_us);
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
        self.windows
            .commit(self.partition, self.pending.take_below(next_offset));
    }
}

/// A lane's ids without order that wait for their epoch's commit, in
/// offset order: (offset, key, event time).
///
/// The ids live once, in a log of fixed chunks; an index of `u32` log
/// positions finds them by key, as the recent window's does. A hash set
/// of the keys themselves held each one a second time at 16 bytes a slot
/// and grew by doubling: its fresh pages were the largest first touches
/// left in the dedup (docs/perf.md, round nine). The index costs 5 bytes a
/// slot.
#[derive(Default)]
struct PendingIds {
    log: ChunkedLog<(i64, IdKey, i64)>,
    /// Positions (low 32 bits) of the logged ids; a lane never holds 2³²
    /// uncommitted ids.
    index: hashbrown::HashTable<u32>,
    /// Position of the log's front entry: ids taken so far.
    taken: u64,
}

impl PendingIds {
    fn key_at(log: &ChunkedLog<(i64, IdKey, i64)>, taken: u64, position: u32) -> IdKey {
        let index = position.wrapping_sub(taken as u32) as usize;
        log.get(index).expect("the index holds only logged positions").1
    }

    fn contains(&self, key: IdKey) -> bool {
        let (log, taken) = (&self.log, self.taken);
        self.index
            .find(key.lo, |&p| Self::key_at(log, taken, p) == key)
            .is_some()
    }

    /// Logs an id the lane has not seen (the caller checked `contains`).
    fn push(&mut self, offset: i64, key: IdKey, event_time_us: i64) {
        let position = (self.taken + self.log.len() as u64) as u32;
        self.log.push_back((offset, key, event_time_us));
        let (log, taken) = (&self.log, self.taken);
        self.index
            .insert_unique(key.lo, position, |&p| Self::key_at(log, taken, p).lo);
    }

    /// Takes the ids below `next_offset` from the front, as (key, event
    /// time, offset).
    fn take_below(&mut self, next_offset: i64) -> impl Iterator<Item = (IdKey, i64, i64)> {
        let (index, taken) = (&mut self.index, &mut self.taken);
        self.log
            .pop_front_while(move |(offset, ..)| *offset < next_offset)
            .map(move |(offset, key, event_time_us)| {
                let position = *taken as u32;
                *taken += 1;
                if let Ok(entry) = index.find_entry(key.lo, |&p| p == position) {
                    entry.remove();
                }
                (key, event_time_us, offset)
            })
    }

    fn len(&self) -> usize {
        self.index.len()
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

    fn replay(&mut self, _offset: i64, exchange: &str, symbol: &str, &id: &u64) {
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
        lock(&windows.recent).clear();
        assert_eq!(ids.check(&t, false), IdVerdict::ProbableDuplicate);
        assert_eq!(ids.pending_unordered(), 0, "dropped by policy: not remembered");
        assert_eq!(ids.check(&t, true), IdVerdict::ProbableDuplicate);
        assert_eq!(ids.pending_unordered(), 1, "kept: a second copy is a duplicate");
        assert_eq!(ids.check(&t, true), IdVerdict::Duplicate);
    }

    fn key(text: &str) -> IdKey {
        IdKey::of(text.as_bytes(), 7)
    }

    /// Ids pending over several log chunks: each is found until the commit
    /// that covers its offset takes it, in offset order, and not after.
    #[test]
    fn pending_ids_are_found_until_their_commit_takes_them() {
        let mut pending = PendingIds::default();
        let n = crate::chunked_log::LOG_CHUNK as i64 * 3 + 10;
        for offset in 0..n {
            let id = key(&format!("id-{offset}"));
            assert!(!pending.contains(id), "offset {offset} before it is logged");
            pending.push(offset, id, offset * 10);
        }
        assert_eq!(pending.len(), n as usize);
        let cut = n / 2 + 1;
        let taken: Vec<_> = pending.take_below(cut).collect();
        assert_eq!(taken.len(), cut as usize);
        for (i, &(id, event_time_us, offset)) in taken.iter().enumerate() {
            assert_eq!(
                (id, event_time_us, offset),
                (key(&format!("id-{i}")), i as i64 * 10, i as i64)
            );
        }
        assert_eq!(pending.len(), (n - cut) as usize);
        for offset in 0..n {
            let id = key(&format!("id-{offset}"));
            assert_eq!(pending.contains(id), offset >= cut, "offset {offset}");
        }
        // An id taken by its commit may be logged again (a replay after a
        // rewind is checked against the windows, not against this log).
        pending.push(n, key("id-0"), 0);
        assert!(pending.contains(key("id-0")));
        assert_eq!(pending.take_below(i64::MAX).count(), (n - cut + 1) as usize);
        assert_eq!(pending.len(), 0);
        assert!(!pending.contains(key(&format!("id-{}", n - 1))));
    }

    #[test]
    fn the_recent_window_forgets_keys_after_their_ttl_or_beyond_its_capacity() {
        let mut window = RecentWindow::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        window.insert(key("a"), 0, 0, at(0));
        assert!(window.contains(key("a"), at(9)));
        assert!(!window.contains(key("a"), at(10)), "expired");
        window.insert(key("b"), 0, 5, at(5));
        window.insert(key("c"), 0, 6, at(6));
        assert_eq!(window.len(), 2, "over capacity: the oldest went");
        assert!(!window.contains(key("a"), at(6)) && window.contains(key("b"), at(6)));
        window.insert(key("d"), 0, 15, at(15));
        assert!(
            !window.contains(key("b"), at(15)),
            "expired keys are evicted on insert"
        );
        assert_eq!(window.len(), 2);
        assert!(window.contains(key("c"), at(15)) && window.contains(key("d"), at(15)));
    }

    /// Keys inserted within one chunk's span share its time: a key stays at
    /// least the TTL and at most a 64th of it longer.
    #[test]
    fn keys_of_one_chunk_expire_together_within_a_64th_of_the_ttl() {
        let mut window = RecentWindow::new(Duration::from_secs(640), 100);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        window.insert(key("a"), 0, 0, at(0));
        window.insert(key("b"), 0, 1, at(9_000));
        assert!(window.contains(key("a"), at(645_000)), "kept past its own TTL");
        assert!(!window.contains(key("a"), at(649_000)), "gone with its chunk");
        window.insert(key("c"), 0, 2, at(20_000)); // past the span: a new chunk
        window.insert(key("d"), 0, 3, at(649_000));
        assert_eq!(window.len(), 2, "the first chunk left whole");
        assert!(window.contains(key("c"), at(649_000)));
    }

    #[test]
    fn the_recent_window_survives_many_chunks_and_forgets_by_partition() {
        let mut window = RecentWindow::new(Duration::from_secs(3_600), 10_000);
        let now = Instant::now();
        for i in 0..30_000i64 {
            window.insert(key(&format!("k{i}")), (i % 3) as i32, i, now);
        }
        assert_eq!(window.len(), 10_000, "capacity holds");
        assert!(!window.contains(key("k19999"), now), "evicted as the oldest");
        assert!((20_000..30_000).all(|i| window.contains(key(&format!("k{i}")), now)));
        // A key committed again (another partition's copy) stands once.
        window.insert(key("k29999"), 5, 40_000, now);
        assert_eq!(window.len(), 10_000);
        // Partition 1 at or above 25,000: every third key of 25,000..30,000.
        let forgotten = window.forget(1, 25_000);
        assert_eq!(forgotten, (25_000..30_000).filter(|i| i % 3 == 1).count());
        assert!(!window.contains(key("k25000"), now) && window.contains(key("k25001"), now));
        assert!(window.contains(key("k29999"), now), "moved to partition 5");
        for i in 30_000..45_000i64 {
            window.insert(key(&format!("k{i}")), 0, i, now);
        }
        assert_eq!(window.len(), 10_000);
        assert!((35_000..45_000).all(|i| window.contains(key(&format!("k{i}")), now)));
    }

    /// The budget: ≤ 40 bytes an id, counting the index at its
    /// least loaded (just after a resize) and at its most.
    #[test]
    fn the_recent_window_costs_under_40_bytes_an_id() {
        let mut window = RecentWindow::new(Duration::from_secs(3_600), usize::MAX);
        let now = Instant::now();
        let mut worst: f64 = 0.0;
        for i in 0..1_000_000u64 {
            window.insert(IdKey::of(&i.to_le_bytes(), 1), 0, i as i64, now);
            if (i + 1) % 10_000 == 0 {
                let per_id = window.memory_bytes() as f64 / window.len() as f64;
                worst = worst.max(per_id);
            }
        }
        let per_id = window.memory_bytes() as f64 / window.len() as f64;
        println!("recent window: {per_id:.1} bytes an id at 1M, {worst:.1} at worst");
        assert!(per_id <= 40.0, "{per_id:.1} bytes an id at 1M");
        assert!(worst <= 41.0, "{worst:.1} bytes an id at worst");
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
        lock(&windows.recent).clear();
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
