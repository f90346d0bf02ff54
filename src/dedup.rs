//! Exact deduplication of (exchange, symbol, trade id) over a bounded recent
//! window. The symbol is part of the key: Binance numbers trades per symbol.
//!
//! Exact means a record is dropped only when the very same key was seen:
//! never on a hash match. The window holds the most recent `capacity` keys
//! and forgets the oldest first, so memory is bounded.

use std::collections::{HashSet, VecDeque};

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
}
