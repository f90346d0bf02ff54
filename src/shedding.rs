//! Priorities, symbol tiers and what each degradation level sheds.
//!
//! A trade's priority comes from its symbol's tier on its exchange
//! (`[shedding.tiers.<EXCHANGE>]`): tier 1 is CRITICAL, tier 2 HIGH, every
//! other symbol NORMAL. Reference data is always LOW. Levels shed:
//!
//! | level         | shed                         |
//! |---------------|------------------------------|
//! | NORMAL, SOFT  | nothing                      |
//! | GRACEFUL      | LOW                          |
//! | AGGRESSIVE    | LOW, NORMAL                  |
//! | CIRCUIT_BREAK | LOW, NORMAL, HIGH            |
//!
//! What is shed is not lost: its offsets go to `k2.shed_ledger` as
//! [`ShedEntry`] rows (offset ranges), and `k2 backfill` ingests them later.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::degradation::DegradationLevel;

/// How much a record matters when K2 must shed load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Reference data.
    Low,
    /// Tier-3 symbols: every symbol not listed in a tier.
    Normal,
    /// Tier-2 symbols.
    High,
    /// Tier-1 symbols: never shed.
    Critical,
}

impl Priority {
    pub const ALL: [Priority; 4] = [
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Critical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "LOW",
            Priority::Normal => "NORMAL",
            Priority::High => "HIGH",
            Priority::Critical => "CRITICAL",
        }
    }

    /// Whether `level` sheds records of this priority.
    pub fn is_shed_at(self, level: DegradationLevel) -> bool {
        match level {
            DegradationLevel::Normal | DegradationLevel::Soft => false,
            DegradationLevel::Graceful => self == Priority::Low,
            DegradationLevel::Aggressive => self <= Priority::Normal,
            DegradationLevel::CircuitBreak => self < Priority::Critical,
        }
    }
}

/// As its name (`"CRITICAL"`), also as a map key.
impl Serialize for Priority {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown priority `{s}`"))
    }
}

/// The tier-1 and tier-2 symbols of one exchange.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExchangeTiers {
    pub tier_1: Vec<String>,
    pub tier_2: Vec<String>,
}

/// `[shedding]`: symbol tiers per exchange, and where shedding happens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SheddingConfig {
    /// Shed trades by their Kafka message key, `EXCHANGE:SYMBOL`, before they are decoded: a shed
    /// record then costs a key lookup, not decoding, sequencing and deduplication. Records whose key
    /// does not name a symbol are decoded and shed after deduplication.
    pub by_key: bool,
    pub tiers: BTreeMap<String, ExchangeTiers>,
}

fn symbols(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_string()).collect()
}

impl Default for SheddingConfig {
    fn default() -> Self {
        let tiers = BTreeMap::from([
            (
                // The 20 most liquid ASX names (K2's earlier ASX deployment);
                // tier 2 continues down the ASX 50.
                "ASX".to_string(),
                ExchangeTiers {
                    tier_1: symbols(&[
                        "BHP", "CBA", "CSL", "NAB", "WBC", "ANZ", "WES", "MQG", "RIO", "TLS", "WOW", "FMG",
                        "NCM", "STO", "WPL", "AMC", "GMG", "TCL", "COL", "ALL",
                    ]),
                    tier_2: symbols(&[
                        "WDS", "QBE", "SUN", "REA", "NST", "ORG", "S32", "JHX", "XRO", "IAG", "CPU", "BXB",
                        "ASX", "QAN", "RMD", "SHL", "TWE", "SCG", "MIN", "PLS",
                    ]),
                },
            ),
            (
                // A crypto exchange: the two majors, then the large caps.
                "BINANCE".to_string(),
                ExchangeTiers {
                    tier_1: symbols(&["BTCUSDT", "ETHUSDT"]),
                    tier_2: symbols(&[
                        "SOLUSDT", "BNBUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "AVAXUSDT", "DOTUSDT",
                        "LINKUSDT",
                    ]),
                },
            ),
        ]);
        Self { by_key: true, tiers }
    }
}

impl SheddingConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (exchange, tiers) in &self.tiers {
            let tier_1: HashSet<&str> = tiers.tier_1.iter().map(String::as_str).collect();
            if let Some(both) = tiers.tier_2.iter().find(|s| tier_1.contains(s.as_str())) {
                return Err(format!(
                    "shedding.tiers.{exchange}: symbol {both} is in both tier_1 and tier_2"
                ));
            }
            if let Some(empty) = tiers.tier_1.iter().chain(&tiers.tier_2).find(|s| s.is_empty()) {
                return Err(format!("shedding.tiers.{exchange}: empty symbol name {empty:?}"));
            }
        }
        Ok(())
    }
}

/// Looks up a trade's priority.
#[derive(Debug, Clone)]
pub struct TierTable {
    tiers: HashMap<String, HashMap<String, Priority>>,
}

/// The tiers of the default `[shedding]` config.
impl Default for TierTable {
    fn default() -> Self {
        Self::new(&SheddingConfig::default())
    }
}

impl TierTable {
    pub fn new(config: &SheddingConfig) -> Self {
        let tiers = config
            .tiers
            .iter()
            .map(|(exchange, tiers)| {
                let mut symbols = HashMap::new();
                symbols.extend(tiers.tier_2.iter().map(|s| (s.clone(), Priority::High)));
                symbols.extend(tiers.tier_1.iter().map(|s| (s.clone(), Priority::Critical)));
                (exchange.clone(), symbols)
            })
            .collect();
        Self { tiers }
    }

    /// The priority of a trade of `symbol` on `exchange`.
    pub fn trade_priority(&self, exchange: &str, symbol: &str) -> Priority {
        self.tiers
            .get(exchange)
            .and_then(|symbols| symbols.get(symbol))
            .copied()
            .unwrap_or(Priority::Normal)
    }
}

/// The exchange and symbol of a Kafka key written `EXCHANGE:SYMBOL` (how
/// K2's load generator and feed handlers key trades, so one symbol's trades
/// stay in one partition, in order).
pub fn key_symbol(key: &[u8]) -> Option<(&str, &str)> {
    let key = std::str::from_utf8(key).ok()?;
    let (exchange, symbol) = key.split_once(':')?;
    (!exchange.is_empty() && !symbol.is_empty()).then_some((exchange, symbol))
}

/// Records shed by their Kafka key before they are decoded: a shed record
/// costs a key lookup instead of decoding, sequencing, deduplication and
/// batching, which is what overload is short of. Trades only (their
/// priority comes from the symbol's tier); a record whose key does not name
/// a symbol is decoded and left to the load shedder.
#[derive(Debug, Default)]
pub struct EarlyShed {
    by_priority: BTreeMap<Priority, OffsetRanges>,
    symbols: HashSet<(String, String)>,
}

impl EarlyShed {
    /// Sheds the record at `offset` if `level` sheds its key's priority.
    /// Returns whether it was shed.
    pub fn offer(
        &mut self,
        tiers: &TierTable,
        level: DegradationLevel,
        key: Option<&[u8]>,
        offset: i64,
    ) -> bool {
        let Some((exchange, symbol)) = key.and_then(key_symbol) else {
            return false;
        };
        let priority = tiers.trade_priority(exchange, symbol);
        if !priority.is_shed_at(level) {
            return false;
        }
        self.by_priority.entry(priority).or_default().push(offset);
        if !self.symbols.contains(&(exchange.to_string(), symbol.to_string())) {
            self.symbols.insert((exchange.to_string(), symbol.to_string()));
        }
        true
    }

    pub fn is_empty(&self) -> bool {
        self.by_priority.is_empty()
    }

    /// The ledger entries (one per priority) and the symbols shed.
    pub fn finish(
        self,
        topic: &str,
        partition: i32,
        level: DegradationLevel,
    ) -> (Vec<ShedEntry>, Vec<(String, String)>) {
        let entries = ledger_entries(topic, partition, level, self.by_priority);
        (entries, self.symbols.into_iter().collect())
    }
}

/// One `"shed"` ledger entry per priority of what `level` left out of a
/// chunk of `partition`.
pub fn ledger_entries(
    topic: &str,
    partition: i32,
    level: DegradationLevel,
    shed: BTreeMap<Priority, OffsetRanges>,
) -> Vec<ShedEntry> {
    let now = crate::model::now_us();
    shed.into_iter()
        .map(|(priority, offsets)| ShedEntry {
            entry_id: ShedEntry::entry_id(topic, partition, offsets.first().unwrap_or_default(), priority),
            action: LedgerAction::Shed,
            topic: topic.to_string(),
            partition,
            records: offsets.count(),
            offsets,
            priority,
            level,
            detail: None,
            recorded_at_us: now,
        })
        .collect()
}

/// Offsets as sorted, disjoint inclusive ranges: how the ledger stores what
/// was shed. Written as text, e.g. `100-105,108,110-120`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffsetRanges(Vec<(i64, i64)>);

impl OffsetRanges {
    /// Adds an offset above every offset already added.
    pub fn push(&mut self, offset: i64) {
        match self.0.last_mut() {
            Some((_, last)) if *last + 1 == offset => *last = offset,
            Some((_, last)) => {
                debug_assert!(offset > *last, "offsets are added in order");
                self.0.push((offset, offset));
            }
            None => self.0.push((offset, offset)),
        }
    }

    pub fn ranges(&self) -> &[(i64, i64)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn first(&self) -> Option<i64> {
        self.0.first().map(|r| r.0)
    }

    pub fn last(&self) -> Option<i64> {
        self.0.last().map(|r| r.1)
    }

    /// How many offsets the ranges hold.
    pub fn count(&self) -> u64 {
        self.0.iter().map(|(a, b)| (b - a + 1) as u64).sum()
    }

    /// The offsets of every one of `sets`, as sorted, disjoint ranges
    /// (overlapping and adjacent ranges merged).
    pub fn union<'a>(sets: impl IntoIterator<Item = &'a OffsetRanges>) -> OffsetRanges {
        let mut ranges: Vec<(i64, i64)> = sets.into_iter().flat_map(|s| s.0.iter().copied()).collect();
        ranges.sort_unstable();
        let mut merged: Vec<(i64, i64)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        OffsetRanges(merged)
    }

    pub fn contains(&self, offset: i64) -> bool {
        let i = self.0.partition_point(|(_, last)| *last < offset);
        self.0.get(i).is_some_and(|(first, _)| *first <= offset)
    }

    pub fn iter(&self) -> impl Iterator<Item = i64> + '_ {
        self.0.iter().flat_map(|(a, b)| *a..=*b)
    }
}

impl fmt::Display for OffsetRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (first, last)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if first == last {
                write!(f, "{first}")?;
            } else {
                write!(f, "{first}-{last}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for OffsetRanges {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut ranges = Vec::new();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let bad = || format!("bad offset range `{part}` in `{s}`");
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
                None => {
                    let v: i64 = part.parse().map_err(|_| bad())?;
                    (v, v)
                }
            };
            if first > last
                || ranges
                    .last()
                    .is_some_and(|(_, prev): &(i64, i64)| first <= *prev + 1)
            {
                return Err(bad());
            }
            ranges.push((first, last));
        }
        Ok(Self(ranges))
    }
}

/// What `k2.shed_ledger` records: a shedding (`action = "shed"`) or the
/// backfill that restored it (`action = "backfilled"`, same `entry_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerAction {
    Shed,
    Backfilled,
}

impl LedgerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerAction::Shed => "shed",
            LedgerAction::Backfilled => "backfilled",
        }
    }
}

impl FromStr for LedgerAction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shed" => Ok(LedgerAction::Shed),
            "backfilled" => Ok(LedgerAction::Backfilled),
            other => Err(format!("unknown ledger action `{other}`")),
        }
    }
}

/// One row of `k2.shed_ledger`: one partition's records of one priority
/// that one chunk shed at one level (or, for `Backfilled`, the restoration
/// of such an entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShedEntry {
    /// `<topic>/<partition>/<first offset>/<priority>`: the same for an
    /// entry and its backfill row, and for the entry written again when an
    /// epoch is replayed.
    pub entry_id: String,
    pub action: LedgerAction,
    pub topic: String,
    pub partition: i32,
    pub offsets: OffsetRanges,
    /// Shed: records shed. Backfilled: trades committed by the backfill
    /// (records found already in the table are not counted).
    pub records: u64,
    pub priority: Priority,
    pub level: DegradationLevel,
    /// Backfilled: what the backfill found (duplicates, dead letters,
    /// offsets Kafka no longer holds).
    pub detail: Option<String>,
    /// Microseconds since the Unix epoch (UTC).
    pub recorded_at_us: i64,
}

impl ShedEntry {
    pub fn entry_id(topic: &str, partition: i32, first_offset: i64, priority: Priority) -> String {
        format!("{topic}/{partition}/{first_offset}/{priority}")
    }

    /// The offset that places the row in its commit epoch.
    pub fn first_offset(&self) -> i64 {
        self.offsets.first().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_names_exchange_and_symbol_or_nothing() {
        assert_eq!(key_symbol(b"ASX:BHP"), Some(("ASX", "BHP")));
        assert_eq!(key_symbol(b"BINANCE:BTCUSDT"), Some(("BINANCE", "BTCUSDT")));
        assert_eq!(key_symbol(b"BHP"), None);
        assert_eq!(key_symbol(b":BHP"), None);
        assert_eq!(key_symbol(b"ASX:"), None);
        assert_eq!(key_symbol(&[0xff, b':', b'x']), None);
    }

    #[test]
    fn records_are_shed_by_key_at_the_levels_that_shed_their_tier_and_ledgered_per_priority() {
        let tiers = TierTable::new(&SheddingConfig::default());
        let mut early = EarlyShed::default();
        let level = DegradationLevel::CircuitBreak;
        // BHP is tier 1 (kept), SOLUSDT tier 2 and XYZ tier 3 (shed), no key: decoded.
        assert!(!early.offer(&tiers, level, Some(b"ASX:BHP"), 10));
        assert!(early.offer(&tiers, level, Some(b"BINANCE:SOLUSDT"), 11));
        assert!(early.offer(&tiers, level, Some(b"ASX:XYZ"), 12));
        assert!(early.offer(&tiers, level, Some(b"ASX:XYZ"), 13));
        assert!(!early.offer(&tiers, level, None, 14));
        assert!(early.offer(&tiers, level, Some(b"BINANCE:SOLUSDT"), 16));
        let (entries, mut symbols) = early.finish("t", 3, level);
        symbols.sort();
        assert_eq!(
            symbols,
            [
                ("ASX".to_string(), "XYZ".to_string()),
                ("BINANCE".to_string(), "SOLUSDT".to_string())
            ]
        );
        let by_priority: Vec<(Priority, String, u64)> = entries
            .iter()
            .map(|e| (e.priority, e.offsets.to_string(), e.records))
            .collect();
        assert_eq!(
            by_priority,
            [
                (Priority::Normal, "12-13".to_string(), 2),
                (Priority::High, "11,16".to_string(), 2)
            ]
        );
        assert!(entries.iter().all(|e| e.partition == 3 && e.level == level));
        // AGGRESSIVE keeps tier 2.
        let mut early = EarlyShed::default();
        assert!(!early.offer(&tiers, DegradationLevel::Aggressive, Some(b"BINANCE:SOLUSDT"), 1));
        assert!(early.offer(&tiers, DegradationLevel::Aggressive, Some(b"ASX:XYZ"), 2));
    }

    #[test]
    fn each_level_sheds_what_the_design_says() {
        use DegradationLevel::*;
        let shed = |level| {
            Priority::ALL
                .into_iter()
                .filter(|p| p.is_shed_at(level))
                .collect::<Vec<_>>()
        };
        assert_eq!(shed(Normal), vec![]);
        assert_eq!(shed(Soft), vec![]);
        assert_eq!(shed(Graceful), vec![Priority::Low]);
        assert_eq!(shed(Aggressive), vec![Priority::Low, Priority::Normal]);
        assert_eq!(
            shed(CircuitBreak),
            vec![Priority::Low, Priority::Normal, Priority::High]
        );
    }

    #[test]
    fn tiers_come_from_config_per_exchange() {
        let table = TierTable::new(&SheddingConfig::default());
        assert_eq!(table.trade_priority("ASX", "BHP"), Priority::Critical);
        assert_eq!(table.trade_priority("ASX", "QBE"), Priority::High);
        assert_eq!(table.trade_priority("ASX", "XYZ"), Priority::Normal);
        assert_eq!(table.trade_priority("BINANCE", "BTCUSDT"), Priority::Critical);
        assert_eq!(table.trade_priority("BINANCE", "SUIUSDT"), Priority::Normal);
        // The same symbol elsewhere is not tier 1.
        assert_eq!(table.trade_priority("COINBASE", "BTCUSDT"), Priority::Normal);
        assert_eq!(SheddingConfig::default().tiers["ASX"].tier_1.len(), 20);
    }

    #[test]
    fn a_symbol_in_two_tiers_is_rejected() {
        let mut config = SheddingConfig::default();
        config.tiers.get_mut("ASX").unwrap().tier_2.push("BHP".into());
        let err = config.validate().unwrap_err();
        assert!(err.contains("BHP is in both"), "{err}");
    }

    #[test]
    fn offset_ranges_round_trip_and_answer_membership() {
        let mut ranges = OffsetRanges::default();
        for offset in [100, 101, 102, 105, 107, 108] {
            ranges.push(offset);
        }
        assert_eq!(ranges.to_string(), "100-102,105,107-108");
        assert_eq!(ranges.count(), 6);
        let parsed: OffsetRanges = "100-102,105,107-108".parse().unwrap();
        assert_eq!(parsed, ranges);
        assert!(ranges.contains(101) && ranges.contains(105) && ranges.contains(108));
        assert!(!ranges.contains(99) && !ranges.contains(103) && !ranges.contains(109));
        assert_eq!(
            ranges.iter().collect::<Vec<_>>(),
            vec![100, 101, 102, 105, 107, 108]
        );
        assert!("5-3".parse::<OffsetRanges>().is_err());
        assert!("1-3,3".parse::<OffsetRanges>().is_err());
        assert!("1,x".parse::<OffsetRanges>().is_err());
    }

    #[test]
    fn a_union_merges_overlapping_and_adjacent_ranges_in_order() {
        let sets: Vec<OffsetRanges> = ["30,40-41", "10-19", "15-25", "26", "50"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let union = OffsetRanges::union(&sets);
        assert_eq!(union.to_string(), "10-26,30,40-41,50");
        assert_eq!(union.count(), 17 + 1 + 2 + 1);
        assert!(OffsetRanges::union(&[]).is_empty());
    }
}
