//! Per-(exchange, symbol) sequence tracking: in order, gap, or old/duplicate.
//!
//! This is the backbone's tracker: it classifies and counts. Reorder windows,
//! resets, gap events in `k2.sequence_gaps` and persistent state build on it.

use std::collections::HashMap;

/// What one sequence number means relative to what was seen before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceOutcome {
    /// The first record of a symbol, or exactly the next number.
    InOrder,
    /// Numbers between the last one seen and this one are missing.
    Gap { expected: i64, missing: i64 },
    /// At or below the last number seen.
    Old,
}

/// Last sequence number seen, by exchange then symbol (nested so lookups
/// borrow the record's strings and allocate nothing).
#[derive(Debug, Default)]
pub struct SequenceTracker {
    last: HashMap<String, HashMap<String, i64>>,
}

impl SequenceTracker {
    pub fn observe(&mut self, exchange: &str, symbol: &str, sequence: i64) -> SequenceOutcome {
        if !self.last.contains_key(exchange) {
            self.last.insert(exchange.to_string(), HashMap::new());
        }
        let symbols = self.last.get_mut(exchange).expect("inserted above");
        let Some(last) = symbols.get_mut(symbol) else {
            symbols.insert(symbol.to_string(), sequence);
            return SequenceOutcome::InOrder;
        };
        let expected = *last + 1;
        if sequence == expected {
            *last = sequence;
            SequenceOutcome::InOrder
        } else if sequence > expected {
            *last = sequence;
            SequenceOutcome::Gap {
                expected,
                missing: sequence - expected,
            }
        } else {
            SequenceOutcome::Old
        }
    }

    pub fn symbols(&self) -> usize {
        self.last.values().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_numbers_are_in_order_per_symbol() {
        let mut t = SequenceTracker::default();
        assert_eq!(t.observe("ASX", "BHP", 1), SequenceOutcome::InOrder);
        assert_eq!(t.observe("ASX", "CBA", 7), SequenceOutcome::InOrder);
        assert_eq!(t.observe("ASX", "BHP", 2), SequenceOutcome::InOrder);
        assert_eq!(t.symbols(), 2);
    }

    #[test]
    fn gap_reports_expected_and_missing_count() {
        let mut t = SequenceTracker::default();
        t.observe("ASX", "BHP", 10);
        assert_eq!(
            t.observe("ASX", "BHP", 14),
            SequenceOutcome::Gap {
                expected: 11,
                missing: 3
            }
        );
        assert_eq!(t.observe("ASX", "BHP", 15), SequenceOutcome::InOrder);
    }

    #[test]
    fn repeated_or_older_number_is_old_and_does_not_move_the_position() {
        let mut t = SequenceTracker::default();
        t.observe("BINANCE", "BTCUSDT", 5);
        assert_eq!(t.observe("BINANCE", "BTCUSDT", 5), SequenceOutcome::Old);
        assert_eq!(t.observe("BINANCE", "BTCUSDT", 3), SequenceOutcome::Old);
        assert_eq!(t.observe("BINANCE", "BTCUSDT", 6), SequenceOutcome::InOrder);
    }
}
