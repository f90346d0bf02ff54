//! The records that flow through a lane: decoded trades, reference data and
//! dead letters.
//!
//! Prices and quantities are fixed-point integers at scale 8, which is exactly
//! Iceberg's `decimal(18,8)`: no float ever touches a price.

use compact_str::CompactString;

/// Scale of `price` and `quantity`: the integer is the value times 10^8.
pub const DECIMAL_SCALE: i8 = 8;
/// Precision of `price` and `quantity` (Iceberg `decimal(18,8)`).
pub const DECIMAL_PRECISION: u8 = 18;

/// The aggressor side of a trade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Buy,
    Sell,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Buy => "BUY",
            Side::Sell => "SELL",
        }
    }
}

/// One trade, decoded and validated, with the Kafka position it came from.
///
/// Its strings are [`CompactString`]s: up to 24 bytes (every exchange code,
/// symbol and trade id K2 has seen) sit in the struct itself, so a trade
/// costs no allocation of its own between decoding and its Arrow row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trade {
    pub exchange: CompactString,
    pub symbol: CompactString,
    /// Feed sequence number, per (exchange, symbol).
    pub sequence: i64,
    pub trade_id: CompactString,
    /// Price times 10^8.
    pub price: i128,
    /// Quantity times 10^8.
    pub quantity: i128,
    pub side: Side,
    /// Exchange event time, microseconds since the Unix epoch (UTC).
    pub event_time_us: i64,
    /// When the trade entered the platform, microseconds since the Unix epoch (UTC).
    pub ingest_time_us: i64,
    /// Kafka partition the record was read from.
    pub partition: i32,
    /// Kafka offset of the record.
    pub offset: i64,
}

/// One reference-data update of an instrument (its name, currency, tick and
/// lot size, trading status from a point in time), as stored in
/// `market.reference`. Reference data travels in the trades topic, keyed by
/// its symbol like the symbol's trades, and is always LOW priority: the first
/// thing shed under load (ledgered, backfilled later), never lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceRecord {
    pub exchange: String,
    pub symbol: String,
    /// The instrument's name, when the feed gives one.
    pub name: Option<String>,
    /// The currency prices are quoted in, when the feed gives one.
    pub currency: Option<String>,
    /// Smallest price step, times 10^8 (> 0).
    pub tick_size: i128,
    /// Smallest quantity step, times 10^8 (> 0).
    pub lot_size: i128,
    /// Trading status as the feed names it (`trading`, `halted`, ...).
    pub status: String,
    /// When the update takes effect, microseconds since the Unix epoch (UTC).
    pub effective_time_us: i64,
    /// When the record entered the platform, microseconds since the Unix epoch (UTC).
    pub ingest_time_us: i64,
    pub partition: i32,
    pub offset: i64,
}

/// A record that could not be decoded or failed validation. It is written to
/// `k2.dead_letters` with the reason, never dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub raw: Vec<u8>,
    pub reason: String,
    /// Microseconds since the Unix epoch (UTC).
    pub dead_lettered_at_us: i64,
}

/// Current wall-clock time in microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// What identifies one trade: (exchange, symbol, trade id). The symbol is
/// part of it because some exchanges number trades per symbol (Binance's `t`).
pub type TradeKey = (String, String, String);

/// A gap or reset of a (exchange, symbol) sequence, as stored in
/// `k2.sequence_gaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceEventRow {
    /// `"gap"` or `"reset"`.
    pub kind: &'static str,
    pub exchange: String,
    pub symbol: String,
    /// Gap: first missing number. Reset: none.
    pub expected: Option<i64>,
    /// The number that revealed the gap, or the number the feed restarted at.
    pub received: i64,
    /// Gap: numbers still missing when its reorder window closed. Reset: none.
    pub missing: Option<i64>,
    /// Reset: the highest number before the reset. Gap: none.
    pub previous: Option<i64>,
    pub topic: String,
    pub partition: i32,
    /// Offset of the record that revealed the gap or reset.
    pub offset: i64,
    /// Offset of the record whose arrival completed the event (a gap is
    /// reported when its reorder window closes). The event belongs to the
    /// commit epoch of this offset.
    pub reported_offset: i64,
    /// Microseconds since the Unix epoch (UTC).
    pub detected_at_us: i64,
}

/// A trade whose id the long-window Bloom filter has probably seen before
/// but no exact structure can confirm. Kept in `market.trades` (or dropped,
/// by policy) and recorded in `k2.probable_duplicates` either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbableDuplicate {
    pub exchange: String,
    pub symbol: String,
    pub trade_id: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Whether the trade was kept in the trades table.
    pub kept: bool,
    /// Microseconds since the Unix epoch (UTC).
    pub detected_at_us: i64,
}

/// What a chunk of records produced besides trades; each goes to its own
/// table of K2's, committed in the same epoch as the trades around it.
#[derive(Debug, Default)]
pub struct SideRows {
    pub dead_letters: Vec<DeadLetter>,
    pub sequence_events: Vec<SequenceEventRow>,
    pub probable_duplicates: Vec<ProbableDuplicate>,
    /// What the load shedder left out, for `k2.shed_ledger`.
    pub shed: Vec<crate::shedding::ShedEntry>,
    /// Reference data of the range, for `market.reference`.
    pub reference: Vec<ReferenceRecord>,
}

impl SideRows {
    pub fn extend(&mut self, other: SideRows) {
        self.dead_letters.extend(other.dead_letters);
        self.sequence_events.extend(other.sequence_events);
        self.probable_duplicates.extend(other.probable_duplicates);
        self.shed.extend(other.shed);
        self.reference.extend(other.reference);
    }

    pub fn is_empty(&self) -> bool {
        self.dead_letters.is_empty()
            && self.sequence_events.is_empty()
            && self.probable_duplicates.is_empty()
            && self.shed.is_empty()
            && self.reference.is_empty()
    }
}
