//! The long-window tier of trade deduplication: has this (exchange, symbol, trade id) probably been
//! seen in the last day?
//!
//! Ids with no order (see [`crate::dedup`]) are deduplicated exactly only over a recent window, because
//! an exact set of a day of keys does not fit in memory. Behind it, [`LongWindow`] remembers a day of
//! keys approximately, in Bloom filters: about 1.8 GB for 10⁹ keys at a 0.1% false-positive rate.
//! A Bloom filter can say "seen" for a key it never saw, so a hit here never drops a record: the caller
//! flags it as a probable duplicate and lets it through.
//!
//! # Generations are hours of event time
//!
//! The window is split into one Bloom filter (a generation) per hour, so that an hour that leaves the
//! window can be dropped whole and its memory freed. The hour is that of the trade's event time, not of
//! its arrival: a duplicate (a replay, a producer retry, a second feed of the same venue) carries the
//! event time of the original, so a lookup checks only the one generation of its event hour. A lookup's
//! false-positive rate is then one filter's rate. Checking all 24 hourly filters would multiply it by
//! about 24; holding 0.1% over 24 checks needs each filter at 0.1%/24, 21 bits per key instead of 14.4,
//! about 2.6 GB for 10⁹ keys instead of 1.8 GB.
//!
//! The price: a duplicate whose event time differs from the original's (a venue that corrects a
//! timestamp) lands in another hour and is not found.
//!
//! # The window
//!
//! The live window is the `window_hours` hours ending at the newest event hour inserted. When a key of
//! a newer hour arrives, the generations that fall out of the window are dropped. A key whose event hour
//! is older than the window is in no generation: [`LongWindow::contains`] returns false and
//! [`LongWindow::insert`] does nothing and returns [`Insert::OutsideWindow`], for the caller to count.
//!
//! One far-future event time would move the window forward and drop every generation. Guarding against
//! that is the job of the caller's validation: K2's decoder rejects trades whose event time is further
//! than `decode.max_event_time_skew_ms` from the wall clock, so the window can run ahead of real time by
//! that skew at most, and drops that much of its past when it does. Keep the skew well below
//! `window_hours`: with a skew of 24 h and a 24 h window, one trade stamped a day ahead empties it.
//!
//! # Sizing
//!
//! Generations are allocated when their first key arrives, each sized for `capacity / window_hours`
//! keys at `false_positive_rate`. The rate holds for an hour that receives at most that many keys; a
//! busier hour has a higher rate, so size `capacity` for the busiest hour times `window_hours`, not for
//! a day's total. fastbloom 0.17 is a classic (unblocked) Bloom filter: at its own sizing,
//! `-ln(p) / ln(2)²` bits per key (14.4 at 0.1%) with `round(ln(2) · bits per key)` hashes (10), the
//! measured rate is the configured one (unit test `false_positive_rate_stays_within_the_configured_rate`
//! and `docs/benchmarks.md`), so no extra margin is added.
//!
//! # Concurrency
//!
//! One [`LongWindow`] per process is shared by the dedup stages of all its lanes. Inserts and lookups
//! set and test bits of fastbloom's `AtomicBloomFilter` under a read lock on the ring of generations;
//! the write lock is taken once an hour, to install a new generation and drop the expired ones. Zeroing
//! a new generation (75 MB for 10⁹ keys a day) and freeing an old one happen outside the write lock,
//! and a mutex lets only one thread allocate at a time, so that all lanes reaching a new hour together
//! do not each allocate a generation.

use std::fmt;
use std::hash::BuildHasher;
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use fastbloom::{AtomicBloomFilter, DefaultHasher};
use serde::{Deserialize, Serialize};

const MICROS_PER_HOUR: i64 = 3_600_000_000;

/// The long window of probable-duplicate detection, `[dedup.long_window]` style settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LongWindowConfig {
    /// Hours of event time the window covers (one generation per hour). Default 24.
    pub window_hours: u32,
    /// Distinct keys the whole window must hold at `false_positive_rate`, spread evenly over its hours:
    /// each hourly generation is sized for `capacity / window_hours` keys, so size this for the
    /// busiest hour times `window_hours`. Default 100_000_000 (about 180 MB when full).
    pub capacity: u64,
    /// Probability that a lookup of a key never inserted in its hour says "seen". Default 0.001.
    pub false_positive_rate: f64,
}

impl Default for LongWindowConfig {
    fn default() -> Self {
        Self {
            window_hours: 24,
            capacity: 100_000_000,
            false_positive_rate: 0.001,
        }
    }
}

impl LongWindowConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.window_hours < 1 {
            return Err(format!(
                "window_hours must be at least 1, got {}",
                self.window_hours
            ));
        }
        if self.capacity < u64::from(self.window_hours) {
            return Err(format!(
                "capacity must be at least window_hours ({}) so that each hourly generation holds a key, got {}",
                self.window_hours, self.capacity
            ));
        }
        // Written so that NaN fails too.
        if !(self.false_positive_rate > 0.0 && self.false_positive_rate < 1.0) {
            return Err(format!(
                "false_positive_rate must be strictly between 0 and 1, got {}",
                self.false_positive_rate
            ));
        }
        Ok(())
    }

    /// Keys each hourly generation is sized for.
    fn generation_capacity(&self) -> usize {
        let per_hour = self.capacity.div_ceil(u64::from(self.window_hours.max(1))).max(1);
        usize::try_from(per_hour).unwrap_or(usize::MAX)
    }
}

/// What [`LongWindow::insert`] did with a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    Inserted,
    /// The key's event hour is older than the window: nothing was recorded.
    OutsideWindow,
}

/// Time-rotated Bloom filters over the last `window_hours` hours of event time. See the module docs.
pub struct LongWindow {
    window_hours: i64,
    generation_capacity: usize,
    false_positive_rate: f64,
    seed: u128,
    /// The hasher every generation is built with, so a key is hashed once, before taking the lock.
    hasher: DefaultHasher,
    ring: RwLock<Ring>,
    /// Held while allocating and installing a generation, so that one thread allocates it.
    allocating: Mutex<()>,
}

struct Ring {
    /// Newest event hour inserted; `None` until the first insert.
    newest_hour: Option<i64>,
    /// Slot `hour.rem_euclid(window_hours)` holds the generation of `hour`, once its first key arrived.
    slots: Vec<Option<Generation>>,
}

struct Generation {
    hour: i64,
    filter: AtomicBloomFilter,
}

enum Lookup<'a> {
    Live(&'a AtomicBloomFilter),
    /// In the window (or newer than it) but not allocated yet.
    Missing,
    /// Older than the window.
    Expired,
}

impl LongWindow {
    /// # Panics
    /// If the config is invalid: call [`LongWindowConfig::validate`] when loading it.
    pub fn new(config: &LongWindowConfig) -> Self {
        Self::with_seed(config, rand::random())
    }

    fn with_seed(config: &LongWindowConfig, seed: u128) -> Self {
        if let Err(err) = config.validate() {
            panic!("invalid long-window config: {err}");
        }
        let window_hours = config.window_hours as usize;
        Self {
            window_hours: i64::from(config.window_hours),
            generation_capacity: config.generation_capacity(),
            false_positive_rate: config.false_positive_rate,
            seed,
            // The same key fastbloom's builder derives from `seed(&seed)`.
            hasher: DefaultHasher::seeded(&seed.to_be_bytes()),
            ring: RwLock::new(Ring {
                newest_hour: None,
                slots: (0..window_hours).map(|_| None).collect(),
            }),
            allocating: Mutex::new(()),
        }
    }

    /// True if the key may have been inserted with an event time in the same hour (Bloom: may be a
    /// false positive). False for an hour outside the window.
    pub fn contains(&self, key: &[u8], event_time_us: i64) -> bool {
        self.contains_hash(self.hasher.hash_one(key), event_time_us)
    }

    /// [`LongWindow::contains`] for a key the caller already hashed to 64 uniform bits (K2's dedup
    /// keys are 128-bit hashes: hashing them again would only cost time).
    pub fn contains_hash(&self, hash: u64, event_time_us: i64) -> bool {
        match self.read().lookup(event_hour(event_time_us), self.window_hours) {
            Lookup::Live(filter) => filter.contains_hash(hash),
            Lookup::Missing | Lookup::Expired => false,
        }
    }

    /// Inserts into the hour's generation if it exists; None if the hour has
    /// no generation yet.
    fn insert_existing(&self, hour: i64, hash: u64) -> Option<Insert> {
        match self.read().lookup(hour, self.window_hours) {
            Lookup::Live(filter) => {
                filter.insert_hash(hash);
                Some(Insert::Inserted)
            }
            Lookup::Expired => Some(Insert::OutsideWindow),
            Lookup::Missing => None,
        }
    }

    /// Records the key in the generation of its event hour, allocating the generation (and moving the
    /// window forward, dropping the generations that leave it) if this is the hour's first key.
    pub fn insert(&self, key: &[u8], event_time_us: i64) -> Insert {
        self.insert_hash(self.hasher.hash_one(key), event_time_us)
    }

    /// [`LongWindow::insert`] for a key the caller already hashed to 64 uniform bits.
    pub fn insert_hash(&self, hash: u64, event_time_us: i64) -> Insert {
        let hour = event_hour(event_time_us);
        if let Some(done) = self.insert_existing(hour, hash) {
            return done;
        }

        // The hour's first key. Only threads holding `allocating` change the ring, so after this check
        // the hour stays missing until this thread installs it.
        let _allocating = self.allocating.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(done) = self.insert_existing(hour, hash) {
            return done;
        }
        // Zeroed before taking the write lock: lanes keep inserting into the other hours meanwhile.
        let generation = Generation {
            hour,
            filter: self.new_filter(),
        };
        generation.filter.insert_hash(hash);
        let expired = {
            let mut ring = self.write();
            let expired = ring.advance_to(hour, self.window_hours);
            let slot = &mut ring.slots[slot_index(hour, self.window_hours)];
            debug_assert!(slot.is_none(), "a live slot holds only its own hour");
            *slot = Some(generation);
            expired
        };
        // Returning the expired generations' pages to the allocator happens after the write lock too.
        drop(expired);
        Insert::Inserted
    }

    /// Bytes of the filters' bit arrays now allocated.
    pub fn memory_bytes(&self) -> usize {
        self.read()
            .generations()
            .map(|generation| generation.filter.num_bits() / 8)
            .sum()
    }

    /// Generations (hours) now allocated.
    pub fn generations(&self) -> usize {
        self.read().generations().count()
    }

    /// Bits per entry each generation was sized with (measured from an allocated filter, for reports;
    /// before the first insert, from the size the first generation will get).
    pub fn bits_per_entry(&self) -> f64 {
        let bits = self
            .read()
            .generations()
            .next()
            .map(|generation| generation.filter.num_bits())
            .unwrap_or_else(|| {
                fastbloom::optimal_size(self.generation_capacity, self.false_positive_rate)
                    .next_multiple_of(64)
            });
        bits as f64 / self.generation_capacity as f64
    }

    fn new_filter(&self) -> AtomicBloomFilter {
        AtomicBloomFilter::with_false_pos(self.false_positive_rate)
            .seed(&self.seed)
            .expected_items(self.generation_capacity)
    }

    // The ring is consistent between statements (a slot is replaced whole), so a panic in another
    // thread holding the lock leaves nothing half-done: recover from poisoning.
    fn read(&self) -> RwLockReadGuard<'_, Ring> {
        self.ring.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Ring> {
        self.ring.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for LongWindow {
    // Not derived: it would print every word of the bit arrays.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ring = self.read();
        f.debug_struct("LongWindow")
            .field("window_hours", &self.window_hours)
            .field("generation_capacity", &self.generation_capacity)
            .field("false_positive_rate", &self.false_positive_rate)
            .field("newest_hour", &ring.newest_hour)
            .field("hours", &ring.generations().map(|g| g.hour).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Ring {
    fn lookup(&self, hour: i64, window_hours: i64) -> Lookup<'_> {
        let Some(newest) = self.newest_hour else {
            return Lookup::Missing;
        };
        if hour <= newest - window_hours {
            return Lookup::Expired;
        }
        match &self.slots[slot_index(hour, window_hours)] {
            Some(generation) if generation.hour == hour => Lookup::Live(&generation.filter),
            _ => Lookup::Missing,
        }
    }

    /// Makes `hour` the newest hour if it is newer, and takes out the generations that leave the window.
    fn advance_to(&mut self, hour: i64, window_hours: i64) -> Vec<Generation> {
        if self.newest_hour.is_some_and(|newest| newest >= hour) {
            return Vec::new();
        }
        self.newest_hour = Some(hour);
        let oldest_live = hour - window_hours + 1;
        self.slots
            .iter_mut()
            .filter_map(|slot| slot.take_if(|generation| generation.hour < oldest_live))
            .collect()
    }

    fn generations(&self) -> impl Iterator<Item = &Generation> {
        self.slots.iter().flatten()
    }
}

/// Hours since the Unix epoch, rounded down (also before 1970).
fn event_hour(event_time_us: i64) -> i64 {
    event_time_us.div_euclid(MICROS_PER_HOUR)
}

fn slot_index(hour: i64, window_hours: i64) -> usize {
    // In `0..window_hours`, which came from a u32.
    hour.rem_euclid(window_hours) as usize
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    /// 2026-01-01T00:00:00Z.
    const BASE_US: i64 = 1_767_225_600_000_000;

    fn at_hour(hour: i64) -> i64 {
        BASE_US + hour * MICROS_PER_HOUR
    }

    fn key(buf: &mut Vec<u8>, id: u64) -> &[u8] {
        buf.clear();
        let _ = write!(buf, "BINANCE\x1fBTCUSDT\x1f{id}");
        buf
    }

    fn window(window_hours: u32, per_hour: u64) -> LongWindow {
        let config = LongWindowConfig {
            window_hours,
            capacity: u64::from(window_hours) * per_hour,
            false_positive_rate: 0.001,
        };
        LongWindow::with_seed(&config, 0x6b32_6b32)
    }

    #[test]
    fn inserted_keys_are_always_found() {
        let window = window(24, 10_000);
        let mut buf = Vec::new();
        for id in 0..100_000u64 {
            // Out of order over the 24 hours, as late trades arrive.
            let t = at_hour((id * 7 % 24) as i64) + id as i64;
            assert_eq!(window.insert(key(&mut buf, id), t), Insert::Inserted);
        }
        assert_eq!(window.generations(), 24);
        let missing = (0..100_000u64)
            .filter(|&id| !window.contains(key(&mut buf, id), at_hour((id * 7 % 24) as i64) + 59_000_000))
            .count();
        assert_eq!(missing, 0, "a Bloom filter has no false negatives");
    }

    #[test]
    fn inserts_from_several_threads_are_all_found() {
        let window = window(4, 50_000);
        std::thread::scope(|scope| {
            for thread in 0..4u64 {
                let window = &window;
                scope.spawn(move || {
                    let mut buf = Vec::new();
                    // Every thread starts at hour 0 and crosses into new hours at about the same time.
                    for i in 0..20_000u64 {
                        let id = i * 4 + thread;
                        window.insert(key(&mut buf, id), at_hour((i / 5_000) as i64));
                    }
                });
            }
        });
        assert_eq!(window.generations(), 4);
        let mut buf = Vec::new();
        let missing = (0..80_000u64)
            .filter(|&id| !window.contains(key(&mut buf, id), at_hour((id / 4 / 5_000) as i64)))
            .count();
        assert_eq!(missing, 0);
    }

    #[test]
    fn a_key_is_found_only_in_its_own_event_hour() {
        let window = window(24, 10_000);
        let mut buf = Vec::new();
        for id in 0..10_000 {
            window.insert(key(&mut buf, id), at_hour(5));
        }
        // Other keys in hour 6, so that hour has a filter of its own to be checked.
        for id in 10_000..20_000 {
            window.insert(key(&mut buf, id), at_hour(6));
        }
        let in_hour = |hour: i64| {
            let mut buf = Vec::new();
            (0..10_000)
                .filter(|&id| window.contains(key(&mut buf, id), at_hour(hour) + 1))
                .count()
        };
        assert_eq!(in_hour(5), 10_000);
        // At 0.1%, about 10 false positives; one filter for all hours would find all 10,000.
        let in_next_hour = in_hour(6);
        assert!(
            in_next_hour < 50,
            "{in_next_hour} of 10,000 keys of hour 5 found in hour 6"
        );
        // Hours of the window that received no key, and a future hour, have no filter at all.
        assert_eq!(in_hour(4), 0);
        assert_eq!(in_hour(7), 0);
    }

    #[test]
    fn hours_that_leave_the_window_are_dropped() {
        let window = window(3, 1_000);
        assert_eq!((window.generations(), window.memory_bytes()), (0, 0));
        let mut buf = Vec::new();
        for hour in 0..3 {
            window.insert(key(&mut buf, hour as u64), at_hour(hour));
        }
        let one_generation = window.memory_bytes() / 3;
        assert!(
            one_generation >= 1_000 * 14 / 8,
            "{one_generation} bytes for 1,000 keys at 0.1%"
        );
        assert_eq!(window.generations(), 3);

        // Hour 3 arrives: the window is hours 1..=3 and hour 0 is gone.
        window.insert(key(&mut buf, 3), at_hour(3));
        assert_eq!(window.generations(), 3);
        assert_eq!(window.memory_bytes(), 3 * one_generation);
        assert!(!window.contains(key(&mut buf, 0), at_hour(0)));
        assert!(window.contains(key(&mut buf, 1), at_hour(1)));
        assert_eq!(
            window.insert(key(&mut buf, 100), at_hour(0)),
            Insert::OutsideWindow
        );
        assert!(!window.contains(key(&mut buf, 100), at_hour(0)));
        assert_eq!(window.generations(), 3, "an expired hour is not allocated again");

        // A late key of an hour still in the window is recorded.
        assert_eq!(
            window.insert(key(&mut buf, 101), at_hour(2) + 5),
            Insert::Inserted
        );
        assert!(window.contains(key(&mut buf, 101), at_hour(2)));

        // A jump of many hours drops everything older: memory is freed.
        window.insert(key(&mut buf, 10), at_hour(10));
        assert_eq!(window.generations(), 1);
        assert_eq!(window.memory_bytes(), one_generation);
        for (id, hour) in [(1, 1), (2, 2), (3, 3), (101, 2)] {
            assert!(!window.contains(key(&mut buf, id), at_hour(hour)));
        }
        assert!(window.contains(key(&mut buf, 10), at_hour(10)));
        // Hour 8 is inside the new window (8..=10) and gets a generation.
        assert_eq!(window.insert(key(&mut buf, 8), at_hour(8)), Insert::Inserted);
        assert_eq!(window.generations(), 2);
    }

    #[test]
    fn hours_before_1970_rotate_like_any_other() {
        let window = window(2, 1_000);
        let mut buf = Vec::new();
        // -1 µs is in hour -1, not hour 0.
        window.insert(key(&mut buf, 1), -1);
        assert!(window.contains(key(&mut buf, 1), -MICROS_PER_HOUR));
        assert!(!window.contains(key(&mut buf, 1), 0));
        window.insert(key(&mut buf, 2), 0);
        assert_eq!(window.generations(), 2);
        window.insert(key(&mut buf, 3), MICROS_PER_HOUR);
        assert_eq!(window.generations(), 2);
        assert!(!window.contains(key(&mut buf, 1), -1));
    }

    #[test]
    fn false_positive_rate_stays_within_the_configured_rate() {
        const PER_HOUR: u64 = 200_000;
        const PROBES: u64 = 1_000_000;
        let window = window(24, PER_HOUR);
        let mut buf = Vec::new();
        for id in 0..PER_HOUR {
            window.insert(key(&mut buf, id), at_hour(0) + id as i64);
        }
        let false_positives = (PER_HOUR..PER_HOUR + PROBES)
            .filter(|&id| window.contains(key(&mut buf, id), at_hour(0) + id as i64))
            .count();
        let rate = false_positives as f64 / PROBES as f64;
        // Sampling error only: at p = 0.001 over 1M probes the standard deviation is about 3% of p,
        // so a 20% margin is more than 6 sigma. A filter sized for 10x fewer keys would be near 10%.
        assert!(
            rate <= 0.001 * 1.2,
            "measured false-positive rate {rate}, configured 0.001"
        );
        // Not vacuous: a filter this full has false positives.
        assert!(false_positives > 0);
        let bits = window.bits_per_entry();
        assert!(
            (14.3..14.5).contains(&bits),
            "{bits} bits per entry, expected -ln(0.001)/ln(2)² = 14.4"
        );
        assert_eq!(
            window.memory_bytes(),
            (bits * PER_HOUR as f64 / 8.0).round() as usize
        );
    }

    #[test]
    fn bits_per_entry_is_known_before_the_first_insert() {
        let window = window(24, 200_000);
        let before = window.bits_per_entry();
        window.insert(b"k", at_hour(0));
        assert_eq!(before, window.bits_per_entry());
    }

    #[test]
    fn config_errors_name_the_field() {
        let valid = LongWindowConfig::default();
        assert_eq!(valid.validate(), Ok(()));
        let cases = [
            (
                LongWindowConfig {
                    window_hours: 0,
                    ..valid.clone()
                },
                "window_hours",
            ),
            (
                LongWindowConfig {
                    capacity: 23,
                    ..valid.clone()
                },
                "capacity",
            ),
            (
                LongWindowConfig {
                    false_positive_rate: 0.0,
                    ..valid.clone()
                },
                "false_positive_rate",
            ),
            (
                LongWindowConfig {
                    false_positive_rate: 1.0,
                    ..valid.clone()
                },
                "false_positive_rate",
            ),
            (
                LongWindowConfig {
                    false_positive_rate: f64::NAN,
                    ..valid.clone()
                },
                "false_positive_rate",
            ),
        ];
        for (config, field) in cases {
            let err = config.validate().expect_err(field);
            assert!(err.starts_with(field), "{err}");
        }
    }

    #[test]
    fn config_fills_defaults_and_rejects_unknown_fields() {
        let config: LongWindowConfig = serde_json::from_str(r#"{"window_hours": 12}"#).expect("valid");
        assert_eq!(
            config,
            LongWindowConfig {
                window_hours: 12,
                ..LongWindowConfig::default()
            }
        );
        assert!(serde_json::from_str::<LongWindowConfig>(r#"{"window_hour": 12}"#).is_err());
    }
}
