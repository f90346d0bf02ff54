//! Turns one Kafka payload into a validated [`Trade`] or [`ReferenceRecord`]
//! (a [`Record`]), or says precisely why not.
//!
//! Every record the pipeline reads passes through here, so this is where bad input
//! stops. A payload that fails is never guessed at or repaired (a rounded price is a
//! different trade): it becomes a dead letter whose reason is the [`DecodeError`]
//! message, verbatim, so each message names the field and the offending value.
//!
//! Two wire formats are understood: K2's canonical JSON and Binance's trade stream
//! event. Canonical JSON also carries reference data: an object with
//! `"type":"reference"` is a [`ReferenceRecord`] (whatever the configured format:
//! Binance's stream has no reference data); `"type"` absent or `"trade"` is a trade.
//! All are read in one pass over the bytes into a single loose record that borrows
//! strings from the payload (escaped strings are the only copies), and the format is
//! decided afterwards; this runs for every message, hundreds of thousands per second.
//!
//! Plain logic with no actix and no Kafka: the consumer actor owns a [`TradeDecoder`]
//! and calls [`TradeDecoder::decode_record`].

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use compact_str::{CompactString, ToCompactString};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::model::{DECIMAL_PRECISION, DECIMAL_SCALE, ReferenceRecord, Side, Trade};

/// Digits allowed after the decimal point: the scale of `decimal(18,8)`.
const MAX_FRACTION_DIGITS: usize = DECIMAL_SCALE as usize;
/// Digits allowed before the decimal point (leading zeros aside): |value| < 10^10.
const MAX_INTEGER_DIGITS: usize = DECIMAL_PRECISION as usize - DECIMAL_SCALE as usize;
// The error messages below spell out "8 decimal places" and "decimal(18,8)".
const _: () = assert!(DECIMAL_SCALE == 8 && DECIMAL_PRECISION == 18);

/// How much of an offending value an error message repeats: enough to recognise it,
/// not so much that a hostile payload bloats every dead letter.
const MAX_ECHOED_CHARS: usize = 64;

/// Which wire format the payloads of a topic are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TradeFormat {
    /// K2's own JSON trade.
    Canonical,
    /// Binance's `trade` stream event.
    Binance,
    /// Per payload: an object with `"e":"trade"` is Binance, anything else canonical.
    Auto,
}

/// How a [`TradeDecoder`] reads and validates payloads.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    pub format: TradeFormat,
    /// A trade whose event time is further than this from now, either way, is rejected.
    pub max_event_time_skew_ms: i64,
    /// The `exchange` given to Binance trades, which do not carry one.
    pub binance_exchange: String,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        DecoderConfig {
            format: TradeFormat::Auto,
            max_event_time_skew_ms: 86_400_000,
            binance_exchange: "BINANCE".to_owned(),
        }
    }
}

/// Why a payload is not a valid trade. The `Display` text is the dead-letter reason.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error("invalid UTF-8 at byte {byte}")]
    InvalidUtf8 { byte: usize },
    #[error("malformed JSON at line {line} column {column}: {message}")]
    MalformedJson {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("expected a JSON object, found {found}")]
    NotAnObject { found: &'static str },
    #[error("duplicate field `{field}`")]
    DuplicateField { field: &'static str },
    #[error("missing field `{field}`")]
    MissingField { field: &'static str },
    #[error("field `{field}`: expected {expected}, found {found}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error("field `{field}`: must not be empty")]
    EmptyString { field: &'static str },
    #[error("field `{field}`: expected a plain decimal like \"45.12\", got {value:?}")]
    NotADecimal { field: &'static str, value: String },
    #[error("field `{field}`: more than 8 decimal places, got {value:?}")]
    TooManyDecimalPlaces { field: &'static str, value: String },
    #[error("field `{field}`: out of range for decimal(18,8), got {value:?}")]
    DecimalOutOfRange { field: &'static str, value: String },
    #[error("field `{field}`: must be > 0, got {value}")]
    NotPositive { field: &'static str, value: String },
    #[error("field `{field}`: unknown side {value:?} (expected buy or sell)")]
    UnknownSide { field: &'static str, value: String },
    #[error("field `{field}`: must be >= 0, got {value}")]
    Negative { field: &'static str, value: i64 },
    #[error("field `{field}`: {value} does not fit in a signed 64-bit integer")]
    IntegerOverflow { field: &'static str, value: u64 },
    #[error("field `{field}`: {value:?} is not an RFC 3339 timestamp ({reason})")]
    BadTimestamp {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("field `{field}`: {value} ms since the epoch is outside the supported time range")]
    TimestampOutOfRange { field: &'static str, value: i64 },
    #[error(
        "field `{field}`: {} is {} (limit {})",
        fmt_timestamp_us(*.event_time_us),
        fmt_skew(*.skew_us),
        fmt_limit_ms(*.limit_ms)
    )]
    EventTimeSkew {
        field: &'static str,
        event_time_us: i64,
        /// Event time minus now: positive when the event is in the future.
        skew_us: i128,
        limit_ms: i64,
    },
    #[error("field `e`: unsupported Binance event type {value:?} (expected \"trade\")")]
    UnsupportedEvent { value: String },
    #[error("field `type`: unsupported record type {value:?} (expected \"trade\" or \"reference\")")]
    UnsupportedRecordType { value: String },
}

impl DecodeError {
    /// A short, low-cardinality label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::InvalidUtf8 { .. } => "utf8",
            DecodeError::MalformedJson { .. } => "json",
            DecodeError::NotAnObject { .. } | DecodeError::WrongType { .. } => "bad_type",
            DecodeError::DuplicateField { .. } => "duplicate_field",
            DecodeError::MissingField { .. } => "missing_field",
            DecodeError::EmptyString { .. }
            | DecodeError::NotADecimal { .. }
            | DecodeError::TooManyDecimalPlaces { .. }
            | DecodeError::DecimalOutOfRange { .. }
            | DecodeError::NotPositive { .. }
            | DecodeError::UnknownSide { .. }
            | DecodeError::Negative { .. }
            | DecodeError::IntegerOverflow { .. }
            | DecodeError::BadTimestamp { .. }
            | DecodeError::TimestampOutOfRange { .. } => "bad_value",
            DecodeError::EventTimeSkew { .. } => "event_time_skew",
            DecodeError::UnsupportedEvent { .. } | DecodeError::UnsupportedRecordType { .. } => {
                "unsupported_event"
            }
        }
    }
}

/// What one payload holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Trade(Trade),
    Reference(ReferenceRecord),
}

/// Decodes and validates trade and reference-data payloads. Holds only configuration, so one per
/// consumer is enough and `decode` takes `&self`.
#[derive(Debug, Clone)]
pub struct TradeDecoder {
    config: DecoderConfig,
}

impl TradeDecoder {
    pub fn new(config: DecoderConfig) -> Self {
        TradeDecoder { config }
    }

    /// Decode and validate one Kafka payload. `now_us` is wall-clock now (µs since epoch) used for the
    /// skew check and as ingest_time when the message has none.
    pub fn decode_record(
        &self,
        payload: &[u8],
        partition: i32,
        offset: i64,
        now_us: i64,
    ) -> Result<Record, DecodeError> {
        if payload.iter().all(|&byte| is_json_whitespace(byte)) {
            return Err(DecodeError::Empty);
        }
        let text = std::str::from_utf8(payload).map_err(|err| DecodeError::InvalidUtf8 {
            byte: err.valid_up_to(),
        })?;
        let mut fields = Fields::parse(text)?;
        let position = Position {
            partition,
            offset,
            now_us,
        };
        match fields.take(Key::Type) {
            None | Some(Value::Null) => {}
            Some(Value::Str(kind)) if kind == "trade" => {}
            Some(Value::Str(kind)) if kind == "reference" => {
                return self.reference(&mut fields, position).map(Record::Reference);
            }
            Some(Value::Str(kind)) => {
                return Err(DecodeError::UnsupportedRecordType {
                    value: excerpt(&kind),
                });
            }
            Some(other) => return Err(wrong_type(Key::Type, "a string", &other)),
        }
        let is_binance = match self.config.format {
            TradeFormat::Canonical => false,
            TradeFormat::Binance => true,
            TradeFormat::Auto => fields.looks_like_binance(),
        };
        let trade = if is_binance {
            self.binance(&mut fields, position)
        } else {
            self.canonical(&mut fields, position)
        };
        trade.map(Record::Trade)
    }

    fn reference(&self, fields: &mut Fields<'_>, at: Position) -> Result<ReferenceRecord, DecodeError> {
        let exchange = fields.non_empty_string(Key::Exchange)?;
        let symbol = fields.non_empty_string(Key::Symbol)?;
        let name = fields.optional_string(Key::Name)?;
        let currency = fields.optional_string(Key::Currency)?;
        let tick_size = fields.decimal(Key::TickSize)?;
        let lot_size = fields.decimal(Key::LotSize)?;
        let status = fields.non_empty_string(Key::Status)?;
        let effective_time_us = fields.rfc3339_us(Key::EffectiveTime)?;
        self.check_skew(Key::EffectiveTime, effective_time_us, at.now_us)?;
        let ingest_time_us = fields.ingest_time_us(at.now_us)?;
        Ok(ReferenceRecord {
            exchange,
            symbol,
            name,
            currency,
            tick_size,
            lot_size,
            status,
            effective_time_us,
            ingest_time_us,
            partition: at.partition,
            offset: at.offset,
        })
    }

    fn canonical(&self, fields: &mut Fields<'_>, at: Position) -> Result<Trade, DecodeError> {
        let exchange = fields.non_empty_text(Key::Exchange)?;
        let symbol = fields.non_empty_text(Key::Symbol)?;
        let sequence = fields.non_negative_integer(Key::Sequence)?;
        let trade_id = fields.trade_id(Key::TradeId)?;
        let price = fields.decimal(Key::Price)?;
        let quantity = fields.decimal(Key::Quantity)?;
        let side = fields.side(Key::Side)?;
        let event_time_us = fields.rfc3339_us(Key::EventTime)?;
        self.check_skew(Key::EventTime, event_time_us, at.now_us)?;
        let ingest_time_us = fields.ingest_time_us(at.now_us)?;
        Ok(Trade {
            exchange,
            symbol,
            sequence,
            trade_id,
            price,
            quantity,
            side,
            event_time_us,
            ingest_time_us,
            partition: at.partition,
            offset: at.offset,
        })
    }

    fn binance(&self, fields: &mut Fields<'_>, at: Position) -> Result<Trade, DecodeError> {
        match fields.take(Key::BinanceEventType) {
            None => return Err(missing(Key::BinanceEventType)),
            Some(Value::Str(event_type)) if event_type == "trade" => {}
            Some(Value::Str(event_type)) => {
                return Err(DecodeError::UnsupportedEvent {
                    value: excerpt(&event_type),
                });
            }
            Some(other) => return Err(wrong_type(Key::BinanceEventType, "a string", &other)),
        }
        fields.integer(Key::BinanceEventTime)?;
        let symbol = fields.non_empty_text(Key::BinanceSymbol)?;
        let trade_id = fields.non_negative_integer(Key::BinanceTradeId)?;
        let price = fields.decimal(Key::BinancePrice)?;
        let quantity = fields.decimal(Key::BinanceQuantity)?;
        // The maker is the resting order, so a maker buyer means the aggressor sold.
        let side = if fields.boolean(Key::BinanceBuyerIsMaker)? {
            Side::Sell
        } else {
            Side::Buy
        };
        let trade_time_ms = fields.integer(Key::BinanceTradeTime)?;
        let event_time_us = trade_time_ms
            .checked_mul(1000)
            .ok_or(DecodeError::TimestampOutOfRange {
                field: Key::BinanceTradeTime.name(),
                value: trade_time_ms,
            })?;
        self.check_skew(Key::BinanceTradeTime, event_time_us, at.now_us)?;
        Ok(Trade {
            exchange: CompactString::from(self.config.binance_exchange.as_str()),
            symbol,
            sequence: trade_id,
            trade_id: trade_id.to_compact_string(),
            price,
            quantity,
            side,
            event_time_us,
            ingest_time_us: at.now_us,
            partition: at.partition,
            offset: at.offset,
        })
    }

    fn check_skew(&self, key: Key, event_time_us: i64, now_us: i64) -> Result<(), DecodeError> {
        let skew_us = i128::from(event_time_us) - i128::from(now_us);
        let limit_ms = self.config.max_event_time_skew_ms;
        if skew_us.abs() > i128::from(limit_ms) * 1000 {
            return Err(DecodeError::EventTimeSkew {
                field: key.name(),
                event_time_us,
                skew_us,
                limit_ms,
            });
        }
        Ok(())
    }
}

/// Where a payload came from and when it is being decoded.
#[derive(Clone, Copy)]
struct Position {
    partition: i32,
    offset: i64,
    now_us: i64,
}

fn is_json_whitespace(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

/// The fields of both formats. Binance's one-letter keys never collide with the
/// canonical names, so one pass fills whichever are present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Exchange,
    Symbol,
    Sequence,
    TradeId,
    Price,
    Quantity,
    Side,
    EventTime,
    IngestTime,
    BinanceEventType,
    BinanceEventTime,
    BinanceSymbol,
    BinanceTradeId,
    BinancePrice,
    BinanceQuantity,
    BinanceTradeTime,
    BinanceBuyerIsMaker,
    Type,
    Name,
    Currency,
    TickSize,
    LotSize,
    Status,
    EffectiveTime,
}

const KEY_COUNT: usize = Key::EffectiveTime as usize + 1;

impl Key {
    fn from_name(name: &str) -> Option<Key> {
        Some(match name {
            "exchange" => Key::Exchange,
            "symbol" => Key::Symbol,
            "sequence" => Key::Sequence,
            "trade_id" => Key::TradeId,
            "price" => Key::Price,
            "quantity" => Key::Quantity,
            "side" => Key::Side,
            "event_time" => Key::EventTime,
            "ingest_time" => Key::IngestTime,
            "e" => Key::BinanceEventType,
            "E" => Key::BinanceEventTime,
            "s" => Key::BinanceSymbol,
            "t" => Key::BinanceTradeId,
            "p" => Key::BinancePrice,
            "q" => Key::BinanceQuantity,
            "T" => Key::BinanceTradeTime,
            "m" => Key::BinanceBuyerIsMaker,
            "type" => Key::Type,
            "name" => Key::Name,
            "currency" => Key::Currency,
            "tick_size" => Key::TickSize,
            "lot_size" => Key::LotSize,
            "status" => Key::Status,
            "effective_time" => Key::EffectiveTime,
            _ => return None,
        })
    }

    /// The key as it appears in the payload, which is what error messages name.
    fn name(self) -> &'static str {
        match self {
            Key::Exchange => "exchange",
            Key::Symbol => "symbol",
            Key::Sequence => "sequence",
            Key::TradeId => "trade_id",
            Key::Price => "price",
            Key::Quantity => "quantity",
            Key::Side => "side",
            Key::EventTime => "event_time",
            Key::IngestTime => "ingest_time",
            Key::BinanceEventType => "e",
            Key::BinanceEventTime => "E",
            Key::BinanceSymbol => "s",
            Key::BinanceTradeId => "t",
            Key::BinancePrice => "p",
            Key::BinanceQuantity => "q",
            Key::BinanceTradeTime => "T",
            Key::BinanceBuyerIsMaker => "m",
            Key::Type => "type",
            Key::Name => "name",
            Key::Currency => "currency",
            Key::TickSize => "tick_size",
            Key::LotSize => "lot_size",
            Key::Status => "status",
            Key::EffectiveTime => "effective_time",
        }
    }
}

/// An object key: one we read, or one we skip.
struct MaybeKey(Option<Key>);

impl<'de> Deserialize<'de> for MaybeKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = MaybeKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<MaybeKey, E> {
                Ok(MaybeKey(Key::from_name(name)))
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// A field's value as it appeared in the payload. Kept loose so that a value of the
/// wrong type becomes an error naming the field, not a serde message that doesn't.
#[derive(Debug)]
enum Value<'a> {
    Str(Cow<'a, str>),
    /// serde_json hands over negative integers as i64 and the rest as u64.
    Int(i64),
    UInt(u64),
    /// Any number that is not a 64-bit integer: a fraction, an exponent, or too large.
    Float,
    Bool(bool),
    Null,
    Array,
    Object,
}

impl Value<'_> {
    fn type_name(&self) -> &'static str {
        match self {
            Value::Str(_) => "string",
            Value::Int(_) | Value::UInt(_) | Value::Float => "number",
            Value::Bool(_) => "boolean",
            Value::Null => "null",
            Value::Array => "array",
            Value::Object => "object",
        }
    }
}

impl<'de> Deserialize<'de> for Value<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value<'de>, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value<'de>, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value<'de>, E> {
        Ok(Value::UInt(v))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Value<'de>, E> {
        Ok(Value::Float)
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Value<'de>, E> {
        Ok(Value::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value<'de>, E> {
        Ok(Value::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value<'de>, E> {
        Ok(Value::Str(Cow::Owned(v)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value<'de>, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value<'de>, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Value::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Value::Object)
    }
}

/// The known fields of one payload, each taken out once when the trade is built.
struct Fields<'a> {
    values: [Option<Value<'a>>; KEY_COUNT],
    /// The first known key that appeared twice: ambiguous, so the payload is rejected.
    duplicate: Option<Key>,
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(FieldsVisitor)
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
        let mut fields = Fields {
            values: Default::default(),
            duplicate: None,
        };
        while let Some(MaybeKey(key)) = map.next_key()? {
            // Unknown fields are skipped so producers can add fields before K2 reads them.
            let Some(key) = key else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            let value = map.next_value::<Value<'de>>()?;
            let slot = &mut fields.values[key as usize];
            if slot.is_some() {
                fields.duplicate.get_or_insert(key);
            } else {
                *slot = Some(value);
            }
        }
        Ok(fields)
    }
}

impl<'a> Fields<'a> {
    fn parse(text: &'a str) -> Result<Fields<'a>, DecodeError> {
        let first = text.bytes().find(|&byte| !is_json_whitespace(byte));
        if first != Some(b'{') {
            // Off the hot path: tell well-formed non-objects apart from garbage.
            return Err(match serde_json::from_str::<IgnoredAny>(text) {
                Err(err) => malformed_json(&err),
                Ok(_) => DecodeError::NotAnObject {
                    found: match first {
                        Some(b'[') => "array",
                        Some(b'"') => "string",
                        Some(b't' | b'f') => "boolean",
                        Some(b'n') => "null",
                        _ => "number",
                    },
                },
            });
        }
        let fields: Fields<'a> = serde_json::from_str(text).map_err(|err| malformed_json(&err))?;
        if let Some(key) = fields.duplicate {
            return Err(DecodeError::DuplicateField { field: key.name() });
        }
        Ok(fields)
    }

    /// Auto mode: `"e":"trade"` is Binance. So is any other `e` on an object without an
    /// `exchange`, so that a Binance event of another type is reported as such rather
    /// than as a canonical trade missing its exchange.
    fn looks_like_binance(&self) -> bool {
        match &self.values[Key::BinanceEventType as usize] {
            Some(Value::Str(event_type)) if event_type == "trade" => true,
            Some(_) => self.values[Key::Exchange as usize].is_none(),
            None => false,
        }
    }

    fn take(&mut self, key: Key) -> Option<Value<'a>> {
        self.values[key as usize].take()
    }

    fn required(&mut self, key: Key) -> Result<Value<'a>, DecodeError> {
        self.take(key).ok_or_else(|| missing(key))
    }

    fn non_empty_string(&mut self, key: Key) -> Result<String, DecodeError> {
        self.non_empty_str(key).map(Cow::into_owned)
    }

    /// A trade's string, inline when short (`Trade`).
    fn non_empty_text(&mut self, key: Key) -> Result<CompactString, DecodeError> {
        self.non_empty_str(key).map(|s| CompactString::from(s.as_ref()))
    }

    fn non_empty_str(&mut self, key: Key) -> Result<Cow<'a, str>, DecodeError> {
        match self.required(key)? {
            Value::Str(s) if s.is_empty() => Err(DecodeError::EmptyString { field: key.name() }),
            Value::Str(s) => Ok(s),
            other => Err(wrong_type(key, "a string", &other)),
        }
    }

    /// A string that may be absent or null; when present it must not be empty.
    fn optional_string(&mut self, key: Key) -> Result<Option<String>, DecodeError> {
        match self.take(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Str(s)) if s.is_empty() => Err(DecodeError::EmptyString { field: key.name() }),
            Some(Value::Str(s)) => Ok(Some(s.into_owned())),
            Some(other) => Err(wrong_type(key, "a string", &other)),
        }
    }

    /// `ingest_time` when the producer stamped one, else now.
    fn ingest_time_us(&mut self, now_us: i64) -> Result<i64, DecodeError> {
        match self.take(Key::IngestTime) {
            None | Some(Value::Null) => Ok(now_us),
            Some(value) => rfc3339_us(Key::IngestTime, value),
        }
    }

    /// A trade id: a non-empty string, or an integer written as its decimal string.
    fn trade_id(&mut self, key: Key) -> Result<CompactString, DecodeError> {
        match self.required(key)? {
            Value::Str(s) if s.is_empty() => Err(DecodeError::EmptyString { field: key.name() }),
            Value::Str(s) => Ok(CompactString::from(s.as_ref())),
            Value::Int(i) => Ok(i.to_compact_string()),
            Value::UInt(u) => Ok(u.to_compact_string()),
            other => Err(wrong_type(key, "a string or an integer", &other)),
        }
    }

    fn integer(&mut self, key: Key) -> Result<i64, DecodeError> {
        match self.required(key)? {
            Value::Int(i) => Ok(i),
            Value::UInt(u) => i64::try_from(u).map_err(|_| DecodeError::IntegerOverflow {
                field: key.name(),
                value: u,
            }),
            other => Err(wrong_integer_type(key, "an integer", &other)),
        }
    }

    fn non_negative_integer(&mut self, key: Key) -> Result<i64, DecodeError> {
        match self.required(key)? {
            Value::Int(i) if i < 0 => Err(DecodeError::Negative {
                field: key.name(),
                value: i,
            }),
            Value::Int(i) => Ok(i),
            Value::UInt(u) => i64::try_from(u).map_err(|_| DecodeError::IntegerOverflow {
                field: key.name(),
                value: u,
            }),
            other => Err(wrong_integer_type(key, "a non-negative integer", &other)),
        }
    }

    fn boolean(&mut self, key: Key) -> Result<bool, DecodeError> {
        match self.required(key)? {
            Value::Bool(b) => Ok(b),
            other => Err(wrong_type(key, "a boolean", &other)),
        }
    }

    fn decimal(&mut self, key: Key) -> Result<i128, DecodeError> {
        match self.required(key)? {
            Value::Str(s) => parse_positive_decimal(key.name(), &s),
            other => Err(wrong_type(key, "a decimal string", &other)),
        }
    }

    fn side(&mut self, key: Key) -> Result<Side, DecodeError> {
        match self.required(key)? {
            Value::Str(s) => parse_side(&s).ok_or_else(|| DecodeError::UnknownSide {
                field: key.name(),
                value: excerpt(&s),
            }),
            other => Err(wrong_type(key, "\"buy\" or \"sell\"", &other)),
        }
    }

    fn rfc3339_us(&mut self, key: Key) -> Result<i64, DecodeError> {
        let value = self.required(key)?;
        rfc3339_us(key, value)
    }
}

fn rfc3339_us(key: Key, value: Value<'_>) -> Result<i64, DecodeError> {
    match value {
        Value::Str(s) => DateTime::parse_from_rfc3339(&s)
            .map(|time| time.timestamp_micros())
            .map_err(|err| DecodeError::BadTimestamp {
                field: key.name(),
                value: excerpt(&s),
                reason: err.to_string(),
            }),
        other => Err(wrong_type(key, "an RFC 3339 timestamp string", &other)),
    }
}

fn parse_side(s: &str) -> Option<Side> {
    if s.eq_ignore_ascii_case("buy") || s.eq_ignore_ascii_case("b") {
        Some(Side::Buy)
    } else if s.eq_ignore_ascii_case("sell") || s.eq_ignore_ascii_case("s") {
        Some(Side::Sell)
    } else {
        None
    }
}

/// Parses a plain decimal, `-?[0-9]*\.?[0-9]+`, into the exact value times 10^8.
///
/// Anything else is refused rather than interpreted: exponents, signs other than a
/// leading minus, surrounding spaces, NaN and infinities. More than 8 fractional digits
/// is refused too, even trailing zeros, because rounding would change the trade.
fn parse_positive_decimal(field: &'static str, s: &str) -> Result<i128, DecodeError> {
    let (negative, unsigned) = match s.as_bytes() {
        [b'-', rest @ ..] => (true, rest),
        bytes => (false, bytes),
    };
    let (integer, fraction) = match unsigned.iter().position(|&byte| byte == b'.') {
        Some(dot) => (&unsigned[..dot], Some(&unsigned[dot + 1..])),
        None => (unsigned, None),
    };
    let well_formed = integer.iter().all(u8::is_ascii_digit)
        && match fraction {
            Some(digits) => !digits.is_empty() && digits.iter().all(u8::is_ascii_digit),
            None => !integer.is_empty(),
        };
    if !well_formed {
        return Err(DecodeError::NotADecimal {
            field,
            value: excerpt(s),
        });
    }
    let fraction = fraction.unwrap_or_default();
    if fraction.len() > MAX_FRACTION_DIGITS {
        return Err(DecodeError::TooManyDecimalPlaces {
            field,
            value: excerpt(s),
        });
    }
    let first_significant = integer
        .iter()
        .position(|&byte| byte != b'0')
        .unwrap_or(integer.len());
    let integer = &integer[first_significant..];
    if integer.len() > MAX_INTEGER_DIGITS {
        return Err(DecodeError::DecimalOutOfRange {
            field,
            value: excerpt(s),
        });
    }
    // At most 18 digits in all, so this cannot overflow an i64.
    let mut scaled: i64 = 0;
    for &digit in integer.iter().chain(fraction) {
        scaled = scaled * 10 + i64::from(digit - b'0');
    }
    scaled *= 10_i64.pow((MAX_FRACTION_DIGITS - fraction.len()) as u32);
    if negative || scaled == 0 {
        return Err(DecodeError::NotPositive {
            field,
            value: excerpt(s),
        });
    }
    Ok(i128::from(scaled))
}

fn missing(key: Key) -> DecodeError {
    DecodeError::MissingField { field: key.name() }
}

fn wrong_type(key: Key, expected: &'static str, found: &Value<'_>) -> DecodeError {
    DecodeError::WrongType {
        field: key.name(),
        expected,
        found: found.type_name(),
    }
}

/// Like [`wrong_type`], but "found number" would puzzle the reader of `"sequence": 1.5`.
fn wrong_integer_type(key: Key, expected: &'static str, found: &Value<'_>) -> DecodeError {
    DecodeError::WrongType {
        field: key.name(),
        expected,
        found: match found {
            Value::Float => "a number that is not a 64-bit integer",
            other => other.type_name(),
        },
    }
}

fn malformed_json(err: &serde_json::Error) -> DecodeError {
    let (line, column) = (err.line(), err.column());
    // serde_json appends the position to its message; we put it first instead.
    let text = err.to_string();
    let suffix = format!(" at line {line} column {column}");
    let message = text.strip_suffix(&suffix).unwrap_or(&text).to_owned();
    DecodeError::MalformedJson {
        line,
        column,
        message,
    }
}

/// The start of a value, for repeating it in an error message.
fn excerpt(s: &str) -> String {
    match s.char_indices().nth(MAX_ECHOED_CHARS) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_owned(),
    }
}

fn fmt_timestamp_us(us: i64) -> String {
    match DateTime::<Utc>::from_timestamp_micros(us) {
        Some(time) => time.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        None => format!("{us} µs since the epoch"),
    }
}

/// "1500 days from now", "2.5 hours ago". Rounded up, so a skew just past the limit
/// never reads as equal to it.
fn fmt_skew(skew_us: i128) -> String {
    const UNITS: [(u128, &str, &str); 6] = [
        (86_400_000_000, "day", "days"),
        (3_600_000_000, "hour", "hours"),
        (60_000_000, "minute", "minutes"),
        (1_000_000, "second", "seconds"),
        (1_000, "millisecond", "milliseconds"),
        (1, "microsecond", "microseconds"),
    ];
    let magnitude = skew_us.unsigned_abs();
    let (unit, singular, plural) = UNITS
        .into_iter()
        .find(|&(unit, _, _)| magnitude >= unit)
        .unwrap_or(UNITS[UNITS.len() - 1]);
    let tenths = (magnitude * 10).div_ceil(unit);
    let amount = if tenths >= 100 || tenths % 10 == 0 {
        let whole = tenths.div_ceil(10);
        format!("{whole} {}", if whole == 1 { singular } else { plural })
    } else {
        format!("{}.{} {plural}", tenths / 10, tenths % 10)
    };
    if skew_us > 0 {
        format!("{amount} from now")
    } else {
        format!("{amount} ago")
    }
}

/// "24h", "90s", "1500ms": the limit as an operator would have configured it.
fn fmt_limit_ms(ms: i64) -> String {
    match ms {
        0 => "0ms".to_owned(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}min", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// 2026-11-23T10:15:30.123456Z, the event time of the sample canonical trade.
    const EVENT_US: i64 = 1_795_428_930_123_456;
    const NOW_US: i64 = EVENT_US + 250_000;
    const DAY_US: i64 = 86_400_000_000;

    fn canonical() -> serde_json::Value {
        json!({
            "exchange": "NASDAQ",
            "symbol": "AAPL",
            "sequence": 987_654,
            "trade_id": "T-1",
            "price": "45.12",
            "quantity": "100.5",
            "side": "buy",
            "event_time": "2026-11-23T10:15:30.123456Z",
            "ingest_time": "2026-11-23T10:15:30.200000Z",
        })
    }

    /// Binance's own example, with times moved next to `NOW_US`.
    fn binance() -> serde_json::Value {
        json!({
            "e": "trade",
            "E": NOW_US / 1000,
            "s": "BNBBTC",
            "t": 12345,
            "p": "0.001",
            "q": "100",
            "T": EVENT_US / 1000,
            "m": true,
            "M": true,
        })
    }

    fn with(mut payload: serde_json::Value, key: &str, value: serde_json::Value) -> Vec<u8> {
        payload[key] = value;
        payload.to_string().into_bytes()
    }

    fn without(mut payload: serde_json::Value, key: &str) -> Vec<u8> {
        payload.as_object_mut().expect("samples are objects").remove(key);
        payload.to_string().into_bytes()
    }

    fn decode(payload: &[u8]) -> Result<Trade, DecodeError> {
        decode_as(TradeFormat::Auto, payload)
    }

    fn decode_as(format: TradeFormat, payload: &[u8]) -> Result<Trade, DecodeError> {
        let config = DecoderConfig {
            format,
            ..DecoderConfig::default()
        };
        match TradeDecoder::new(config).decode_record(payload, 3, 42, NOW_US)? {
            Record::Trade(trade) => Ok(trade),
            Record::Reference(reference) => panic!("a trade was expected, got {reference:?}"),
        }
    }

    fn price(value: &str) -> Result<Trade, DecodeError> {
        decode(&with(canonical(), "price", json!(value)))
    }

    #[test]
    fn canonical_trade_round_trips_every_field() {
        let trade = decode(canonical().to_string().as_bytes()).expect("valid trade");
        assert_eq!(
            trade,
            Trade {
                exchange: "NASDAQ".into(),
                symbol: "AAPL".into(),
                sequence: 987_654,
                trade_id: "T-1".into(),
                price: 4_512_000_000,
                quantity: 10_050_000_000,
                side: Side::Buy,
                event_time_us: EVENT_US,
                ingest_time_us: 1_795_428_930_200_000,
                partition: 3,
                offset: 42,
            }
        );
    }

    #[test]
    fn canonical_ingest_time_defaults_to_now_when_absent_or_null() {
        let absent = decode(&without(canonical(), "ingest_time")).expect("valid trade");
        assert_eq!(absent.ingest_time_us, NOW_US);
        let null = decode(&with(canonical(), "ingest_time", json!(null))).expect("valid trade");
        assert_eq!(null.ingest_time_us, NOW_US);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut payload = canonical();
        payload["venue_flags"] = json!({"nested": [1, {"deep": true}], "x": "y"});
        payload["M"] = json!(false);
        let trade = decode(payload.to_string().as_bytes()).expect("valid trade");
        assert_eq!(trade.price, 4_512_000_000);
        assert_eq!(trade.symbol, "AAPL");
    }

    #[test]
    fn integer_trade_id_becomes_its_decimal_string() {
        let trade = decode(&with(
            canonical(),
            "trade_id",
            json!(18_446_744_073_709_551_615_u64),
        ))
        .expect("valid trade");
        assert_eq!(trade.trade_id, "18446744073709551615");
    }

    #[test]
    fn side_accepts_any_case_and_single_letters() {
        for (text, side) in [
            ("buy", Side::Buy),
            ("BUY", Side::Buy),
            ("Buy", Side::Buy),
            ("b", Side::Buy),
            ("B", Side::Buy),
            ("sell", Side::Sell),
            ("SELL", Side::Sell),
            ("s", Side::Sell),
            ("S", Side::Sell),
        ] {
            let trade = decode(&with(canonical(), "side", json!(text))).expect(text);
            assert_eq!(trade.side, side, "side {text:?}");
        }
    }

    #[test]
    fn event_time_with_offset_is_converted_to_utc() {
        let payload = with(
            canonical(),
            "event_time",
            json!("2026-11-23T12:15:30.123456+02:00"),
        );
        assert_eq!(decode(&payload).expect("valid trade").event_time_us, EVENT_US);
    }

    #[test]
    fn event_time_below_a_microsecond_is_truncated() {
        let payload = with(canonical(), "event_time", json!("2026-11-23T10:15:30.123456789Z"));
        assert_eq!(decode(&payload).expect("valid trade").event_time_us, EVENT_US);
    }

    #[test]
    fn escaped_symbol_string_is_decoded() {
        let payload = canonical().to_string().replace(r#""AAPL""#, r#""A\u0041P\"L\\""#);
        let trade = decode(payload.as_bytes()).expect("valid trade");
        assert_eq!(trade.symbol, r#"AAP"L\"#);
    }

    #[test]
    fn escaped_field_name_is_recognised() {
        let payload = canonical().to_string().replace(r#""symbol""#, r#""sym\u0062ol""#);
        assert_eq!(decode(payload.as_bytes()).expect("valid trade").symbol, "AAPL");
    }

    #[test]
    fn binance_trade_maps_every_field() {
        let trade = decode(binance().to_string().as_bytes()).expect("valid trade");
        assert_eq!(
            trade,
            Trade {
                exchange: "BINANCE".into(),
                symbol: "BNBBTC".into(),
                sequence: 12345,
                trade_id: "12345".into(),
                price: 100_000,
                quantity: 10_000_000_000,
                side: Side::Sell,
                event_time_us: EVENT_US / 1000 * 1000,
                ingest_time_us: NOW_US,
                partition: 3,
                offset: 42,
            }
        );
    }

    #[test]
    fn binance_maker_buyer_means_aggressor_sold() {
        let trade = decode(&with(binance(), "m", json!(true))).expect("valid trade");
        assert_eq!(trade.side, Side::Sell);
    }

    #[test]
    fn binance_taker_buyer_means_aggressor_bought() {
        let trade = decode(&with(binance(), "m", json!(false))).expect("valid trade");
        assert_eq!(trade.side, Side::Buy);
    }

    #[test]
    fn binance_exchange_comes_from_config() {
        let config = DecoderConfig {
            binance_exchange: "BINANCE_US".to_owned(),
            ..DecoderConfig::default()
        };
        let decoded = TradeDecoder::new(config)
            .decode_record(binance().to_string().as_bytes(), 0, 0, NOW_US)
            .expect("valid trade");
        let Record::Trade(trade) = decoded else {
            panic!("a trade was expected, got {decoded:?}");
        };
        assert_eq!(trade.exchange, "BINANCE_US");
    }

    #[test]
    fn binance_event_of_another_type_is_rejected_naming_it() {
        for format in [TradeFormat::Binance, TradeFormat::Auto] {
            let err = decode_as(format, &with(binance(), "e", json!("aggTrade"))).unwrap_err();
            assert_eq!(
                err,
                DecodeError::UnsupportedEvent {
                    value: "aggTrade".to_owned()
                }
            );
            assert_eq!(
                err.to_string(),
                "field `e`: unsupported Binance event type \"aggTrade\" (expected \"trade\")"
            );
        }
    }

    #[test]
    fn binance_format_requires_event_type() {
        let err = decode_as(TradeFormat::Binance, &without(binance(), "e")).unwrap_err();
        assert_eq!(err, DecodeError::MissingField { field: "e" });
    }

    #[test]
    fn binance_event_time_is_required_and_must_be_an_integer() {
        assert_eq!(
            decode(&without(binance(), "E")).unwrap_err(),
            DecodeError::MissingField { field: "E" }
        );
        assert_eq!(
            decode(&with(binance(), "E", json!("1672515782136"))).unwrap_err(),
            DecodeError::WrongType {
                field: "E",
                expected: "an integer",
                found: "string"
            }
        );
    }

    #[test]
    fn binance_buyer_is_maker_must_be_a_boolean() {
        assert_eq!(
            decode(&with(binance(), "m", json!("true"))).unwrap_err(),
            DecodeError::WrongType {
                field: "m",
                expected: "a boolean",
                found: "string"
            }
        );
    }

    #[test]
    fn binance_numeric_price_is_rejected_with_field_name() {
        let err = decode(&with(binance(), "p", json!(0.001))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `p`: expected a decimal string, found number"
        );
    }

    #[test]
    fn binance_trade_time_too_large_for_microseconds_is_rejected() {
        assert_eq!(
            decode(&with(binance(), "T", json!(i64::MAX / 10))).unwrap_err(),
            DecodeError::TimestampOutOfRange {
                field: "T",
                value: i64::MAX / 10
            }
        );
    }

    #[test]
    fn binance_trade_time_is_checked_for_skew() {
        let err = decode(&with(binance(), "T", json!((NOW_US + 2 * DAY_US) / 1000))).unwrap_err();
        assert!(
            matches!(err, DecodeError::EventTimeSkew { field: "T", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn binance_negative_trade_id_is_rejected() {
        assert_eq!(
            decode(&with(binance(), "t", json!(-1))).unwrap_err(),
            DecodeError::Negative {
                field: "t",
                value: -1
            }
        );
    }

    #[test]
    fn auto_detects_binance_by_event_type() {
        let trade = decode_as(TradeFormat::Auto, binance().to_string().as_bytes()).expect("valid trade");
        assert_eq!(trade.exchange, "BINANCE");
        assert_eq!(trade.symbol, "BNBBTC");
    }

    #[test]
    fn auto_treats_object_without_event_type_as_canonical() {
        let trade = decode_as(TradeFormat::Auto, canonical().to_string().as_bytes()).expect("valid trade");
        assert_eq!(trade.exchange, "NASDAQ");
    }

    #[test]
    fn auto_keeps_canonical_trade_that_carries_an_unrelated_e() {
        let trade = decode(&with(canonical(), "e", json!("note"))).expect("valid trade");
        assert_eq!(trade.exchange, "NASDAQ");
    }

    #[test]
    fn canonical_format_does_not_read_binance_fields() {
        let err = decode_as(TradeFormat::Canonical, binance().to_string().as_bytes()).unwrap_err();
        assert_eq!(err, DecodeError::MissingField { field: "exchange" });
    }

    #[test]
    fn empty_payload_is_rejected() {
        for payload in [&b""[..], b"  \r\n\t "] {
            let err = decode(payload).unwrap_err();
            assert_eq!(err, DecodeError::Empty);
            assert_eq!(err.to_string(), "empty payload");
        }
    }

    #[test]
    fn invalid_utf8_reports_byte_position() {
        let mut payload = br#"{"exchange": "NA"#.to_vec();
        assert_eq!(payload.len(), 16);
        payload.extend_from_slice(b"\xff\xfeSDAQ\"}");
        let err = decode(&payload).unwrap_err();
        assert_eq!(err, DecodeError::InvalidUtf8 { byte: 16 });
        assert_eq!(err.to_string(), "invalid UTF-8 at byte 16");
    }

    #[test]
    fn malformed_json_reports_line_and_column() {
        let err = decode(b"{\"exchange\":\n  ?}").unwrap_err();
        assert_eq!(
            err,
            DecodeError::MalformedJson {
                line: 2,
                column: 3,
                message: "expected value".to_owned()
            }
        );
        assert_eq!(
            err.to_string(),
            "malformed JSON at line 2 column 3: expected value"
        );
    }

    #[test]
    fn trailing_characters_after_the_object_are_rejected() {
        let mut payload = canonical().to_string();
        payload.push_str(" {}");
        let err = decode(payload.as_bytes()).unwrap_err();
        assert!(
            matches!(&err, DecodeError::MalformedJson { message, .. } if message == "trailing characters"),
            "{err:?}"
        );
    }

    #[test]
    fn json_that_is_not_an_object_is_rejected_naming_what_was_found() {
        for (payload, found) in [
            (&br#"["NASDAQ", "AAPL"]"#[..], "array"),
            (br#" "trade""#, "string"),
            (b"42", "number"),
            (b"-1.5", "number"),
            (b"true", "boolean"),
            (b"null", "null"),
        ] {
            let err = decode(payload).unwrap_err();
            assert_eq!(err, DecodeError::NotAnObject { found }, "{payload:?}");
        }
        assert_eq!(
            decode(b"[1, 2").unwrap_err().kind(),
            "json",
            "broken non-object is malformed JSON"
        );
    }

    #[test]
    fn duplicate_known_field_is_rejected() {
        let payload = canonical().to_string().replacen('{', r#"{"price":"1.00","#, 1);
        assert_eq!(
            decode(payload.as_bytes()).unwrap_err(),
            DecodeError::DuplicateField { field: "price" }
        );
    }

    #[test]
    fn every_missing_required_field_is_reported_by_name() {
        for field in [
            "exchange",
            "symbol",
            "sequence",
            "trade_id",
            "price",
            "quantity",
            "side",
            "event_time",
        ] {
            let err = decode(&without(canonical(), field)).unwrap_err();
            assert_eq!(err, DecodeError::MissingField { field }, "{field}");
            assert_eq!(err.to_string(), format!("missing field `{field}`"));
        }
        for field in ["E", "s", "t", "p", "q", "T", "m"] {
            let err = decode(&without(binance(), field)).unwrap_err();
            assert_eq!(err, DecodeError::MissingField { field }, "{field}");
        }
    }

    #[test]
    fn numeric_price_is_rejected_with_field_name() {
        let err = decode(&with(canonical(), "price", json!(45.12))).unwrap_err();
        assert_eq!(
            err,
            DecodeError::WrongType {
                field: "price",
                expected: "a decimal string",
                found: "number"
            }
        );
        assert_eq!(
            err.to_string(),
            "field `price`: expected a decimal string, found number"
        );
    }

    #[test]
    fn mistyped_fields_name_what_was_found() {
        for (field, value, expected, found) in [
            ("exchange", json!(7), "a string", "number"),
            ("symbol", json!(null), "a string", "null"),
            ("trade_id", json!(["T-1"]), "a string or an integer", "array"),
            ("quantity", json!({"v": "1"}), "a decimal string", "object"),
            ("side", json!(true), "\"buy\" or \"sell\"", "boolean"),
            ("sequence", json!("5"), "a non-negative integer", "string"),
            (
                "sequence",
                json!(1.5),
                "a non-negative integer",
                "a number that is not a 64-bit integer",
            ),
            (
                "event_time",
                json!(1_672_515_782),
                "an RFC 3339 timestamp string",
                "number",
            ),
            (
                "ingest_time",
                json!(false),
                "an RFC 3339 timestamp string",
                "boolean",
            ),
        ] {
            let err = decode(&with(canonical(), field, value)).unwrap_err();
            assert_eq!(
                err,
                DecodeError::WrongType {
                    field,
                    expected,
                    found
                },
                "{field}"
            );
            assert_eq!(err.kind(), "bad_type");
        }
    }

    #[test]
    fn empty_exchange_symbol_or_trade_id_is_rejected() {
        for field in ["exchange", "symbol", "trade_id"] {
            let err = decode(&with(canonical(), field, json!(""))).unwrap_err();
            assert_eq!(err, DecodeError::EmptyString { field }, "{field}");
            assert_eq!(err.to_string(), format!("field `{field}`: must not be empty"));
        }
        assert_eq!(
            decode(&with(binance(), "s", json!(""))).unwrap_err(),
            DecodeError::EmptyString { field: "s" }
        );
    }

    #[test]
    fn decimals_are_scaled_exactly_by_ten_to_the_eight() {
        for (text, scaled) in [
            ("45.12", 4_512_000_000),
            ("1", 100_000_000),
            (".5", 50_000_000),
            ("007.50", 750_000_000),
            ("0.00000001", 1),
            ("12345.6789", 1_234_567_890_000),
        ] {
            assert_eq!(price(text).expect(text).price, scaled, "{text}");
        }
    }

    #[test]
    fn price_with_exactly_eight_decimals_keeps_every_digit() {
        assert_eq!(price("0.12345678").expect("valid").price, 12_345_678);
    }

    #[test]
    fn price_with_nine_decimals_is_rejected() {
        for text in ["0.123456789", "1.000000000"] {
            let err = price(text).unwrap_err();
            assert_eq!(
                err,
                DecodeError::TooManyDecimalPlaces {
                    field: "price",
                    value: text.to_owned()
                }
            );
        }
        assert_eq!(
            price("0.123456789").unwrap_err().to_string(),
            "field `price`: more than 8 decimal places, got \"0.123456789\""
        );
    }

    #[test]
    fn largest_decimal_18_8_is_accepted_and_the_next_is_rejected() {
        assert_eq!(
            price("9999999999.99999999").expect("valid").price,
            999_999_999_999_999_999
        );
        assert_eq!(
            price("0009999999999").expect("leading zeros").price,
            999_999_999_900_000_000
        );
        let err = price("10000000000").unwrap_err();
        assert_eq!(
            err,
            DecodeError::DecimalOutOfRange {
                field: "price",
                value: "10000000000".to_owned()
            }
        );
        assert_eq!(
            err.to_string(),
            "field `price`: out of range for decimal(18,8), got \"10000000000\""
        );
        assert_eq!(
            price("99999999999999999999999999999999999999999")
                .unwrap_err()
                .kind(),
            "bad_value"
        );
    }

    #[test]
    fn decimals_that_are_not_plain_are_rejected() {
        for text in [
            "NaN", "nan", "inf", "-inf", "Infinity", "1e5", "1E-2", "+1", " 1", "1 ", "", ".", "1.", "-",
            "-.", "1.2.3", "0x10", "1,5", "1_000", "٣", "１", "--1", "1-",
        ] {
            let err = price(text).unwrap_err();
            assert_eq!(
                err,
                DecodeError::NotADecimal {
                    field: "price",
                    value: text.to_owned()
                },
                "{text:?}"
            );
        }
        assert_eq!(
            price("1e5").unwrap_err().to_string(),
            "field `price`: expected a plain decimal like \"45.12\", got \"1e5\""
        );
    }

    #[test]
    fn zero_or_negative_quantity_is_rejected() {
        for text in ["-5", "0", "0.00000000", "-0", "-.5", "-0.00000001"] {
            let err = decode(&with(canonical(), "quantity", json!(text))).unwrap_err();
            assert_eq!(
                err,
                DecodeError::NotPositive {
                    field: "quantity",
                    value: text.to_owned()
                },
                "{text:?}"
            );
        }
        assert_eq!(
            decode(&with(canonical(), "quantity", json!("-5")))
                .unwrap_err()
                .to_string(),
            "field `quantity`: must be > 0, got -5"
        );
    }

    #[test]
    fn unknown_side_is_rejected_naming_the_value() {
        let err = decode(&with(canonical(), "side", json!("HOLD"))).unwrap_err();
        assert_eq!(
            err,
            DecodeError::UnknownSide {
                field: "side",
                value: "HOLD".to_owned()
            }
        );
        assert_eq!(
            err.to_string(),
            "field `side`: unknown side \"HOLD\" (expected buy or sell)"
        );
        for text in ["", "buyer", " buy", "bs"] {
            assert!(
                matches!(
                    decode(&with(canonical(), "side", json!(text))),
                    Err(DecodeError::UnknownSide { .. })
                ),
                "{text:?}"
            );
        }
    }

    #[test]
    fn negative_sequence_is_rejected() {
        let err = decode(&with(canonical(), "sequence", json!(-3))).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Negative {
                field: "sequence",
                value: -3
            }
        );
        assert_eq!(err.to_string(), "field `sequence`: must be >= 0, got -3");
    }

    #[test]
    fn sequence_zero_and_i64_max_are_accepted() {
        for sequence in [0, i64::MAX] {
            let trade = decode(&with(canonical(), "sequence", json!(sequence))).expect("valid");
            assert_eq!(trade.sequence, sequence);
        }
    }

    #[test]
    fn sequence_beyond_i64_is_rejected() {
        let too_big = i64::MAX as u64 + 1;
        assert_eq!(
            decode(&with(canonical(), "sequence", json!(too_big))).unwrap_err(),
            DecodeError::IntegerOverflow {
                field: "sequence",
                value: too_big
            }
        );
    }

    #[test]
    fn event_time_far_in_future_is_rejected() {
        let payload = with(canonical(), "event_time", json!("2031-01-01T00:00:00Z"));
        let event_time_us = 1_924_992_000_000_000;
        let now_us = event_time_us - 1500 * DAY_US;
        let err = TradeDecoder::new(DecoderConfig::default())
            .decode_record(&payload, 0, 0, now_us)
            .unwrap_err();
        assert_eq!(
            err,
            DecodeError::EventTimeSkew {
                field: "event_time",
                event_time_us,
                skew_us: i128::from(1500 * DAY_US),
                limit_ms: 86_400_000
            }
        );
        assert_eq!(
            err.to_string(),
            "field `event_time`: 2031-01-01T00:00:00Z is 1500 days from now (limit 24h)"
        );
        assert_eq!(err.kind(), "event_time_skew");
    }

    #[test]
    fn event_time_far_in_past_is_rejected() {
        let now_us = EVENT_US + DAY_US + 3_600_000_000;
        let err = TradeDecoder::new(DecoderConfig::default())
            .decode_record(canonical().to_string().as_bytes(), 0, 0, now_us)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `event_time`: 2026-11-23T10:15:30.123456Z is 1.1 days ago (limit 24h)"
        );
    }

    #[test]
    fn event_time_just_past_the_limit_never_reads_as_the_limit() {
        let config = DecoderConfig {
            max_event_time_skew_ms: 5_000,
            ..DecoderConfig::default()
        };
        let err = TradeDecoder::new(config)
            .decode_record(canonical().to_string().as_bytes(), 0, 0, EVENT_US - 5_000_001)
            .unwrap_err();
        assert!(
            err.to_string().ends_with("is 5.1 seconds from now (limit 5s)"),
            "{err}"
        );
    }

    #[test]
    fn event_time_exactly_at_the_skew_limit_is_accepted() {
        let decoder = TradeDecoder::new(DecoderConfig::default());
        let payload = canonical().to_string();
        for now_us in [EVENT_US - DAY_US, EVENT_US + DAY_US] {
            assert!(decoder.decode_record(payload.as_bytes(), 0, 0, now_us).is_ok());
        }
        for now_us in [EVENT_US - DAY_US - 1, EVENT_US + DAY_US + 1] {
            assert!(decoder.decode_record(payload.as_bytes(), 0, 0, now_us).is_err());
        }
    }

    #[test]
    fn unparseable_event_time_is_rejected_with_the_reason() {
        let err = decode(&with(canonical(), "event_time", json!("2026-11-23"))).unwrap_err();
        assert_eq!(
            err,
            DecodeError::BadTimestamp {
                field: "event_time",
                value: "2026-11-23".to_owned(),
                reason: "premature end of input".to_owned()
            }
        );
        assert_eq!(
            err.to_string(),
            "field `event_time`: \"2026-11-23\" is not an RFC 3339 timestamp (premature end of input)"
        );
        for text in [
            "2026-11-23T10:15:30",
            "2026-02-30T10:15:30Z",
            "1672515782136",
            "yesterday",
        ] {
            assert!(
                matches!(
                    decode(&with(canonical(), "event_time", json!(text))),
                    Err(DecodeError::BadTimestamp { .. })
                ),
                "{text:?}"
            );
        }
    }

    #[test]
    fn ingest_time_must_be_rfc3339_when_present() {
        assert!(matches!(
            decode(&with(canonical(), "ingest_time", json!("now"))),
            Err(DecodeError::BadTimestamp {
                field: "ingest_time",
                ..
            })
        ));
    }

    #[test]
    fn long_offending_value_is_cut_short_in_the_message() {
        let side = "X".repeat(10_000);
        let err = decode(&with(canonical(), "side", json!(side))).unwrap_err();
        let expected = format!("{}…", "X".repeat(MAX_ECHOED_CHARS));
        assert_eq!(
            err,
            DecodeError::UnknownSide {
                field: "side",
                value: expected
            }
        );
    }

    #[test]
    fn deeply_nested_unknown_field_is_an_error_not_a_stack_overflow() {
        let mut payload = r#"{"extra":"#.to_owned();
        payload.push_str(&"[".repeat(100_000));
        payload.push_str(&"]".repeat(100_000));
        payload.push('}');
        // serde_json skips an ignored value without recursing per level, so
        // the record gets as far as its missing fields; either way it is a
        // clean error, not a crash.
        let err = decode(payload.as_bytes()).unwrap_err();
        assert!(
            matches!(&err, DecodeError::MalformedJson { message, .. } if message == "recursion limit exceeded")
                || matches!(&err, DecodeError::MissingField { field: "exchange" }),
            "{err:?}"
        );
    }

    #[test]
    fn error_kinds_are_low_cardinality_labels() {
        assert_eq!(DecodeError::Empty.kind(), "empty");
        assert_eq!(DecodeError::InvalidUtf8 { byte: 3 }.kind(), "utf8");
        assert_eq!(decode(b"{").unwrap_err().kind(), "json");
        assert_eq!(
            decode(&without(canonical(), "price")).unwrap_err().kind(),
            "missing_field"
        );
        assert_eq!(price("1e5").unwrap_err().kind(), "bad_value");
        assert_eq!(
            decode(&with(binance(), "e", json!("kline"))).unwrap_err().kind(),
            "unsupported_event"
        );
    }

    #[test]
    fn limits_are_shown_as_configured() {
        assert_eq!(fmt_limit_ms(86_400_000), "24h");
        assert_eq!(fmt_limit_ms(90_000), "90s");
        assert_eq!(fmt_limit_ms(120_000), "2min");
        assert_eq!(fmt_limit_ms(1_500), "1500ms");
        assert_eq!(fmt_limit_ms(0), "0ms");
    }

    #[test]
    fn garbage_and_truncated_payloads_never_panic() {
        let decoder = TradeDecoder::new(DecoderConfig::default());
        for sample in [canonical().to_string(), binance().to_string()] {
            let bytes = sample.as_bytes();
            assert!(decoder.decode_record(bytes, 0, 0, NOW_US).is_ok());
            for end in 0..bytes.len() {
                assert!(
                    decoder.decode_record(&bytes[..end], 0, 0, NOW_US).is_err(),
                    "prefix of {end} bytes"
                );
            }
            // Flipped bits may still spell a valid trade; they must only not panic.
            let mut mutated = bytes.to_vec();
            for index in 0..mutated.len() {
                for bit in 0..8 {
                    mutated[index] ^= 1 << bit;
                    let _ = decoder.decode_record(&mutated, 0, 0, NOW_US);
                    mutated[index] ^= 1 << bit;
                }
            }
        }
        // Deterministic pseudo-random bytes, biased towards JSON punctuation.
        let alphabet = b"{}[]\":,.-+0123456789eEtrufalsn \\\xff\xc3";
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            let len = (state % 40) as usize;
            let payload: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    alphabet[(state % alphabet.len() as u64) as usize]
                })
                .collect();
            assert!(
                decoder.decode_record(&payload, 0, 0, NOW_US).is_err(),
                "{payload:?}"
            );
        }
    }

    fn reference() -> serde_json::Value {
        json!({
            "type": "reference",
            "exchange": "ASX",
            "symbol": "BHP",
            "name": "BHP Group",
            "currency": "AUD",
            "tick_size": "0.005",
            "lot_size": "1",
            "status": "trading",
            "effective_time": "2026-11-23T10:15:30.123456Z",
        })
    }

    fn decode_reference(format: TradeFormat, payload: &[u8]) -> Result<ReferenceRecord, DecodeError> {
        let config = DecoderConfig {
            format,
            ..DecoderConfig::default()
        };
        match TradeDecoder::new(config).decode_record(payload, 3, 42, NOW_US)? {
            Record::Reference(reference) => Ok(reference),
            Record::Trade(trade) => panic!("a reference record was expected, got {trade:?}"),
        }
    }

    #[test]
    fn a_reference_record_decodes_in_every_format_with_exact_sizes() {
        for format in [TradeFormat::Canonical, TradeFormat::Binance, TradeFormat::Auto] {
            let reference = decode_reference(format, reference().to_string().as_bytes()).expect("valid");
            assert_eq!(
                reference,
                ReferenceRecord {
                    exchange: "ASX".into(),
                    symbol: "BHP".into(),
                    name: Some("BHP Group".into()),
                    currency: Some("AUD".into()),
                    tick_size: 500_000,
                    lot_size: 100_000_000,
                    status: "trading".into(),
                    effective_time_us: EVENT_US,
                    ingest_time_us: NOW_US,
                    partition: 3,
                    offset: 42,
                }
            );
        }
    }

    #[test]
    fn a_reference_records_name_and_currency_may_be_absent_or_null_but_not_empty() {
        let payload = without(reference(), "name");
        let payload: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        let reference_ =
            decode_reference(TradeFormat::Auto, &with(payload, "currency", json!(null))).unwrap();
        assert_eq!((reference_.name, reference_.currency), (None, None));
        assert_eq!(
            decode_reference(TradeFormat::Auto, &with(reference(), "name", json!(""))).unwrap_err(),
            DecodeError::EmptyString { field: "name" }
        );
        assert_eq!(
            decode_reference(TradeFormat::Auto, &with(reference(), "currency", json!(7))).unwrap_err(),
            DecodeError::WrongType {
                field: "currency",
                expected: "a string",
                found: "number"
            }
        );
    }

    #[test]
    fn a_bad_reference_record_names_its_field() {
        let cases = [
            (
                without(reference(), "tick_size"),
                DecodeError::MissingField { field: "tick_size" },
            ),
            (
                with(reference(), "lot_size", json!("0")),
                DecodeError::NotPositive {
                    field: "lot_size",
                    value: "0".into(),
                },
            ),
            (
                with(reference(), "status", json!("")),
                DecodeError::EmptyString { field: "status" },
            ),
            (
                without(reference(), "effective_time"),
                DecodeError::MissingField {
                    field: "effective_time",
                },
            ),
        ];
        for (payload, expected) in cases {
            assert_eq!(
                decode_reference(TradeFormat::Auto, &payload).unwrap_err(),
                expected
            );
        }
        let skewed = decode_reference(
            TradeFormat::Auto,
            &with(reference(), "effective_time", json!("2020-01-01T00:00:00Z")),
        )
        .unwrap_err();
        assert_eq!(skewed.kind(), "event_time_skew");
        assert!(
            skewed.to_string().starts_with("field `effective_time`: "),
            "{skewed}"
        );
    }

    #[test]
    fn the_type_field_says_trade_or_reference_and_nothing_else() {
        let trade = decode(&with(canonical(), "type", json!("trade"))).expect("an explicit trade");
        assert_eq!(trade.symbol, "AAPL");
        assert_eq!(
            decode(&with(canonical(), "type", json!("quote"))).unwrap_err(),
            DecodeError::UnsupportedRecordType {
                value: "quote".into()
            }
        );
        assert_eq!(
            decode(&with(canonical(), "type", json!(1))).unwrap_err(),
            DecodeError::WrongType {
                field: "type",
                expected: "a string",
                found: "number"
            }
        );
        assert_eq!(
            DecodeError::UnsupportedRecordType {
                value: "quote".into()
            }
            .to_string(),
            "field `type`: unsupported record type \"quote\" (expected \"trade\" or \"reference\")"
        );
    }
}
