//! State kept per (exchange, symbol), as the sequencer and the deduplicator
//! keep it. Nested by exchange then symbol so lookups borrow the record's
//! strings and allocate only for a symbol seen for the first time.
//!
//! Hashed with foldhash, not std's SipHash: several lookups a trade, keyed
//! by short strings from the feed; foldhash is a fraction of the cost and
//! still seeded per map (ADR 0002).

use std::collections::HashMap;

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug)]
pub struct PerSymbol<V> {
    exchanges: FastMap<String, FastMap<String, V>>,
}

impl<V> Default for PerSymbol<V> {
    fn default() -> Self {
        Self {
            exchanges: FastMap::default(),
        }
    }
}

impl<V> PerSymbol<V> {
    /// The state of (`exchange`, `symbol`), created with `V::default()` if new.
    pub fn get_or_default(&mut self, exchange: &str, symbol: &str) -> &mut V
    where
        V: Default,
    {
        self.get_or_insert_with(exchange, symbol, V::default)
    }

    /// The state of (`exchange`, `symbol`), created with `new` if new.
    pub fn get_or_insert_with(&mut self, exchange: &str, symbol: &str, new: impl FnOnce() -> V) -> &mut V {
        if !self.exchanges.contains_key(exchange) {
            self.exchanges.insert(exchange.to_string(), FastMap::default());
        }
        let symbols = self.exchanges.get_mut(exchange).expect("inserted above");
        if !symbols.contains_key(symbol) {
            symbols.insert(symbol.to_string(), new());
        }
        symbols.get_mut(symbol).expect("inserted above")
    }

    pub fn get(&self, exchange: &str, symbol: &str) -> Option<&V> {
        self.exchanges.get(exchange)?.get(symbol)
    }

    pub fn get_mut(&mut self, exchange: &str, symbol: &str) -> Option<&mut V> {
        self.exchanges.get_mut(exchange)?.get_mut(symbol)
    }

    /// Number of (exchange, symbol) pairs.
    pub fn len(&self) -> usize {
        self.exchanges.values().map(FastMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.exchanges.values().flat_map(FastMap::values)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &str, &mut V)> {
        self.exchanges.iter_mut().flat_map(|(exchange, symbols)| {
            symbols
                .iter_mut()
                .map(move |(symbol, value)| (exchange.as_str(), symbol.as_str(), value))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::PerSymbol;

    #[test]
    fn state_is_per_exchange_and_symbol() {
        let mut map: PerSymbol<u32> = PerSymbol::default();
        *map.get_or_default("ASX", "BHP") += 1;
        *map.get_or_default("ASX", "BHP") += 1;
        *map.get_or_default("BINANCE", "BHP") += 1;
        assert_eq!(map.get("ASX", "BHP"), Some(&2));
        assert_eq!(map.get("BINANCE", "BHP"), Some(&1));
        assert_eq!(map.get("ASX", "CBA"), None);
        assert_eq!(map.len(), 2);
        let mut seen: Vec<(String, String, u32)> = map
            .iter_mut()
            .map(|(e, s, v)| (e.to_string(), s.to_string(), *v))
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                ("ASX".into(), "BHP".into(), 2),
                ("BINANCE".into(), "BHP".into(), 1)
            ]
        );
    }
}
