//! The records that flow through a lane: decoded trades and dead letters.
//!
//! Prices and quantities are fixed-point integers at scale 8, which is exactly
//! Iceberg's `decimal(18,8)`: no float ever touches a price.

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trade {
    pub exchange: String,
    pub symbol: String,
    /// Feed sequence number, per (exchange, symbol).
    pub sequence: i64,
    pub trade_id: String,
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
