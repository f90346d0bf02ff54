//! Exact deduplication of (exchange, symbol, trade id). The symbol is part of
//! the key: Binance numbers trades per symbol.
//!
//! Exact means a record is dropped only when the very same key was seen:
//! never on a hash match. Two structures:
//! - [`OrderedIds`] for numeric ids that increase per symbol (exchange trade
//!   ids, feed sequence numbers): a per-symbol run of contiguous ids seen plus
//!   a compressed bitmap of the ids seen outside it. Memory grows with symbols
//!   and holes, not with messages.
//! - [`RecentIds`] for any other id: the most recent `capacity` keys,
//!   forgetting the oldest first, so memory is bounded.

use std::collections::{HashSet, VecDeque};

use roaring::RoaringTreemap;

use crate::per_symbol::PerSymbol;

#[derive(Debug)]
pub struct RecentIds {
    capacity: usize,
    seen: HashSet<Box<str>>,
    order: VecDeque<Box<str>>,
    key: String,
}

impl RecentIds {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            seen: HashSet::with_capacity(capacity.min(1 << 20)),
            order: VecDeque::with_capacity(capacity.min(1 << 20)),
            key: String::new(),
        }
    }

    /// Records the key; returns false if it was already in the window.
    pub fn insert(&mut self, exchange: &str, symbol: &str, trade_id: &str) -> bool {
        self.key.clear();
        self.key.push_str(exchange);
        self.key.push('\u{1f}');
        self.key.push_str(symbol);
        self.key.push('\u{1f}');
        self.key.push_str(trade_id);
        if self.seen.contains(self.key.as_str()) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        let key: Box<str> = self.key.as_str().into();
        self.seen.insert(key.clone());
        self.order.push_back(key);
        true
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
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

    fn bitmap_bytes(&self) -> usize {
        if self.others.is_empty() {
            0
        } else {
            self.others.serialized_size()
        }
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

    #[test]
    fn same_key_is_a_duplicate_other_exchange_is_not() {
        let mut ids = RecentIds::new(10);
        assert!(ids.insert("ASX", "BHP", "1"));
        assert!(!ids.insert("ASX", "BHP", "1"));
        assert!(ids.insert("BINANCE", "BHP", "1"));
        // The separator keeps ("AS", "XBHP") apart from ("ASX", "BHP").
        assert!(ids.insert("AS", "XBHP", "1"));
    }

    #[test]
    fn same_trade_id_on_another_symbol_is_not_a_duplicate() {
        // Binance's trade ids are per symbol: BTCUSDT #7 and ETHUSDT #7 are two trades.
        let mut ids = RecentIds::new(10);
        assert!(ids.insert("BINANCE", "BTCUSDT", "7"));
        assert!(ids.insert("BINANCE", "ETHUSDT", "7"));
        assert!(!ids.insert("BINANCE", "ETHUSDT", "7"));
    }

    #[test]
    fn window_forgets_the_oldest_key_first() {
        let mut ids = RecentIds::new(2);
        ids.insert("A", "S", "1");
        ids.insert("A", "S", "2");
        ids.insert("A", "S", "3");
        assert_eq!(ids.len(), 2);
        assert!(ids.insert("A", "S", "1"), "evicted key is accepted again");
        assert!(!ids.insert("A", "S", "3"));
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
