//! A load generator for market-data trades.
//!
//! The embedded demo, the benchmarks, the tests and the `k2 loadgen` command all need a stream of
//! trades that looks like a real feed: a few symbols dominate (Zipf popularity), prices random-walk,
//! every (exchange, symbol) has its own gap-free sequence, and Binance trades arrive partly in
//! Binance's native trade-event format. Optionally a share of messages is deliberately malformed, to
//! exercise the dead-letter path, and a share are reference-data updates (an instrument's name,
//! currency, tick and lot size, trading status), which K2 stores in `market.reference` and sheds
//! first under load. [`TradeGenerator`] builds the messages (deterministically from a
//! seed, with no Kafka involved); [`run_loadgen`] and [`preload`] produce them to any Kafka.
//!
//! Trade ids follow each feed's own rule. ASX and Coinbase style ids are `SYMBOL-000000123`, unique per
//! exchange. A Binance trade id is Binance's `t`, which is also the per-symbol sequence number, so on
//! Binance an id is unique per (exchange, symbol) only, as it is on the real exchange.

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write as _};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use governor::clock::Clock as _;
use governor::{Quota, RateLimiter};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal, StandardNormal, Zipf};
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext, PurgeConfig,
};
use tracing::{info, warn};

use crate::model::{DECIMAL_SCALE, TradeKey};
use crate::shedding::{Priority, TierTable};

/// Invalid generator parameters.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LoadgenError {
    #[error("the load generator needs at least one exchange with at least one symbol")]
    NoSymbols,
    #[error("exchange name must not be empty")]
    EmptyExchange,
    #[error("exchange {exchange} has an empty symbol name")]
    EmptySymbol { exchange: String },
    #[error("symbol {symbol} is listed twice for exchange {exchange}")]
    DuplicateSymbol { exchange: String, symbol: String },
    #[error("zipf_exponent must be a finite number >= 0, got {0}")]
    ZipfExponent(f64),
    #[error("{name} must be between 0 and 1, got {value}")]
    Ratio { name: &'static str, value: f64 },
    #[error("{0}")]
    Shape(String),
    #[error("the first sequence number must be between 1 and {max}, got {0}", max = MAX_FIRST_SEQUENCE)]
    FirstSequence(i64),
}

/// Leaves room for any run to count up from its first sequence number.
pub const MAX_FIRST_SEQUENCE: i64 = i64::MAX / 4;

/// Sequence numbers each millisecond of the wall clock reserves for one symbol, in
/// [`run_start_sequence`].
const SEQUENCES_PER_MS: i64 = 1_000;

/// The first sequence number of a `k2 loadgen` run that started at `now`: the milliseconds since
/// the Unix epoch × 1,000, plus 1. A later run starts above every number an earlier run issued
/// unless one symbol got more than 1,000 trades per millisecond of the time between the two
/// starts (a million a second, far above any rate the generator reaches), so a second run against
/// the same topic repeats no trade id. K2 sees each symbol's sequence jump forward between runs and
/// records the jump as one gap, which is what it is.
pub fn run_start_sequence(now: std::time::SystemTime) -> i64 {
    let ms = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| i64::try_from(since.as_millis()).unwrap_or(i64::MAX));
    ms.saturating_mul(SEQUENCES_PER_MS)
        .saturating_add(1)
        .min(MAX_FIRST_SEQUENCE)
}

// ---------------------------------------------------------------------------------------------
// Generator
// ---------------------------------------------------------------------------------------------

/// How trades are generated: universe, popularity and the share of odd messages.
#[derive(Debug, Clone)]
pub struct GeneratorParams {
    pub seed: u64,
    /// Exchanges and their symbols. Default: "BINANCE" (20 USDT pairs), "ASX" (20 large caps) and
    /// "COINBASE" (10 USD pairs).
    pub exchanges: Vec<(String, Vec<String>)>,
    /// Zipf exponent for symbol popularity within the whole universe (default 1.1): a few symbols
    /// dominate, like real markets.
    pub zipf_exponent: f64,
    /// Fraction of messages that are deliberately malformed (default 0.0), for tests and demos of the
    /// dead-letter path.
    pub malformed_ratio: f64,
    /// Fraction of BINANCE trades emitted in Binance's native trade-event format instead of K2's
    /// canonical format (default 0.5).
    pub binance_native_ratio: f64,
    /// Fraction of messages that repeat the previous valid trade byte for byte (default 0.0), as a
    /// producer retrying without idempotence would: K2 keeps one.
    pub duplicate_ratio: f64,
    /// Fraction of valid trades whose symbol skips a sequence number first (default 0.0), as a feed
    /// that lost a message would: K2 records the gap.
    pub gap_ratio: f64,
    /// Fraction of messages that are reference-data updates of the picked instrument (default 0.0),
    /// in K2's canonical JSON with `"type":"reference"`. They are LOW priority: the first records K2
    /// sheds under load.
    pub reference_ratio: f64,
    /// The sequence number (and, on Binance, the trade id) of every symbol's first trade (default
    /// 1). A run that starts above every earlier run's numbers gets trade ids of its own: see
    /// [`run_start_sequence`].
    pub first_sequence: i64,
}

impl Default for GeneratorParams {
    fn default() -> Self {
        let exchange = |name: &str, symbols: &[(&str, f64)]| {
            let symbols = symbols.iter().map(|(symbol, _)| (*symbol).to_owned()).collect();
            (name.to_owned(), symbols)
        };
        GeneratorParams {
            seed: 42,
            exchanges: vec![
                exchange(BINANCE, BINANCE_SYMBOLS),
                exchange("ASX", ASX_SYMBOLS),
                exchange("COINBASE", COINBASE_SYMBOLS),
            ],
            zipf_exponent: 1.1,
            malformed_ratio: 0.0,
            binance_native_ratio: 0.5,
            duplicate_ratio: 0.0,
            gap_ratio: 0.0,
            reference_ratio: 0.0,
            first_sequence: 1,
        }
    }
}

impl GeneratorParams {
    /// Checks the parameters, so a user with a bad command line gets one clear line. The
    /// [`TradeGenerator`] itself never fails: it clamps what this rejects.
    pub fn validate(&self) -> Result<(), LoadgenError> {
        let mut num_symbols = 0;
        for (exchange, symbols) in &self.exchanges {
            if exchange.is_empty() {
                return Err(LoadgenError::EmptyExchange);
            }
            let mut seen = HashSet::new();
            for symbol in symbols {
                if symbol.is_empty() {
                    return Err(LoadgenError::EmptySymbol {
                        exchange: exchange.clone(),
                    });
                }
                if !seen.insert(symbol.as_str()) {
                    return Err(LoadgenError::DuplicateSymbol {
                        exchange: exchange.clone(),
                        symbol: symbol.clone(),
                    });
                }
            }
            num_symbols += symbols.len();
        }
        if num_symbols == 0 {
            return Err(LoadgenError::NoSymbols);
        }
        if !(self.zipf_exponent.is_finite() && self.zipf_exponent >= 0.0) {
            return Err(LoadgenError::ZipfExponent(self.zipf_exponent));
        }
        for (name, value) in [
            ("malformed_ratio", self.malformed_ratio),
            ("binance_native_ratio", self.binance_native_ratio),
            ("duplicate_ratio", self.duplicate_ratio),
            ("gap_ratio", self.gap_ratio),
            ("reference_ratio", self.reference_ratio),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(LoadgenError::Ratio { name, value });
            }
        }
        if !(1..=MAX_FIRST_SEQUENCE).contains(&self.first_sequence) {
            return Err(LoadgenError::FirstSequence(self.first_sequence));
        }
        Ok(())
    }
}

/// One message ready to produce.
#[derive(Debug, Clone)]
pub struct GeneratedMessage {
    /// Kafka key: "EXCHANGE:SYMBOL", so one symbol's trades (and its reference data) stay in one
    /// partition, in order.
    pub key: String,
    pub payload: Vec<u8>,
    /// Some((exchange, symbol, trade_id)) for a valid trade; None for a reference-data update and
    /// for a deliberately malformed message.
    pub trade: Option<TradeKey>,
    /// A byte-for-byte repeat of the previous valid trade (`duplicate_ratio`).
    pub duplicate: bool,
    /// Some((exchange, symbol)) for a reference-data update (`reference_ratio`): valid, but not a
    /// trade. None otherwise.
    pub reference: Option<(String, String)>,
}

impl GeneratedMessage {
    /// A deliberately malformed message: neither a trade nor reference data.
    pub fn is_malformed(&self) -> bool {
        self.trade.is_none() && self.reference.is_none()
    }
}

const BINANCE: &str = "BINANCE";

/// Default universe with plausible starting prices. The order within an exchange is the popularity
/// order.
const BINANCE_SYMBOLS: &[(&str, f64)] = &[
    ("BTCUSDT", 60_000.0),
    ("ETHUSDT", 3_000.0),
    ("SOLUSDT", 150.0),
    ("BNBUSDT", 580.0),
    ("XRPUSDT", 0.55),
    ("ADAUSDT", 0.45),
    ("DOGEUSDT", 0.15),
    ("AVAXUSDT", 35.0),
    ("DOTUSDT", 7.0),
    ("LINKUSDT", 15.0),
    ("LTCUSDT", 80.0),
    ("TRXUSDT", 0.12),
    ("SHIBUSDT", 0.000_025),
    ("ATOMUSDT", 8.0),
    ("UNIUSDT", 9.0),
    ("NEARUSDT", 5.0),
    ("APTUSDT", 9.0),
    ("ARBUSDT", 1.0),
    ("OPUSDT", 2.0),
    ("SUIUSDT", 1.5),
];
const ASX_SYMBOLS: &[(&str, f64)] = &[
    ("BHP", 45.0),
    ("CBA", 120.0),
    ("CSL", 290.0),
    ("NAB", 35.0),
    ("WBC", 28.0),
    ("ANZ", 28.0),
    ("WES", 65.0),
    ("MQG", 190.0),
    ("TLS", 3.9),
    ("RIO", 120.0),
    ("WOW", 33.0),
    ("FMG", 20.0),
    ("GMG", 33.0),
    ("TCL", 13.0),
    ("ALL", 65.0),
    ("STO", 7.5),
    ("WDS", 25.0),
    ("COL", 19.0),
    ("QBE", 18.0),
    ("SUN", 17.0),
];
const COINBASE_SYMBOLS: &[(&str, f64)] = &[
    ("BTC-USD", 60_000.0),
    ("ETH-USD", 3_000.0),
    ("SOL-USD", 150.0),
    ("XRP-USD", 0.55),
    ("DOGE-USD", 0.15),
    ("ADA-USD", 0.45),
    ("AVAX-USD", 35.0),
    ("LINK-USD", 15.0),
    ("LTC-USD", 80.0),
    ("DOT-USD", 7.0),
];
const CRYPTO_EXCHANGES: &[&str] = &[BINANCE, "COINBASE", "KRAKEN", "BYBIT", "OKX", "BITSTAMP"];

/// Names of the default universe, for reference data: ASX companies by ticker, crypto assets by
/// the base of their pair.
const ASX_NAMES: &[(&str, &str)] = &[
    ("BHP", "BHP Group"),
    ("CBA", "Commonwealth Bank of Australia"),
    ("CSL", "CSL"),
    ("NAB", "National Australia Bank"),
    ("WBC", "Westpac Banking Corporation"),
    ("ANZ", "ANZ Group Holdings"),
    ("WES", "Wesfarmers"),
    ("MQG", "Macquarie Group"),
    ("TLS", "Telstra Group"),
    ("RIO", "Rio Tinto"),
    ("WOW", "Woolworths Group"),
    ("FMG", "Fortescue"),
    ("GMG", "Goodman Group"),
    ("TCL", "Transurban Group"),
    ("ALL", "Aristocrat Leisure"),
    ("STO", "Santos"),
    ("WDS", "Woodside Energy Group"),
    ("COL", "Coles Group"),
    ("QBE", "QBE Insurance Group"),
    ("SUN", "Suncorp Group"),
];
const CRYPTO_NAMES: &[(&str, &str)] = &[
    ("BTC", "Bitcoin"),
    ("ETH", "Ethereum"),
    ("SOL", "Solana"),
    ("BNB", "BNB"),
    ("XRP", "XRP"),
    ("ADA", "Cardano"),
    ("DOGE", "Dogecoin"),
    ("AVAX", "Avalanche"),
    ("DOT", "Polkadot"),
    ("LINK", "Chainlink"),
    ("LTC", "Litecoin"),
    ("TRX", "TRON"),
    ("SHIB", "Shiba Inu"),
    ("ATOM", "Cosmos"),
    ("UNI", "Uniswap"),
    ("NEAR", "NEAR Protocol"),
    ("APT", "Aptos"),
    ("ARB", "Arbitrum"),
    ("OP", "Optimism"),
    ("SUI", "Sui"),
];
/// Quote currencies recognised at the end of a pair's symbol (`BTCUSDT`, `BTC-USD`). USDT and USDC
/// come before USD, though neither ends with it, so the list reads longest first.
const QUOTE_CURRENCIES: &[&str] = &["USDT", "USDC", "USD", "EUR", "GBP", "BTC", "ETH"];
/// How often a reference update halts a trading instrument, and lifts a halt.
const HALT_PROBABILITY: f64 = 0.05;
const RESUME_PROBABILITY: f64 = 0.5;

/// The quote currency a pair's symbol ends with, and the base before it (without a `-`, `/` or
/// `_` between them); None when the symbol ends with none, or is nothing but the currency.
fn split_pair(symbol: &str) -> Option<(&str, &'static str)> {
    QUOTE_CURRENCIES.iter().find_map(|quote| {
        let base = symbol.strip_suffix(quote)?;
        let base = base.trim_end_matches(['-', '/', '_']);
        (!base.is_empty()).then_some((base, *quote))
    })
}

/// The instrument's name and currency as its reference data gives them: ASX shares in AUD, crypto
/// pairs in their quote currency (or the exchange's usual one), other symbols by their quote suffix
/// or with no currency. Unknown names are the symbol itself.
fn reference_identity(exchange: &str, symbol: &str, crypto: bool) -> (String, Option<&'static str>) {
    fn lookup(table: &[(&str, &'static str)], key: &str) -> Option<&'static str> {
        table.iter().find(|(k, _)| *k == key).map(|(_, name)| *name)
    }
    if exchange == "ASX" {
        let name = lookup(ASX_NAMES, symbol).unwrap_or(symbol);
        return (name.to_owned(), Some("AUD"));
    }
    let pair = split_pair(symbol);
    let usual = match exchange {
        BINANCE => Some("USDT"),
        "COINBASE" => Some("USD"),
        _ => None,
    };
    let currency = pair.map(|(_, quote)| quote).or(usual.filter(|_| crypto));
    let name = match pair {
        Some((base, quote)) if crypto => lookup(CRYPTO_NAMES, base).map(|name| format!("{name} / {quote}")),
        _ => None,
    };
    (name.unwrap_or_else(|| symbol.to_owned()), currency)
}

/// Per-trade volatility (standard deviation of the log-price step).
const CRYPTO_VOLATILITY: f64 = 0.000_4;
const EQUITY_VOLATILITY: f64 = 0.000_2;
/// Pull of the log-price back to its start, per trade: keeps a long run's prices plausible
/// (stationary spread of a few percent) without making them predictable.
const MEAN_REVERSION: f64 = 0.000_1;
/// Prices stay well inside `decimal(18,8)`.
const MAX_PRICE: f64 = 1e9;
const MICROS_PER_YEAR: i64 = 365 * 24 * 3600 * 1_000_000 + 6 * 3600 * 1_000_000;

/// One (exchange, symbol) and its feed state.
struct Instrument {
    exchange: Arc<str>,
    symbol: Arc<str>,
    /// "EXCHANGE:SYMBOL".
    key: String,
    /// The symbol as a JSON string body (escaped, without quotes).
    json_symbol: String,
    /// The exchange as a JSON string body.
    json_exchange: String,
    /// For "SYMBOL-000000123" ids; None on Binance, whose trade id is the sequence number.
    trade_id_prefix: Option<String>,
    /// Last sequence number issued; the next trade gets `sequence + 1`.
    sequence: i64,
    /// Whether the symbol has had a trade yet (gaps come only after the first).
    started: bool,
    log_price: f64,
    log_anchor: f64,
    volatility: f64,
    price_decimals: u32,
    quantity_decimals: u32,
    quantity: LogNormal<f64>,
    /// Equities trade in whole shares; crypto quantities are a notional divided by the price.
    quantity_is_notional: bool,
    /// The name reference data gives, as a JSON string body.
    json_name: String,
    /// The currency reference data gives, if any.
    currency: Option<&'static str>,
    /// The trading status the last reference update gave: halted or trading.
    halted: bool,
}

impl Instrument {
    fn new(exchange: &Arc<str>, symbol: &str, first_sequence: i64, rng: &mut StdRng) -> Self {
        let known = [BINANCE_SYMBOLS, ASX_SYMBOLS, COINBASE_SYMBOLS]
            .iter()
            .flat_map(|table| table.iter())
            .find(|(name, _)| *name == symbol)
            .map(|(_, price)| *price);
        let crypto = CRYPTO_EXCHANGES.contains(&exchange.as_ref());
        let start_price = known.unwrap_or_else(|| {
            if crypto {
                rng.random_range(0.5..500.0)
            } else {
                rng.random_range(5.0..300.0)
            }
        });
        let (price_decimals, quantity_decimals, volatility) = if crypto {
            let price_decimals = match start_price {
                p if p >= 10.0 => 2,
                p if p >= 1.0 => 4,
                p if p >= 0.01 => 5,
                _ => 8,
            };
            let quantity_decimals = match start_price {
                p if p >= 10_000.0 => 5,
                p if p >= 100.0 => 3,
                p if p >= 1.0 => 2,
                _ => 0,
            };
            (price_decimals, quantity_decimals, CRYPTO_VOLATILITY)
        } else {
            let price_decimals = if start_price >= 2.0 { 2 } else { 3 };
            (price_decimals, 0, EQUITY_VOLATILITY)
        };
        // Crypto: a notional with median $300; equities: a parcel with median 200 shares. Both
        // heavy-tailed, like real trade sizes.
        let quantity = if crypto {
            LogNormal::new(300f64.ln(), 1.5)
        } else {
            LogNormal::new(200f64.ln(), 1.0)
        };
        let quantity = quantity.unwrap_or_else(|_| unreachable!("constant lognormal parameters"));
        let log_price = start_price.ln();
        let (name, currency) = reference_identity(exchange, symbol, crypto);
        Instrument {
            exchange: exchange.clone(),
            symbol: Arc::from(symbol),
            key: format!("{exchange}:{symbol}"),
            json_symbol: json_escape(symbol),
            json_exchange: json_escape(exchange),
            trade_id_prefix: (exchange.as_ref() != BINANCE).then(|| format!("{symbol}-")),
            sequence: first_sequence - 1,
            started: false,
            log_price,
            log_anchor: log_price,
            volatility,
            price_decimals,
            quantity_decimals,
            quantity,
            quantity_is_notional: crypto,
            json_name: json_escape(&name),
            currency,
            halted: false,
        }
    }

    fn is_binance(&self) -> bool {
        self.trade_id_prefix.is_none()
    }

    fn trade_id(&self, sequence: i64) -> String {
        match &self.trade_id_prefix {
            Some(prefix) => format!("{prefix}{sequence:09}"),
            None => sequence.to_string(),
        }
    }

    /// Advances the random walk and returns the price in units of 10^-price_decimals (>= 1).
    fn next_price_units(&mut self, rng: &mut StdRng) -> i64 {
        let step: f64 = rng.sample(StandardNormal);
        self.log_price += self.volatility * step - MEAN_REVERSION * (self.log_price - self.log_anchor);
        let units = (self.log_price.exp().min(MAX_PRICE) * pow10(self.price_decimals)).round();
        // `as` saturates, and the clamp keeps the price strictly positive.
        (units as i64).max(1)
    }

    /// A quantity in units of 10^-quantity_decimals (>= 1), for a trade at `price`.
    fn next_quantity_units(&mut self, price: f64, rng: &mut StdRng) -> i64 {
        let draw = self.quantity.sample(rng);
        let quantity = if self.quantity_is_notional {
            draw / price
        } else {
            draw
        };
        let units = (quantity.min(1e8) * pow10(self.quantity_decimals)).round();
        (units as i64).max(1)
    }
}

/// The deliberately malformed messages, emitted in rotation.
#[derive(Debug, Clone, Copy)]
enum MalformedKind {
    TruncatedJson,
    InvalidUtf8,
    MissingPrice,
    NegativeQuantity,
    NanPrice,
    UnknownSide,
    FutureEventTime,
    NumericPrice,
}

const MALFORMED_KINDS: [MalformedKind; 8] = [
    MalformedKind::TruncatedJson,
    MalformedKind::InvalidUtf8,
    MalformedKind::MissingPrice,
    MalformedKind::NegativeQuantity,
    MalformedKind::NanPrice,
    MalformedKind::UnknownSide,
    MalformedKind::FutureEventTime,
    MalformedKind::NumericPrice,
];

/// The fields of one trade, before formatting.
struct TradeFields {
    sequence: i64,
    trade_id: String,
    price_units: i64,
    quantity_units: i64,
    sell: bool,
    event_time_us: i64,
}

/// Generates trade messages, deterministically for a given seed and sequence of `now_us` values.
pub struct TradeGenerator {
    rng: StdRng,
    instruments: Vec<Instrument>,
    /// Popularity rank r (1-based) picks `instruments[r - 1]`.
    popularity: Zipf<f64>,
    malformed_ratio: f64,
    binance_native_ratio: f64,
    duplicate_ratio: f64,
    gap_ratio: f64,
    reference_ratio: f64,
    num_generated: u64,
    num_malformed: u64,
    num_duplicates: u64,
    num_gaps: u64,
    num_references: u64,
    /// What a duplicate repeats.
    last_valid: Option<GeneratedMessage>,
    buf: String,
    clock: SecondCache,
}

impl TradeGenerator {
    /// Builds the universe. Never fails: parameters that [`GeneratorParams::validate`] would reject
    /// are clamped (ratios into 0..=1, a bad exponent to 1.1, duplicate symbols dropped, an empty
    /// universe replaced by the default one).
    pub fn new(params: GeneratorParams) -> Self {
        let mut rng = StdRng::seed_from_u64(params.seed);
        let mut exchanges: Vec<(Arc<str>, Vec<String>)> = params
            .exchanges
            .iter()
            .filter(|(exchange, _)| !exchange.is_empty())
            .map(|(exchange, symbols)| {
                let mut seen = HashSet::new();
                let symbols = symbols
                    .iter()
                    .filter(|symbol| !symbol.is_empty() && seen.insert(symbol.as_str()))
                    .cloned()
                    .collect();
                (Arc::from(exchange.as_str()), symbols)
            })
            .collect();
        if exchanges.iter().all(|(_, symbols)| symbols.is_empty()) {
            exchanges = GeneratorParams::default()
                .exchanges
                .into_iter()
                .map(|(exchange, symbols)| (Arc::from(exchange), symbols))
                .collect();
        }
        let first_sequence = params.first_sequence.clamp(1, MAX_FIRST_SEQUENCE);
        // Popularity ranks go round-robin over the exchanges (each exchange's first symbol is among
        // the most traded), so no exchange is starved by the order of the list.
        let mut instruments = Vec::new();
        let longest = exchanges
            .iter()
            .map(|(_, symbols)| symbols.len())
            .max()
            .unwrap_or(0);
        for i in 0..longest {
            for (exchange, symbols) in &exchanges {
                if let Some(symbol) = symbols.get(i) {
                    instruments.push(Instrument::new(exchange, symbol, first_sequence, &mut rng));
                }
            }
        }
        let exponent = if params.zipf_exponent.is_finite() && params.zipf_exponent >= 0.0 {
            params.zipf_exponent
        } else {
            GeneratorParams::default().zipf_exponent
        };
        let popularity = Zipf::new(instruments.len() as f64, exponent)
            .unwrap_or_else(|_| unreachable!("n >= 1 and exponent >= 0"));
        TradeGenerator {
            rng,
            instruments,
            popularity,
            malformed_ratio: clamp_ratio(params.malformed_ratio),
            binance_native_ratio: clamp_ratio(params.binance_native_ratio),
            duplicate_ratio: clamp_ratio(params.duplicate_ratio),
            gap_ratio: clamp_ratio(params.gap_ratio),
            reference_ratio: clamp_ratio(params.reference_ratio),
            num_generated: 0,
            num_malformed: 0,
            num_duplicates: 0,
            num_gaps: 0,
            num_references: 0,
            last_valid: None,
            buf: String::with_capacity(256),
            clock: SecondCache::default(),
        }
    }

    /// Next message; `now_us` is the event time to stamp (µs since epoch).
    pub fn next_message(&mut self, now_us: i64) -> GeneratedMessage {
        self.num_generated += 1;
        let index = self.pick_instrument();
        if self.reference_ratio > 0.0 && self.rng.random_bool(self.reference_ratio) {
            self.num_references += 1;
            return self.reference_message(index, now_us);
        }
        if self.malformed_ratio > 0.0 && self.rng.random_bool(self.malformed_ratio) {
            let kind = MALFORMED_KINDS[(self.num_malformed % MALFORMED_KINDS.len() as u64) as usize];
            self.num_malformed += 1;
            return self.malformed_message(index, kind, now_us);
        }
        if self.duplicate_ratio > 0.0
            && let Some(last) = &self.last_valid
            && self.rng.random_bool(self.duplicate_ratio)
        {
            self.num_duplicates += 1;
            return GeneratedMessage {
                duplicate: true,
                ..last.clone()
            };
        }

        let instrument = &mut self.instruments[index];
        // The feed lost this number: it is never sent. Only after a first
        // trade, so that every skipped number is a gap K2 can see.
        if self.gap_ratio > 0.0 && instrument.started && self.rng.random_bool(self.gap_ratio) {
            instrument.sequence += 1;
            self.num_gaps += 1;
        }
        instrument.sequence += 1;
        instrument.started = true;
        let sequence = instrument.sequence;
        let price_units = instrument.next_price_units(&mut self.rng);
        let price = price_units as f64 / pow10(instrument.price_decimals);
        let quantity_units = instrument.next_quantity_units(price, &mut self.rng);
        let fields = TradeFields {
            sequence,
            trade_id: instrument.trade_id(sequence),
            price_units,
            quantity_units,
            sell: self.rng.random_bool(0.5),
            event_time_us: now_us,
        };
        let native = instrument.is_binance()
            && self.binance_native_ratio > 0.0
            && self.rng.random_bool(self.binance_native_ratio);

        self.buf.clear();
        // Writing into a String cannot fail.
        let _ = if native {
            write_binance_trade(&mut self.buf, instrument, &fields)
        } else {
            write_canonical_trade(&mut self.buf, &mut self.clock, instrument, &fields, Field::All)
        };
        let message = GeneratedMessage {
            key: instrument.key.clone(),
            payload: self.buf.as_bytes().to_vec(),
            trade: Some((
                instrument.exchange.to_string(),
                instrument.symbol.to_string(),
                fields.trade_id,
            )),
            duplicate: false,
            reference: None,
        };
        if self.duplicate_ratio > 0.0 {
            self.last_valid = Some(message.clone());
        }
        message
    }

    /// Messages generated so far, valid and malformed.
    pub fn generated(&self) -> u64 {
        self.num_generated
    }

    /// Deliberately malformed messages generated so far.
    pub fn malformed(&self) -> u64 {
        self.num_malformed
    }

    /// Repeats of a valid trade generated so far (`duplicate_ratio`).
    pub fn duplicates(&self) -> u64 {
        self.num_duplicates
    }

    /// Sequence numbers skipped so far (`gap_ratio`): each is one missing record K2 reports.
    pub fn gaps(&self) -> u64 {
        self.num_gaps
    }

    /// Reference-data updates generated so far (`reference_ratio`).
    pub fn references(&self) -> u64 {
        self.num_references
    }

    fn pick_instrument(&mut self) -> usize {
        let rank: f64 = self.popularity.sample(&mut self.rng);
        // `as` saturates; ranks are 1..=n.
        (rank as usize).saturating_sub(1).min(self.instruments.len() - 1)
    }

    /// A reference-data update of the instrument, effective `now_us`. It takes no sequence number
    /// and no trade id. Its status mostly stays `trading`; now and then an update halts the
    /// instrument, and a later one lifts the halt.
    fn reference_message(&mut self, index: usize, now_us: i64) -> GeneratedMessage {
        let instrument = &mut self.instruments[index];
        let change = if instrument.halted {
            RESUME_PROBABILITY
        } else {
            HALT_PROBABILITY
        };
        if self.rng.random_bool(change) {
            instrument.halted = !instrument.halted;
        }
        self.buf.clear();
        // Writing into a String cannot fail.
        let _ = write_reference(&mut self.buf, &mut self.clock, instrument, now_us);
        GeneratedMessage {
            key: instrument.key.clone(),
            payload: self.buf.as_bytes().to_vec(),
            trade: None,
            duplicate: false,
            reference: Some((instrument.exchange.to_string(), instrument.symbol.to_string())),
        }
    }

    /// A broken variant of the instrument's next trade. It carries the sequence number the next
    /// valid trade will get (as a corrupted copy of it would), but consumes neither that sequence
    /// nor a trade id: its id is marked `X` and is never issued to a valid trade.
    fn malformed_message(&mut self, index: usize, kind: MalformedKind, now_us: i64) -> GeneratedMessage {
        let instrument = &self.instruments[index];
        let sequence = instrument.sequence + 1;
        let price_units = (instrument.log_price.exp() * pow10(instrument.price_decimals))
            .round()
            .max(1.0);
        let fields = TradeFields {
            sequence,
            trade_id: format!("X{}-{}", instrument.trade_id(sequence), self.num_malformed),
            price_units: price_units as i64,
            quantity_units: 1,
            sell: false,
            event_time_us: now_us,
        };
        let buf = &mut self.buf;
        buf.clear();
        let clock = &mut self.clock;
        // Writing into a String cannot fail.
        let _ = match kind {
            MalformedKind::TruncatedJson | MalformedKind::InvalidUtf8 => {
                write_canonical_trade(buf, clock, instrument, &fields, Field::All)
            }
            MalformedKind::MissingPrice => {
                write_canonical_trade(buf, clock, instrument, &fields, Field::NoPrice)
            }
            MalformedKind::NegativeQuantity => {
                write_canonical_trade(buf, clock, instrument, &fields, Field::NegativeQuantity)
            }
            MalformedKind::NanPrice => {
                write_canonical_trade(buf, clock, instrument, &fields, Field::NanPrice)
            }
            MalformedKind::UnknownSide => {
                write_canonical_trade(buf, clock, instrument, &fields, Field::HoldSide)
            }
            MalformedKind::FutureEventTime => {
                let fields = TradeFields {
                    event_time_us: now_us.saturating_add(10 * MICROS_PER_YEAR),
                    ..fields
                };
                write_canonical_trade(buf, clock, instrument, &fields, Field::All)
            }
            MalformedKind::NumericPrice => {
                write_canonical_trade(buf, clock, instrument, &fields, Field::NumericPrice)
            }
        };
        let mut payload = buf.as_bytes().to_vec();
        match kind {
            MalformedKind::TruncatedJson => payload.truncate(payload.len() / 2),
            MalformedKind::InvalidUtf8 => {
                // Overwrite the symbol's first bytes with bytes that are never valid UTF-8.
                let at = payload
                    .windows(10)
                    .position(|w| w == b"\"symbol\":\"")
                    .map(|p| p + 10);
                if let Some(at) = at {
                    let end = (at + 2).min(payload.len());
                    payload.splice(at..end, [0xff, 0xfe, 0xc3]);
                }
            }
            _ => {}
        }
        GeneratedMessage {
            key: instrument.key.clone(),
            payload,
            trade: None,
            duplicate: false,
            reference: None,
        }
    }
}

/// Which field of a canonical trade to spoil, if any.
#[derive(Clone, Copy, PartialEq)]
enum Field {
    All,
    NoPrice,
    NegativeQuantity,
    NanPrice,
    HoldSide,
    NumericPrice,
}

/// What a topic that takes the generator's messages must hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MessageProfile {
    /// Average key + value bytes of a message.
    pub average_bytes: f64,
    /// The largest share of messages that carry one key. A key's messages
    /// all go to one partition, so however many partitions a topic has,
    /// one of them takes at least this share of the rate.
    pub hottest_key_share: f64,
}

/// The [`MessageProfile`] of what `params` generates (a sample of 10,000),
/// for sizing a topic.
pub fn message_profile(params: &GeneratorParams) -> MessageProfile {
    let mut generator = TradeGenerator::new(params.clone());
    let now = crate::model::now_us();
    let sample = 10_000;
    let mut bytes = 0usize;
    let mut per_key: HashMap<String, u32> = HashMap::new();
    for _ in 0..sample {
        let message = generator.next_message(now);
        bytes += message.key.len() + message.payload.len();
        *per_key.entry(message.key).or_default() += 1;
    }
    MessageProfile {
        average_bytes: bytes as f64 / sample as f64,
        hottest_key_share: per_key.values().copied().max().unwrap_or(0) as f64 / sample as f64,
    }
}

/// `{"exchange":"ASX","symbol":"BHP","sequence":123,"trade_id":"BHP-000000123","price":"45.12",
/// "quantity":"100","side":"buy","event_time":"2026-11-23T10:15:30.123456Z"}`
fn write_canonical_trade(
    buf: &mut String,
    clock: &mut SecondCache,
    instrument: &Instrument,
    fields: &TradeFields,
    spoil: Field,
) -> fmt::Result {
    write!(
        buf,
        r#"{{"exchange":"{}","symbol":"{}","sequence":{},"trade_id":""#,
        instrument.json_exchange, instrument.json_symbol, fields.sequence
    )?;
    push_json_escaped(buf, &fields.trade_id);
    buf.push('"');
    match spoil {
        Field::NoPrice => {}
        Field::NanPrice => buf.push_str(r#","price":"NaN""#),
        Field::NumericPrice => {
            buf.push_str(r#","price":"#);
            write_fixed(buf, fields.price_units, instrument.price_decimals)?;
        }
        _ => {
            buf.push_str(r#","price":""#);
            write_fixed(buf, fields.price_units, instrument.price_decimals)?;
            buf.push('"');
        }
    }
    buf.push_str(r#","quantity":""#);
    if spoil == Field::NegativeQuantity {
        buf.push('-');
    }
    write_fixed(buf, fields.quantity_units, instrument.quantity_decimals)?;
    let side = match (spoil, fields.sell) {
        (Field::HoldSide, _) => "HOLD",
        (_, true) => "sell",
        (_, false) => "buy",
    };
    write!(buf, r#"","side":"{side}","event_time":""#)?;
    clock.write_rfc3339_micros(buf, fields.event_time_us)?;
    buf.push_str("\"}");
    Ok(())
}

/// `{"type":"reference","exchange":"ASX","symbol":"BHP","name":"BHP Group","currency":"AUD",
/// "tick_size":"0.01","lot_size":"1","status":"trading","effective_time":"2026-11-23T10:15:30.123456Z"}`:
/// the tick is the price's last decimal, the lot the quantity's (a whole share on equities);
/// `currency` is left out when unknown.
fn write_reference(
    buf: &mut String,
    clock: &mut SecondCache,
    instrument: &Instrument,
    effective_time_us: i64,
) -> fmt::Result {
    write!(
        buf,
        r#"{{"type":"reference","exchange":"{}","symbol":"{}","name":"{}""#,
        instrument.json_exchange, instrument.json_symbol, instrument.json_name
    )?;
    if let Some(currency) = instrument.currency {
        write!(buf, r#","currency":"{currency}""#)?;
    }
    buf.push_str(r#","tick_size":""#);
    write_fixed(buf, 1, instrument.price_decimals)?;
    buf.push_str(r#"","lot_size":""#);
    write_fixed(buf, 1, instrument.quantity_decimals)?;
    let status = if instrument.halted { "halted" } else { "trading" };
    write!(buf, r#"","status":"{status}","effective_time":""#)?;
    clock.write_rfc3339_micros(buf, effective_time_us)?;
    buf.push_str("\"}");
    Ok(())
}

/// Binance's trade event:
/// `{"e":"trade","E":<ms>,"s":"BTCUSDT","t":<sequence>,"p":"60000.12","q":"0.01500000","T":<ms>,
/// "m":true,"M":true}`. `m` (buyer is maker) means the aggressor sold.
fn write_binance_trade(buf: &mut String, instrument: &Instrument, fields: &TradeFields) -> fmt::Result {
    let ms = fields.event_time_us.div_euclid(1000);
    write!(
        buf,
        r#"{{"e":"trade","E":{ms},"s":"{}","t":{},"p":""#,
        instrument.json_symbol, fields.sequence
    )?;
    write_fixed(buf, fields.price_units, instrument.price_decimals)?;
    buf.push_str(r#"","q":""#);
    // Binance always prints quantities with 8 decimals.
    let scale = DECIMAL_SCALE as u32;
    let quantity = fields
        .quantity_units
        .saturating_mul(10i64.pow(scale - instrument.quantity_decimals));
    write_fixed(buf, quantity, scale)?;
    write!(buf, r#"","T":{ms},"m":{},"M":true}}"#, fields.sell)
}

/// Writes `units / 10^decimals` as a plain decimal (no exponent); `units` is non-negative.
fn write_fixed(buf: &mut String, units: i64, decimals: u32) -> fmt::Result {
    if decimals == 0 {
        return write!(buf, "{units}");
    }
    let scale = 10i64.pow(decimals);
    write!(
        buf,
        "{}.{:0width$}",
        units / scale,
        units % scale,
        width = decimals as usize
    )
}

/// Formats RFC 3339 UTC timestamps with microseconds, re-rendering the date and time of day only
/// when the second changes (chrono's formatter costs more than the rest of a message).
#[derive(Default)]
struct SecondCache {
    second: Option<i64>,
    prefix: String,
}

impl SecondCache {
    fn write_rfc3339_micros(&mut self, buf: &mut String, us: i64) -> fmt::Result {
        let second = us.div_euclid(1_000_000);
        let micros = us.rem_euclid(1_000_000);
        if self.second != Some(second) {
            let time = chrono::DateTime::from_timestamp(second, 0).unwrap_or_default();
            self.prefix.clear();
            write!(self.prefix, "{}", time.format("%Y-%m-%dT%H:%M:%S"))?;
            self.second = Some(second);
        }
        write!(buf, "{}.{micros:06}Z", self.prefix)
    }
}

fn pow10(decimals: u32) -> f64 {
    10f64.powi(decimals as i32)
}

fn clamp_ratio(ratio: f64) -> f64 {
    if ratio.is_nan() {
        0.0
    } else {
        ratio.clamp(0.0, 1.0)
    }
}

fn json_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    push_json_escaped(&mut out, text);
    out
}

fn push_json_escaped(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Producing to Kafka
// ---------------------------------------------------------------------------------------------

/// What to produce, where, how fast and for how long.
#[derive(Debug, Clone)]
pub struct LoadgenParams {
    pub brokers: String,
    pub topic: String,
    /// Messages per second; 0 = as fast as possible.
    pub rate: u64,
    /// How the rate changes over the run (a ramp, bursts); the default keeps it at `rate`.
    pub shape: RateShape,
    /// Stop after this long (None = until `total` or shutdown).
    pub duration: Option<Duration>,
    /// Stop after this many messages (None = unlimited).
    pub total: Option<u64>,
    /// Append every produced valid trade and reference-data update to this file (one line each, see
    /// [`ProducedTrade`]), written only for messages whose delivery was acknowledged.
    pub ids_file: Option<PathBuf>,
    /// The symbol tiers that give each trade in the ids file its priority (K2's `[shedding]`).
    pub tiers: TierTable,
    pub generator: GeneratorParams,
    /// Show an indicatif progress line on stderr.
    pub progress: bool,
}

impl LoadgenParams {
    /// The embedded load generator as `config` sets it up (`[loadgen]`, the topic, the `[shedding]`
    /// tiers) against `brokers`, at a steady `loadgen.rate` until shutdown, with no progress line.
    pub fn from_config(config: &crate::config::K2Config, brokers: &str, ids_file: Option<PathBuf>) -> Self {
        LoadgenParams {
            brokers: brokers.to_string(),
            topic: config.kafka.topic.clone(),
            rate: config.loadgen.rate,
            shape: RateShape::default(),
            duration: None,
            total: None,
            ids_file,
            tiers: TierTable::new(&config.shedding),
            generator: GeneratorParams::from_config(&config.loadgen),
            progress: false,
        }
    }
}

impl GeneratorParams {
    /// The embedded load generator's messages as `[loadgen]` sets them.
    pub fn from_config(config: &crate::config::LoadgenConfig) -> Self {
        GeneratorParams {
            seed: config.seed,
            malformed_ratio: config.malformed_ratio,
            reference_ratio: config.reference_ratio,
            ..GeneratorParams::default()
        }
    }
}

/// How the rate changes over a run: a linear ramp from the base rate to
/// another, and bursts on top. The default keeps the base rate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateShape {
    pub ramp: Option<Ramp>,
    pub burst: Option<Burst>,
}

/// From the base rate to `to`, linearly over `over`, then `to`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ramp {
    pub to: u64,
    pub over: Duration,
}

/// `rate` (when above the ramp's) for `lasting`, once every `every`,
/// starting `every` into the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Burst {
    pub rate: u64,
    pub lasting: Duration,
    pub every: Duration,
}

impl RateShape {
    pub fn is_flat(&self) -> bool {
        self.ramp.is_none() && self.burst.is_none()
    }

    /// Messages a second wanted `elapsed` into a run whose base rate is `base`.
    pub fn rate_at(&self, base: u64, elapsed: Duration) -> u64 {
        let t = elapsed.as_secs_f64();
        let mut rate = base;
        if let Some(ramp) = self.ramp {
            let done = (t / ramp.over.as_secs_f64()).min(1.0);
            rate = (base as f64 + (ramp.to as f64 - base as f64) * done).round() as u64;
        }
        if let Some(burst) = self.burst {
            let every = burst.every.as_secs_f64();
            if t >= every && t % every < burst.lasting.as_secs_f64() {
                rate = rate.max(burst.rate);
            }
        }
        rate
    }

    /// Checks the shape against the base rate, so a bad command line gets
    /// one clear line.
    pub fn validate(&self, base: u64) -> Result<(), LoadgenError> {
        if self.is_flat() {
            return Ok(());
        }
        if base == 0 {
            return Err(LoadgenError::Shape(
                "a ramp or bursts need a base --rate above 0 (0 produces as fast as possible)".into(),
            ));
        }
        if let Some(ramp) = self.ramp {
            if ramp.to == 0 {
                return Err(LoadgenError::Shape("--ramp-to must be above 0".into()));
            }
            if ramp.over.is_zero() {
                return Err(LoadgenError::Shape("--ramp-secs must be above 0".into()));
            }
        }
        if let Some(burst) = self.burst {
            if burst.rate == 0 {
                return Err(LoadgenError::Shape("--burst-rate must be above 0".into()));
            }
            if burst.lasting.is_zero() || burst.lasting >= burst.every {
                return Err(LoadgenError::Shape(format!(
                    "--burst-secs ({} s) must be above 0 and below --burst-every ({} s)",
                    burst.lasting.as_secs_f64(),
                    burst.every.as_secs_f64()
                )));
            }
        }
        Ok(())
    }
}

/// What a [`run_loadgen`] run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadgenReport {
    /// Messages acknowledged by the broker, valid and malformed.
    pub produced: u64,
    /// Of `produced`, the deliberately malformed messages.
    pub malformed: u64,
    /// Of `produced`, the repeats of a valid trade (`duplicate_ratio`).
    pub duplicates: u64,
    /// Sequence numbers skipped (`gap_ratio`).
    pub gaps: u64,
    /// Of `produced`, the reference-data updates (`reference_ratio`).
    pub reference: u64,
    /// Messages whose delivery failed (each was logged).
    pub failed: u64,
    pub elapsed: Duration,
}

/// What [`preload`] produced.
#[derive(Debug, Clone)]
pub struct PreloadReport {
    /// Valid trades as (exchange, trade_id), in production order.
    pub valid: Vec<TradeKey>,
    /// Deliberately malformed messages produced.
    pub malformed: u64,
    /// Repeats of a valid trade produced (`duplicate_ratio`; not in `valid`).
    pub duplicates: u64,
    /// Reference-data updates produced (`reference_ratio`; not in `valid`).
    pub reference: u64,
    /// Payload bytes produced.
    pub bytes: u64,
}

/// Produces until duration/total is reached or `shutdown` resolves. Runs the blocking producer loop
/// on a dedicated thread (tokio::task::spawn_blocking) so it works from any async context.
pub async fn run_loadgen(
    params: LoadgenParams,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<LoadgenReport> {
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.store(true, Ordering::Relaxed);
        }
    });
    let result = tokio::task::spawn_blocking(move || produce_until_done(&params, &stop)).await;
    watcher.abort();
    result.context("load generator thread failed")?
}

/// How preloaded messages are spread over a topic's partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// By key (`EXCHANGE:SYMBOL`), as a feed would: each symbol's trades stay in order in one
    /// partition, but popular symbols make their partitions much fuller than the rest.
    ByKey,
    /// Round robin over `partitions`: every partition gets the same share, so a per-partition
    /// budget (the mock broker keeps ~5 MiB) holds the most messages. A symbol's trades then span
    /// partitions.
    Even { partitions: i32 },
    /// Each symbol's trades in runs of `block` consecutive trades per partition, the runs moving
    /// round the partitions: partitions fill evenly, and a lane sees a symbol in order except for
    /// one jump per run (a gap event per `block` trades, where `Even` makes nearly every trade one).
    Blocks { partitions: i32, block: u64 },
}

/// Produce exactly `count` messages as fast as possible, wait until all are acknowledged, and return
/// the valid trades' (exchange, symbol, trade_id) in production order plus the counts of the other
/// messages. For benchmarks and tests; blocking.
pub fn preload(
    brokers: &str,
    topic: &str,
    count: u64,
    generator: GeneratorParams,
    spread: Spread,
) -> anyhow::Result<PreloadReport> {
    if let Spread::Even { partitions } | Spread::Blocks { partitions, .. } = spread
        && partitions < 1
    {
        bail!("preload needs at least one partition, got {partitions}");
    }
    if let Spread::Blocks { block: 0, .. } = spread {
        bail!("preload needs blocks of at least one trade");
    }
    // Blocks: trades seen so far per key, and where the key's first run went.
    let mut per_key: HashMap<String, (u64, u64)> = HashMap::new();
    generator
        .validate()
        .context("invalid load generator parameters")?;
    let producer = create_producer(brokers, topic)?;
    let mut generator = TradeGenerator::new(generator);
    let mut report = PreloadReport {
        valid: Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(10_000_000)),
        malformed: 0,
        duplicates: 0,
        reference: 0,
        bytes: 0,
    };
    let never = AtomicBool::new(false);
    for i in 0..count {
        let message = generator.next_message(crate::model::now_us());
        let tag = DeliveryTag::of(&message, false);
        let partition = match spread {
            Spread::ByKey => None,
            Spread::Even { partitions } => Some((i % partitions as u64) as i32),
            Spread::Blocks { partitions, block } => {
                let next_start = per_key.len() as u64;
                let (seen, start) = per_key.entry(message.key.clone()).or_insert((0, next_start));
                let partition = (*start + *seen / block) % partitions as u64;
                *seen += 1;
                Some(partition as i32)
            }
        };
        send_with_retry(&producer, topic, partition, &message, tag, &never)?;
        report.bytes += message.payload.len() as u64;
        match message.trade {
            Some(_) if message.duplicate => report.duplicates += 1,
            Some(trade) => report.valid.push(trade),
            None if message.reference.is_some() => report.reference += 1,
            None => report.malformed += 1,
        }
        if i % 1024 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    finish(&producer, FLUSH_TIMEOUT);
    let tracker = producer.context();
    let failed = tracker.num_failed.load(Ordering::Relaxed);
    let acked = tracker.num_acked.load(Ordering::Relaxed);
    if failed > 0 || acked != count {
        bail!(
            "preload to topic {topic} on {brokers}: {failed} of {count} deliveries failed ({acked} acknowledged)"
        );
    }
    Ok(report)
}

/// How long the final flush may take before what is left is purged and counted as failed.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the loop hands acknowledged ids to the file and redraws the progress line.
const REPORT_INTERVAL: Duration = Duration::from_millis(200);
/// How often a shaped rate (ramp, bursts) is looked at again.
const RESHAPE_INTERVAL: Duration = Duration::from_millis(100);

/// The delivery opaque: what kind of message it was, and its id when ids are being recorded.
enum DeliveryTag {
    Malformed,
    Duplicate,
    Valid(Option<TradeKey>),
    /// A reference-data update, with its (exchange, symbol) when ids are being recorded.
    Reference(Option<(String, String)>),
}

impl DeliveryTag {
    fn of(message: &GeneratedMessage, record_id: bool) -> Self {
        match (&message.trade, &message.reference) {
            (None, Some(instrument)) => DeliveryTag::Reference(record_id.then(|| instrument.clone())),
            (None, None) => DeliveryTag::Malformed,
            (Some(_), _) if message.duplicate => DeliveryTag::Duplicate,
            (Some(trade), _) => DeliveryTag::Valid(record_id.then(|| trade.clone())),
        }
    }
}

/// An acknowledged record for the ids file, before its priority is looked up.
struct AckedId {
    /// (exchange, symbol, trade_id); a reference record has [`ProducedTrade::REFERENCE_ID`] for
    /// a trade id.
    key: TradeKey,
    reference: bool,
    partition: i32,
    offset: i64,
}

/// Counts delivery reports. Callbacks run on the thread that polls the producer.
#[derive(Default)]
struct DeliveryTracker {
    num_acked: AtomicU64,
    num_acked_malformed: AtomicU64,
    num_acked_duplicates: AtomicU64,
    num_acked_references: AtomicU64,
    num_failed: AtomicU64,
    /// Acknowledged trades and reference records not yet written to the ids file.
    acked_ids: Mutex<Vec<AckedId>>,
}

impl DeliveryTracker {
    fn record_id(&self, key: TradeKey, reference: bool, message: &rdkafka::message::BorrowedMessage<'_>) {
        if let Ok(mut ids) = self.acked_ids.lock() {
            ids.push(AckedId {
                key,
                reference,
                partition: message.partition(),
                offset: message.offset(),
            });
        }
    }
}

impl ClientContext for DeliveryTracker {
    fn error(&self, error: KafkaError, reason: &str) {
        warn!(error = %error, reason, "kafka producer error");
    }
}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = Box<DeliveryTag>;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: Self::DeliveryOpaque) {
        match result {
            Ok(message) => {
                self.num_acked.fetch_add(1, Ordering::Relaxed);
                match *tag {
                    DeliveryTag::Malformed => {
                        self.num_acked_malformed.fetch_add(1, Ordering::Relaxed);
                    }
                    DeliveryTag::Duplicate => {
                        self.num_acked_duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    DeliveryTag::Valid(Some(trade)) => self.record_id(trade, false, message),
                    DeliveryTag::Valid(None) => {}
                    DeliveryTag::Reference(instrument) => {
                        self.num_acked_references.fetch_add(1, Ordering::Relaxed);
                        if let Some((exchange, symbol)) = instrument {
                            let key = (exchange, symbol, ProducedTrade::REFERENCE_ID.to_owned());
                            self.record_id(key, true, message);
                        }
                    }
                }
            }
            Err((error, message)) => {
                let num_failed = self.num_failed.fetch_add(1, Ordering::Relaxed) + 1;
                // Every failure is counted; the log shows the first ones and then one in 10,000.
                if num_failed <= 10 || num_failed.is_multiple_of(10_000) {
                    warn!(
                        num_failed,
                        partition = message.partition(),
                        error = %error,
                        "message delivery failed"
                    );
                }
            }
        }
    }
}

/// Creates the producer and checks that the brokers answer and the topic exists, so a typo fails
/// in seconds instead of after the delivery timeout.
fn create_producer(brokers: &str, topic: &str) -> anyhow::Result<BaseProducer<DeliveryTracker>> {
    if brokers.trim().is_empty() {
        bail!("no Kafka brokers given");
    }
    if topic.is_empty() {
        bail!("no Kafka topic given");
    }
    let producer: BaseProducer<DeliveryTracker> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        // The bundled librdkafka has zlib only; uncompressed is the fastest anyway.
        .set("compression.type", "none")
        // Retries must not reorder or duplicate a symbol's trades: K2's sequencer would report
        // the producer's artefacts as feed gaps.
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "60000")
        // A missing topic is a mistake to report, not something to create behind the user's back.
        .set("allow.auto.create.topics", "false")
        .create_with_context(DeliveryTracker::default())
        .with_context(|| format!("failed to create Kafka producer for brokers {brokers}"))?;
    let metadata = producer
        .client()
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .with_context(|| format!("failed to fetch metadata for topic {topic} from brokers {brokers}"))?;
    let topic_metadata = metadata.topics().iter().find(|t| t.name() == topic);
    match topic_metadata {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(producer),
        Some(t) => match t.error() {
            Some(error) => bail!(
                "topic {topic} is not available on brokers {brokers}: {}",
                RDKafkaErrorCode::from(error)
            ),
            None => bail!("topic {topic} has no partitions on brokers {brokers}"),
        },
        None => bail!("topic {topic} does not exist on brokers {brokers}"),
    }
}

/// Enqueues one message; when librdkafka's queue is full, serves delivery reports and retries.
/// Returns Ok(false) if `stop` was raised while waiting for room.
fn send_with_retry(
    producer: &BaseProducer<DeliveryTracker>,
    topic: &str,
    partition: Option<i32>,
    message: &GeneratedMessage,
    tag: DeliveryTag,
    stop: &AtomicBool,
) -> anyhow::Result<bool> {
    let mut record = BaseRecord::with_opaque_to(topic, Box::new(tag))
        .key(message.key.as_str())
        .payload(message.payload.as_slice());
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(true),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(false);
                }
                record = returned;
                producer.poll(Duration::from_millis(1));
            }
            Err((error, _)) => {
                return Err(error).with_context(|| format!("failed to enqueue a message for topic {topic}"));
            }
        }
    }
}

/// Waits for outstanding deliveries; what is still queued after `timeout` is purged, which reports
/// it as failed.
fn finish(producer: &BaseProducer<DeliveryTracker>, timeout: Duration) {
    if let Err(error) = producer.flush(timeout) {
        warn!(
            error = %error,
            in_flight = producer.in_flight_count(),
            "flush timed out, purging undelivered messages"
        );
        producer.purge(PurgeConfig::default().queue().inflight());
        if let Err(error) = producer.flush(Duration::from_secs(5)) {
            warn!(error = %error, "flush after purge failed");
        }
    }
}

/// The blocking loop behind [`run_loadgen`].
fn produce_until_done(params: &LoadgenParams, stop: &AtomicBool) -> anyhow::Result<LoadgenReport> {
    params
        .generator
        .validate()
        .context("invalid load generator parameters")?;
    let mut ids_file = match &params.ids_file {
        Some(path) => Some(open_ids_file(path)?),
        None => None,
    };
    params
        .shape
        .validate(params.rate)
        .context("invalid load generator rate")?;
    let producer = create_producer(&params.brokers, &params.topic)?;
    let mut generator = TradeGenerator::new(params.generator.clone());
    let mut target = params.rate;
    let mut pacer = Pacer::new(target);
    let mut progress = params.progress.then(|| Progress::new(progress_bar()));
    info!(
        brokers = %params.brokers,
        topic = %params.topic,
        rate = params.rate,
        shape = ?params.shape,
        "load generator started"
    );

    let started = Instant::now();
    let deadline = params.duration.map(|d| started + d);
    let mut num_sent: u64 = 0;
    let mut last_report = started;
    let mut last_reshape = started;
    'produce: loop {
        let remaining = params.total.map_or(u64::MAX, |total| total - num_sent.min(total));
        if remaining == 0 || stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if !params.shape.is_flat() && last_reshape.elapsed() >= RESHAPE_INTERVAL {
            last_reshape = Instant::now();
            let wanted = params.shape.rate_at(params.rate, started.elapsed());
            if wanted.abs_diff(target) * 100 >= target.max(1) {
                target = wanted;
                pacer = Pacer::resumed(target);
            }
        }
        let batch = pacer.batch.min(remaining);
        if let Some(wait) = pacer.wait(batch)? {
            // Serve delivery reports while waiting for the next permits; never wait past the end.
            let wait = deadline.map_or(wait, |d| wait.min(d.saturating_duration_since(Instant::now())));
            producer.poll(wait.min(Duration::from_millis(50)));
            continue;
        }
        for _ in 0..batch {
            let message = generator.next_message(crate::model::now_us());
            let tag = DeliveryTag::of(&message, ids_file.is_some());
            if !send_with_retry(&producer, &params.topic, None, &message, tag, stop)? {
                break 'produce;
            }
            num_sent += 1;
        }
        producer.poll(Duration::ZERO);
        if last_report.elapsed() >= REPORT_INTERVAL {
            last_report = Instant::now();
            if let Some(file) = &mut ids_file {
                write_acked_ids(producer.context(), &params.tiers, file)?;
            }
            if let Some(progress) = &mut progress {
                progress.update(producer.context(), &generator, target);
            }
        }
    }

    finish(&producer, FLUSH_TIMEOUT);
    if let Some(file) = &mut ids_file {
        write_acked_ids(producer.context(), &params.tiers, file)?;
        file.flush().context("failed to write the ids file")?;
    }
    let tracker = producer.context();
    let report = LoadgenReport {
        produced: tracker.num_acked.load(Ordering::Relaxed),
        malformed: tracker.num_acked_malformed.load(Ordering::Relaxed),
        duplicates: tracker.num_acked_duplicates.load(Ordering::Relaxed),
        gaps: generator.gaps(),
        reference: tracker.num_acked_references.load(Ordering::Relaxed),
        failed: tracker.num_failed.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    };
    if let Some(progress) = &mut progress {
        progress.update(tracker, &generator, target);
        progress.bar.finish();
    }
    if report.failed > 0 {
        warn!(
            failed = report.failed,
            produced = report.produced,
            "some deliveries failed"
        );
    }
    info!(
        produced = report.produced,
        malformed = report.malformed,
        duplicates = report.duplicates,
        gaps = report.gaps,
        reference = report.reference,
        failed = report.failed,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "load generator finished"
    );
    Ok(report)
}

/// Paces production in batches of about 1 ms worth of the rate, so a high rate costs one limiter
/// check per batch rather than per message.
struct Pacer {
    limiter: Option<governor::DefaultDirectRateLimiter>,
    batch: u64,
}

impl Pacer {
    /// Unpaced batches: large enough to amortise the loop, small enough to notice a stop quickly.
    const UNPACED_BATCH: u64 = 1_000;
    const MAX_BATCH: u32 = 10_000;

    /// A pacer for a new rate in the middle of a run: it starts with no
    /// credit, so changing the rate never lets a burst of the old credit out.
    fn resumed(rate: u64) -> Self {
        let pacer = Pacer::new(rate);
        if let Some(limiter) = &pacer.limiter {
            while limiter.check().is_ok() {}
        }
        pacer
    }

    fn new(rate: u64) -> Self {
        let Some(rate) = NonZeroU32::new(u32::try_from(rate).unwrap_or(u32::MAX)) else {
            return Pacer {
                limiter: None,
                batch: Self::UNPACED_BATCH,
            };
        };
        let batch = NonZeroU32::new((rate.get() / 1000).clamp(1, Self::MAX_BATCH)).unwrap_or(NonZeroU32::MIN);
        // Up to 100 ms of credit: a wait that oversleeps (timer slack, a
        // busy machine) is made up by the next batches instead of lost, so
        // the produced rate stays the configured one.
        let burst = NonZeroU32::new((rate.get() / 10).max(batch.get())).unwrap_or(batch);
        let quota = Quota::per_second(rate).allow_burst(burst);
        Pacer {
            limiter: Some(RateLimiter::direct(quota)),
            batch: u64::from(batch.get()),
        }
    }

    /// None if `n` messages may go now, otherwise how long to wait before asking again.
    fn wait(&self, n: u64) -> anyhow::Result<Option<Duration>> {
        let Some(limiter) = &self.limiter else {
            return Ok(None);
        };
        let n = u32::try_from(n)
            .ok()
            .and_then(NonZeroU32::new)
            .unwrap_or(NonZeroU32::MIN);
        match limiter.check_n(n) {
            Ok(Ok(())) => Ok(None),
            Ok(Err(not_until)) => Ok(Some(not_until.wait_time_from(limiter.clock().now()))),
            Err(error) => Err(anyhow::anyhow!("rate limiter rejected a batch of {n}: {error}")),
        }
    }
}

fn open_ids_file(path: &Path) -> anyhow::Result<BufWriter<File>> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("failed to open ids file {}", path.display()))?;
    Ok(BufWriter::new(file))
}

fn write_acked_ids(
    tracker: &DeliveryTracker,
    tiers: &TierTable,
    file: &mut BufWriter<File>,
) -> anyhow::Result<()> {
    let ids = match tracker.acked_ids.lock() {
        Ok(mut ids) => std::mem::take(&mut *ids),
        Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
    };
    for id in ids {
        // Reference data is always LOW; trades never are.
        let priority = if id.reference {
            Priority::Low
        } else {
            tiers.trade_priority(&id.key.0, &id.key.1)
        };
        let line = ProducedTrade {
            key: id.key,
            priority,
            partition: id.partition,
            offset: id.offset,
        };
        writeln!(file, "{line}").context("failed to write the ids file")?;
    }
    Ok(())
}

/// One line of the ids file: `exchange,symbol,trade_id,priority,partition,offset`, e.g.
/// `BINANCE,BTCUSDT,1733000000000001,CRITICAL,3,1041`. The priority is the one K2's
/// `[shedding]` tiers give the trade, so a verdict can say what shedding deferred; partition
/// and offset are where Kafka put it, so it can be matched with `k2.shed_ledger`'s ranges.
///
/// A reference-data record has the literal `reference` for a trade id and is always LOW (no trade
/// is): `ASX,BHP,reference,LOW,2,377`. Its identity is its partition and offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducedTrade {
    pub key: TradeKey,
    pub priority: Priority,
    pub partition: i32,
    pub offset: i64,
}

impl ProducedTrade {
    /// What a reference-data record's line has where a trade's has its id.
    pub const REFERENCE_ID: &str = "reference";

    /// The line of a reference-data record.
    pub fn reference(exchange: String, symbol: String, partition: i32, offset: i64) -> Self {
        ProducedTrade {
            key: (exchange, symbol, Self::REFERENCE_ID.to_owned()),
            priority: Priority::Low,
            partition,
            offset,
        }
    }

    /// Whether the line is a reference-data record rather than a trade: reference data is LOW,
    /// and no trade is.
    pub fn is_reference(&self) -> bool {
        self.priority == Priority::Low
    }
}

impl fmt::Display for ProducedTrade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (exchange, symbol, trade_id) = &self.key;
        write!(
            f,
            "{exchange},{symbol},{trade_id},{},{},{}",
            self.priority, self.partition, self.offset
        )
    }
}

impl std::str::FromStr for ProducedTrade {
    type Err = String;

    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let fields: Vec<&str> = line.split(',').collect();
        let [exchange, symbol, trade_id, priority, partition, offset] = fields[..] else {
            return Err(format!(
                "expected 6 fields (exchange,symbol,trade_id,priority,partition,offset), found {}",
                fields.len()
            ));
        };
        Ok(ProducedTrade {
            key: (exchange.into(), symbol.into(), trade_id.into()),
            priority: priority.parse()?,
            partition: partition
                .parse()
                .map_err(|_| format!("partition `{partition}` is not a number"))?,
            offset: offset
                .parse()
                .map_err(|_| format!("offset `{offset}` is not a number"))?,
        })
    }
}

/// Reads an ids file written by [`run_loadgen`]; a bad line is an error naming its number.
pub fn read_ids_file(path: &Path) -> anyhow::Result<Vec<ProducedTrade>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read ids file {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(i, line)| {
            line.parse()
                .map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), i + 1))
        })
        .collect()
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The live progress line: what was acknowledged, the rate achieved over the
/// last second against the rate wanted now, and the odd messages sent.
struct Progress {
    bar: ProgressBar,
    /// (when, acknowledged then), about a second apart.
    window: std::collections::VecDeque<(Instant, u64)>,
}

impl Progress {
    fn new(bar: ProgressBar) -> Self {
        Progress {
            bar,
            window: std::collections::VecDeque::new(),
        }
    }

    fn update(&mut self, tracker: &DeliveryTracker, generator: &TradeGenerator, target: u64) {
        let now = Instant::now();
        let produced = tracker.num_acked.load(Ordering::Relaxed);
        self.window.push_back((now, produced));
        while self.window.len() > 2 && now.duration_since(self.window[1].0) >= Duration::from_secs(1) {
            self.window.pop_front();
        }
        let (since, then) = self.window[0];
        let seconds = now.duration_since(since).as_secs_f64();
        let rate = if seconds > 0.0 {
            (produced - then) as f64 / seconds
        } else {
            0.0
        };
        let target = if target == 0 {
            "unpaced".to_string()
        } else {
            format!("{target}/s wanted")
        };
        let failed = tracker.num_failed.load(Ordering::Relaxed);
        self.bar.set_message(format!(
            "produced {produced}  {rate:.0}/s now ({target})  malformed {}  duplicates {}  gaps {}  reference {}  failed {failed}",
            generator.malformed(),
            generator.duplicates(),
            generator.gaps(),
            generator.references(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::mocking::MockCluster;
    use rdkafka::{Offset, TopicPartitionList};
    use serde_json::Value;

    use super::*;

    /// 2026-11-23T10:15:30.123456Z
    const NOW_US: i64 = 1_795_428_930_123_456;

    fn seeded(seed: u64) -> GeneratorParams {
        GeneratorParams {
            seed,
            ..GeneratorParams::default()
        }
    }

    fn generate(params: GeneratorParams, count: usize) -> Vec<GeneratedMessage> {
        let mut generator = TradeGenerator::new(params);
        (0..count)
            .map(|i| generator.next_message(NOW_US + i as i64))
            .collect()
    }

    /// A trade as a strict decoder would read it, from either format.
    #[derive(Debug)]
    struct Parsed {
        exchange: String,
        symbol: String,
        sequence: i64,
        trade_id: String,
        price: String,
        quantity: String,
    }

    /// Checks a decimal string: plain digits, at most 8 decimals, > 0.
    fn positive_decimal(text: &str) -> Result<(), String> {
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        let digits_ok = !int.is_empty()
            && int.bytes().all(|b| b.is_ascii_digit())
            && frac.bytes().all(|b| b.is_ascii_digit());
        if !digits_ok || frac.len() > 8 {
            return Err(format!("not a plain decimal with <= 8 decimals: {text}"));
        }
        if text.bytes().all(|b| b == b'0' || b == b'.') {
            return Err(format!("not positive: {text}"));
        }
        Ok(())
    }

    fn string_field<'a>(value: &'a Value, name: &str) -> Result<&'a str, String> {
        match value.get(name) {
            None => Err(format!("{name} missing")),
            Some(field) => field.as_str().ok_or_else(|| format!("{name} is not a string")),
        }
    }

    fn parsed_symbol(key: &str) -> &str {
        key.split_once(':').map_or("", |(_, symbol)| symbol)
    }

    /// A day past the later of the tests' fixed clock and the real one:
    /// generated messages use the fixed clock, `preload` the real one.
    fn latest_plausible_us() -> i64 {
        NOW_US.max(chrono::Utc::now().timestamp_micros()) + 86_400_000_000
    }

    fn strict_parse(key: &str, payload: &[u8]) -> Result<Parsed, String> {
        let text = std::str::from_utf8(payload).map_err(|e| e.to_string())?;
        let value: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let (key_exchange, key_symbol) = key.split_once(':').ok_or("bad key")?;
        let parsed = if value.get("e").is_some() {
            assert_eq!(key_exchange, BINANCE, "native format on another exchange");
            let t = value.get("t").and_then(Value::as_i64).ok_or("t missing")?;
            let trade_time = value.get("T").and_then(Value::as_i64).ok_or("T missing")?;
            let quantity = string_field(&value, "q")?;
            assert_eq!(
                quantity.split_once('.').map(|(_, f)| f.len()),
                Some(8),
                "{quantity}"
            );
            assert!(value.get("m").and_then(Value::as_bool).is_some(), "m missing");
            assert_eq!(string_field(&value, "e")?, "trade");
            if trade_time > latest_plausible_us() / 1000 {
                return Err("trade time in the future".into());
            }
            Parsed {
                exchange: BINANCE.to_owned(),
                symbol: string_field(&value, "s")?.to_owned(),
                sequence: t,
                trade_id: t.to_string(),
                price: string_field(&value, "p")?.to_owned(),
                quantity: quantity.to_owned(),
            }
        } else {
            let side = string_field(&value, "side")?;
            if side != "buy" && side != "sell" {
                return Err(format!("bad side {side}"));
            }
            let event_time = string_field(&value, "event_time")?;
            let event_time = chrono::DateTime::parse_from_rfc3339(event_time).map_err(|e| e.to_string())?;
            if event_time.timestamp_micros() > latest_plausible_us() {
                return Err("event time in the future".into());
            }
            Parsed {
                exchange: string_field(&value, "exchange")?.to_owned(),
                symbol: string_field(&value, "symbol")?.to_owned(),
                sequence: value
                    .get("sequence")
                    .and_then(Value::as_i64)
                    .ok_or("sequence missing")?,
                trade_id: string_field(&value, "trade_id")?.to_owned(),
                price: string_field(&value, "price")?.to_owned(),
                quantity: string_field(&value, "quantity")?.to_owned(),
            }
        };
        positive_decimal(&parsed.price)?;
        positive_decimal(&parsed.quantity)?;
        assert_eq!(
            (key_exchange, key_symbol),
            (parsed.exchange.as_str(), parsed.symbol.as_str())
        );
        Ok(parsed)
    }

    /// Asserts per-(exchange, symbol) sequences 1, 2, 3, ... among the valid messages.
    fn assert_gap_free(messages: &[GeneratedMessage]) {
        let mut last: HashMap<&str, i64> = HashMap::new();
        for message in messages.iter().filter(|m| m.trade.is_some()) {
            let parsed = strict_parse(&message.key, &message.payload).expect("valid trade");
            let previous = last.insert(message.key.as_str(), parsed.sequence).unwrap_or(0);
            assert_eq!(parsed.sequence, previous + 1, "sequence of {}", message.key);
        }
        assert!(last.len() > 10, "only {} symbols traded", last.len());
    }

    #[test]
    fn sequences_start_at_one_and_have_no_gaps() {
        let messages = generate(seeded(1), 100_000);
        let first = messages.iter().find(|m| m.key == "ASX:BHP").expect("BHP traded");
        assert_eq!(
            strict_parse(&first.key, &first.payload).map(|p| p.sequence),
            Ok(1)
        );
        assert_gap_free(&messages);
    }

    #[test]
    fn trade_ids_are_unique_per_exchange_except_binance_which_is_per_symbol() {
        let messages = generate(seeded(2), 100_000);
        let mut seen = HashSet::new();
        let mut binance_ids = HashSet::new();
        for message in &messages {
            let (exchange, symbol, trade_id) = message.trade.clone().expect("no malformed by default");
            assert_eq!(symbol, parsed_symbol(&message.key));
            let parsed = strict_parse(&message.key, &message.payload).expect("valid trade");
            assert_eq!(parsed.trade_id, trade_id);
            if exchange == BINANCE {
                assert_eq!(trade_id, parsed.sequence.to_string());
                assert!(
                    seen.insert((exchange, parsed.symbol, trade_id)),
                    "duplicate Binance id"
                );
            } else {
                assert!(seen.insert((exchange, String::new(), trade_id)), "duplicate id");
            }
            if message.key.starts_with("BINANCE:") {
                binance_ids.insert(message.trade.clone().map(|(_, _, id)| id));
            }
        }
        assert_eq!(seen.len(), messages.len());
        // Binance ids are the per-symbol `t`, so they do repeat across symbols.
        let binance = messages.iter().filter(|m| m.key.starts_with("BINANCE:")).count();
        assert!(
            binance_ids.len() < binance,
            "{} ids for {binance} trades",
            binance_ids.len()
        );
    }

    #[test]
    fn malformed_ratio_is_respected_and_valid_sequences_stay_gap_free() {
        let messages = generate(
            GeneratorParams {
                malformed_ratio: 0.1,
                ..seeded(3)
            },
            100_000,
        );
        let malformed: Vec<_> = messages.iter().filter(|m| m.trade.is_none()).collect();
        let share = malformed.len() as f64 / messages.len() as f64;
        assert!((0.085..=0.115).contains(&share), "malformed share {share}");
        for message in &malformed {
            let result = strict_parse(&message.key, &message.payload);
            assert!(
                result.is_err(),
                "malformed message parsed: {}",
                String::from_utf8_lossy(&message.payload)
            );
        }
        // Every kind shows up: invalid UTF-8, truncation (a JSON error) and each field error.
        let errors: Vec<String> = malformed
            .iter()
            .filter_map(|m| strict_parse(&m.key, &m.payload).err())
            .collect();
        let needles = [
            "utf-8",
            "EOF",
            "price missing",
            "price is not a string",
            "not a plain decimal with <= 8 decimals: NaN",
            "not a plain decimal with <= 8 decimals: -",
            "bad side HOLD",
            "event time in the future",
        ];
        for needle in needles {
            assert!(
                errors.iter().any(|e| e.contains(needle)),
                "no malformed message fails with {needle}"
            );
        }
        assert_gap_free(&messages);
    }

    #[test]
    fn zipf_popularity_makes_a_few_symbols_dominate() {
        let messages = generate(seeded(4), 100_000);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for message in &messages {
            *counts.entry(message.key.as_str()).or_default() += 1;
        }
        let mut sorted: Vec<usize> = counts.values().copied().collect();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        let top = sorted[sorted.len() - 1];
        assert!(top > 10 * median, "top {top}, median {median}");
        // Every exchange is represented among the busiest symbols.
        let mut busiest: Vec<(&str, usize)> = counts.into_iter().collect();
        busiest.sort_unstable_by_key(|(_, count)| std::cmp::Reverse(*count));
        for exchange in ["BINANCE:", "ASX:", "COINBASE:"] {
            assert!(
                busiest[..3].iter().any(|(key, _)| key.starts_with(exchange)),
                "{busiest:?}"
            );
        }
    }

    #[test]
    fn prices_and_quantities_are_positive_with_at_most_8_decimals() {
        // strict_parse checks both; the walk is long enough for cheap coins to wander.
        let messages = generate(seeded(5), 200_000);
        for message in &messages {
            let parsed = strict_parse(&message.key, &message.payload).expect("valid trade");
            let price: f64 = parsed.price.parse().expect("price");
            assert!(price > 0.0);
        }
        let btc: Vec<f64> = messages
            .iter()
            .filter(|m| m.key == "BINANCE:BTCUSDT")
            .filter_map(|m| strict_parse(&m.key, &m.payload).ok()?.price.parse().ok())
            .collect();
        assert!(btc.len() > 1000);
        assert!(
            btc.iter().all(|p| (40_000.0..90_000.0).contains(p)),
            "BTC wandered off"
        );
        let distinct: HashSet<u64> = btc.iter().map(|p| p.to_bits()).collect();
        assert!(distinct.len() > btc.len() / 4, "prices barely move");
    }

    #[test]
    fn same_seed_gives_identical_payloads() {
        let params = |seed| GeneratorParams {
            malformed_ratio: 0.05,
            reference_ratio: 0.05,
            ..seeded(seed)
        };
        let (a, b, c) = (
            generate(params(6), 10_000),
            generate(params(6), 10_000),
            generate(params(7), 10_000),
        );
        assert!(a.iter().filter(|m| m.reference.is_some()).count() > 300);
        let payloads = |messages: &[GeneratedMessage]| -> Vec<(String, Vec<u8>)> {
            messages
                .iter()
                .map(|m| (m.key.clone(), m.payload.clone()))
                .collect()
        };
        assert!(payloads(&a) == payloads(&b));
        assert!(payloads(&a) != payloads(&c));
    }

    #[test]
    fn canonical_payload_has_the_expected_fields() {
        let only_asx = GeneratorParams {
            exchanges: vec![("ASX".to_owned(), vec!["BHP".to_owned(), "CBA".to_owned()])],
            ..seeded(8)
        };
        let mut generator = TradeGenerator::new(only_asx);
        let mut bhp_sequence = 0;
        for i in 0..100 {
            let message = generator.next_message(NOW_US);
            let value: Value = serde_json::from_slice(&message.payload).expect("json");
            let object = value.as_object().expect("object");
            let mut fields: Vec<&str> = object.keys().map(String::as_str).collect();
            fields.sort_unstable();
            assert_eq!(
                fields,
                [
                    "event_time",
                    "exchange",
                    "price",
                    "quantity",
                    "sequence",
                    "side",
                    "symbol",
                    "trade_id"
                ]
            );
            assert_eq!(value["exchange"], "ASX");
            assert_eq!(value["event_time"], "2026-11-23T10:15:30.123456Z");
            assert!(value["side"] == "buy" || value["side"] == "sell");
            let price = value["price"].as_str().expect("price is a string");
            assert_eq!(
                price.split_once('.').map(|(_, frac)| frac.len()),
                Some(2),
                "{price}"
            );
            let quantity = value["quantity"].as_str().expect("quantity is a string");
            assert!(quantity.parse::<u64>().is_ok_and(|q| q >= 1), "{quantity}");
            if value["symbol"] == "BHP" {
                bhp_sequence += 1;
                assert_eq!(value["sequence"], bhp_sequence);
                assert_eq!(value["trade_id"], format!("BHP-{bhp_sequence:09}"));
                assert_eq!(message.key, "ASX:BHP");
                assert_eq!(
                    message.trade,
                    Some((
                        "ASX".to_owned(),
                        "BHP".to_owned(),
                        format!("BHP-{bhp_sequence:09}")
                    ))
                );
            }
            assert_eq!(generator.generated(), i + 1);
        }
        assert!(bhp_sequence > 10);
        assert_eq!(generator.malformed(), 0);
    }

    #[test]
    fn binance_native_share_follows_the_ratio_and_uses_binance_fields() {
        let messages = generate(seeded(9), 50_000);
        let binance: Vec<_> = messages
            .iter()
            .filter(|m| m.key.starts_with("BINANCE:"))
            .collect();
        let native: Vec<Value> = binance
            .iter()
            .filter_map(|m| serde_json::from_slice::<Value>(&m.payload).ok())
            .filter(|v| v.get("e").is_some())
            .collect();
        let share = native.len() as f64 / binance.len() as f64;
        assert!((0.45..=0.55).contains(&share), "native share {share}");
        let sells = native.iter().filter(|v| v["m"] == true).count();
        assert!(
            sells > native.len() / 3 && sells < native.len() * 2 / 3,
            "{sells} sells"
        );
        for value in &native {
            let trade_time = value["T"].as_i64().expect("T");
            assert!(
                (NOW_US / 1000..=NOW_US / 1000 + 50).contains(&trade_time),
                "{trade_time}"
            );
            assert_eq!(value["E"], value["T"]);
            assert_eq!(value["M"], true);
        }
        // Canonical Binance trades use the same trade-id rule as native ones.
        let canonical = binance
            .iter()
            .find(|m| !m.payload.starts_with(b"{\"e\""))
            .expect("canonical");
        let parsed = strict_parse(&canonical.key, &canonical.payload).expect("valid");
        assert_eq!(parsed.trade_id, parsed.sequence.to_string());
        let none = generate(
            GeneratorParams {
                binance_native_ratio: 0.0,
                ..seeded(9)
            },
            5_000,
        );
        assert!(none.iter().all(|m| !m.payload.starts_with(b"{\"e\"")));
    }

    #[test]
    fn event_time_formatting_tracks_seconds_and_dates() {
        let mut clock = SecondCache::default();
        for us in [
            0,
            NOW_US,
            NOW_US + 999_999,
            NOW_US + 1_000_000,
            951_782_400_000_001,
            -1,
        ] {
            let mut buf = String::new();
            clock.write_rfc3339_micros(&mut buf, us).expect("write");
            let expected = chrono::DateTime::from_timestamp_micros(us)
                .expect("in range")
                .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string();
            assert_eq!(buf, expected);
        }
    }

    #[test]
    fn validate_rejects_bad_parameters_with_a_clear_error() {
        assert_eq!(GeneratorParams::default().validate(), Ok(()));
        let bad_ratio = GeneratorParams {
            malformed_ratio: 1.5,
            ..seeded(1)
        };
        assert_eq!(
            bad_ratio.validate(),
            Err(LoadgenError::Ratio {
                name: "malformed_ratio",
                value: 1.5
            })
        );
        let bad_zipf = GeneratorParams {
            zipf_exponent: f64::NAN,
            ..seeded(1)
        };
        assert!(matches!(bad_zipf.validate(), Err(LoadgenError::ZipfExponent(_))));
        for reference_ratio in [-0.1, 1.01, f64::NAN] {
            let bad_reference = GeneratorParams {
                reference_ratio,
                ..seeded(1)
            };
            assert!(
                matches!(
                    bad_reference.validate(),
                    Err(LoadgenError::Ratio {
                        name: "reference_ratio",
                        ..
                    })
                ),
                "{reference_ratio}"
            );
        }
        let empty = GeneratorParams {
            exchanges: vec![("ASX".into(), vec![])],
            ..seeded(1)
        };
        assert_eq!(empty.validate(), Err(LoadgenError::NoSymbols));
        let twice = GeneratorParams {
            exchanges: vec![("ASX".into(), vec!["BHP".into(), "BHP".into()])],
            ..seeded(1)
        };
        assert!(matches!(
            twice.validate(),
            Err(LoadgenError::DuplicateSymbol { .. })
        ));
        // The generator itself clamps instead of failing.
        let mut generator = TradeGenerator::new(GeneratorParams {
            exchanges: vec![],
            malformed_ratio: 7.0,
            ..seeded(1)
        });
        assert!(generator.next_message(NOW_US).trade.is_none());
    }

    #[test]
    fn unusual_names_are_escaped_into_valid_json() {
        let odd = GeneratorParams {
            exchanges: vec![("NY\"SE".into(), vec!["BRK\\B".into(), "A\u{1}".into()])],
            ..seeded(10)
        };
        for message in generate(odd, 100) {
            let value: Value = serde_json::from_slice(&message.payload).expect("valid json");
            assert_eq!(value["exchange"], "NY\"SE");
        }
    }

    #[test]
    fn pacer_batches_about_a_millisecond_of_the_rate() {
        assert_eq!(Pacer::new(0).batch, Pacer::UNPACED_BATCH);
        assert!(Pacer::new(0).limiter.is_none());
        assert_eq!(Pacer::new(100).batch, 1);
        assert_eq!(Pacer::new(100_000).batch, 100);
        assert_eq!(Pacer::new(u64::MAX).batch, u64::from(Pacer::MAX_BATCH));
        let pacer = Pacer::new(1_000);
        // Up to 100 ms of rate is credit (100 batches of 1 at 1,000/s): it
        // makes up for oversleeping, and beyond it the pacer holds back.
        let mut granted = 0;
        let wait = loop {
            match pacer.wait(1).expect("check") {
                None => granted += 1,
                Some(wait) => break wait,
            }
            assert!(granted < 100_000, "the pacer never held back");
        };
        assert!(granted >= 100, "only {granted} permits of credit");
        assert!(wait <= Duration::from_millis(1), "{wait:?}");
    }

    /// A reference-data update as a strict reader takes it: exactly these fields, once each.
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ReferenceJson {
        r#type: String,
        exchange: String,
        symbol: String,
        name: Option<String>,
        currency: Option<String>,
        tick_size: String,
        lot_size: String,
        status: String,
        effective_time: String,
    }

    fn strict_parse_reference(message: &GeneratedMessage) -> Result<ReferenceJson, String> {
        let parsed: ReferenceJson = serde_json::from_slice(&message.payload).map_err(|e| e.to_string())?;
        if parsed.r#type != "reference" {
            return Err(format!("type {}", parsed.r#type));
        }
        positive_decimal(&parsed.tick_size)?;
        positive_decimal(&parsed.lot_size)?;
        if parsed.status.is_empty() {
            return Err("empty status".into());
        }
        chrono::DateTime::parse_from_rfc3339(&parsed.effective_time).map_err(|e| e.to_string())?;
        let instrument = (parsed.exchange.clone(), parsed.symbol.clone());
        assert_eq!(message.reference.as_ref(), Some(&instrument));
        assert_eq!(message.key, format!("{}:{}", parsed.exchange, parsed.symbol));
        Ok(parsed)
    }

    #[test]
    fn reference_ratio_is_respected_and_trade_sequences_stay_gap_free() {
        let mut generator = TradeGenerator::new(GeneratorParams {
            reference_ratio: 0.1,
            malformed_ratio: 0.02,
            duplicate_ratio: 0.02,
            ..seeded(14)
        });
        let messages: Vec<_> = (0..100_000)
            .map(|i| generator.next_message(NOW_US + i as i64))
            .collect();
        let references: Vec<_> = messages.iter().filter(|m| m.reference.is_some()).collect();
        let share = references.len() as f64 / messages.len() as f64;
        assert!((0.095..=0.105).contains(&share), "reference share {share}");
        assert_eq!(generator.references(), references.len() as u64);
        for message in &references {
            assert!(message.trade.is_none() && !message.duplicate && !message.is_malformed());
            let parsed = strict_parse_reference(message).expect("a valid reference update");
            assert!(
                strict_parse(&message.key, &message.payload).is_err(),
                "a reference update reads as a trade: {parsed:?}"
            );
        }
        // A duplicate repeats the previous trade, never a reference update.
        let duplicates: Vec<_> = messages.iter().filter(|m| m.duplicate).collect();
        assert!(duplicates.len() > 1_000, "{} duplicates", duplicates.len());
        for message in duplicates {
            assert!(message.reference.is_none() && message.trade.is_some());
            strict_parse(&message.key, &message.payload).expect("a duplicate is a trade");
        }
        let malformed = messages.iter().filter(|m| m.is_malformed()).count() as u64;
        assert_eq!(malformed, generator.malformed());
        // Reference updates take no sequence number: the trades around them stay 1, 2, 3, ...
        let trades: Vec<_> = messages.iter().filter(|m| !m.duplicate).cloned().collect();
        assert_gap_free(&trades);
    }

    #[test]
    fn reference_payloads_carry_name_currency_tick_lot_and_status() {
        let mut generator = TradeGenerator::new(GeneratorParams {
            reference_ratio: 1.0,
            ..seeded(15)
        });
        let mut by_key: HashMap<String, ReferenceJson> = HashMap::new();
        let mut statuses: HashMap<String, usize> = HashMap::new();
        for _ in 0..20_000 {
            let message = generator.next_message(NOW_US);
            let parsed = strict_parse_reference(&message).expect("a valid reference update");
            assert_eq!(parsed.effective_time, "2026-11-23T10:15:30.123456Z");
            *statuses.entry(parsed.status.clone()).or_default() += 1;
            by_key.insert(message.key, parsed);
        }
        assert_eq!(generator.references(), 20_000);
        assert_eq!(generator.generated(), 20_000);
        let expected = [
            ("ASX:BHP", "BHP Group", "AUD", "0.01", "1"),
            ("ASX:TLS", "Telstra Group", "AUD", "0.01", "1"),
            ("BINANCE:BTCUSDT", "Bitcoin / USDT", "USDT", "0.01", "0.00001"),
            ("BINANCE:XRPUSDT", "XRP / USDT", "USDT", "0.00001", "1"),
            ("BINANCE:SHIBUSDT", "Shiba Inu / USDT", "USDT", "0.00000001", "1"),
            ("COINBASE:ETH-USD", "Ethereum / USD", "USD", "0.01", "0.001"),
        ];
        for (key, name, currency, tick, lot) in expected {
            let parsed = &by_key[key];
            assert_eq!(
                (
                    parsed.name.as_deref(),
                    parsed.currency.as_deref(),
                    parsed.tick_size.as_str(),
                    parsed.lot_size.as_str()
                ),
                (Some(name), Some(currency), tick, lot),
                "{key}"
            );
        }
        // Mostly trading, now and then a halt.
        let trading = statuses.remove("trading").unwrap_or(0);
        let halted = statuses.remove("halted").unwrap_or(0);
        assert!(statuses.is_empty(), "other statuses: {statuses:?}");
        assert!(
            trading > 15_000 && halted > 500,
            "{trading} trading, {halted} halted"
        );
    }

    #[test]
    fn reference_identity_falls_back_to_the_quote_suffix_and_the_symbol() {
        assert_eq!(
            reference_identity("ASX", "XYZ", false),
            ("XYZ".to_owned(), Some("AUD"))
        );
        assert_eq!(
            reference_identity("KRAKEN", "XBT/EUR", true),
            ("XBT/EUR".to_owned(), Some("EUR"))
        );
        assert_eq!(
            reference_identity("BINANCE", "ETHBTC", true),
            ("Ethereum / BTC".to_owned(), Some("BTC"))
        );
        assert_eq!(
            reference_identity("BINANCE", "PEPE", true),
            ("PEPE".to_owned(), Some("USDT"))
        );
        assert_eq!(reference_identity("NYSE", "IBM", false), ("IBM".to_owned(), None));
        assert_eq!(reference_identity("NYSE", "USD", false), ("USD".to_owned(), None));
        // No currency: the field is left out, as the format allows.
        let mut generator = TradeGenerator::new(GeneratorParams {
            exchanges: vec![("NYSE".into(), vec!["IBM".into()])],
            reference_ratio: 1.0,
            ..seeded(16)
        });
        let parsed = strict_parse_reference(&generator.next_message(NOW_US)).expect("valid");
        assert_eq!((parsed.name.as_deref(), parsed.currency), (Some("IBM"), None));
    }

    #[test]
    fn k2_decodes_every_generated_reference_update_as_reference_data() {
        use crate::decode::{DecoderConfig, Record, TradeDecoder};

        let decoder = TradeDecoder::new(DecoderConfig::default());
        let mut generator = TradeGenerator::new(GeneratorParams {
            reference_ratio: 0.2,
            ..seeded(17)
        });
        let mut decoded = 0;
        for offset in 0..20_000 {
            let message = generator.next_message(NOW_US);
            let Some((exchange, symbol)) = &message.reference else {
                continue;
            };
            let parsed = strict_parse_reference(&message).expect("valid");
            let record = decoder
                .decode_record(&message.payload, 1, offset, NOW_US)
                .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&message.payload)));
            let record = match record {
                Record::Reference(record) => record,
                other => panic!("not reference data: {other:?}"),
            };
            assert_eq!((&record.exchange, &record.symbol), (exchange, symbol));
            let tick: f64 = parsed.tick_size.parse().expect("tick");
            assert_eq!(
                record.tick_size,
                (tick * 1e8).round() as i128,
                "{}",
                parsed.tick_size
            );
            let lot: f64 = parsed.lot_size.parse().expect("lot");
            assert_eq!(
                record.lot_size,
                (lot * 1e8).round() as i128,
                "{}",
                parsed.lot_size
            );
            assert_eq!((record.name, record.currency), (parsed.name, parsed.currency));
            assert_eq!(record.status, parsed.status);
            assert_eq!(record.effective_time_us, NOW_US);
            assert_eq!((record.partition, record.offset), (1, offset));
            decoded += 1;
        }
        assert_eq!(decoded, generator.references());
        assert!(decoded > 3_000, "{decoded} reference updates");
    }

    // Kafka round trips against librdkafka's mock cluster.

    fn mock_cluster_with_topic(
        topic: &str,
    ) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic(topic, 4, 1).expect("create topic");
        cluster
    }

    /// Reads every message of the topic's 4 partitions until `expected` arrived or 30 s passed.
    fn consume_all(brokers: &str, topic: &str, expected: usize) -> Vec<(String, Vec<u8>)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "loadgen-test")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut assignment = TopicPartitionList::new();
        for partition in 0..4 {
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .expect("offset");
        }
        consumer.assign(&assignment).expect("assign");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut messages = Vec::new();
        while messages.len() < expected && Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => messages.push((
                    String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
                    message.payload().unwrap_or_default().to_vec(),
                )),
                Some(Err(error)) => panic!("consume error: {error}"),
                None => {}
            }
        }
        // Anything beyond `expected` would be a duplicate: give it a moment to show up.
        let settle = Instant::now() + Duration::from_millis(300);
        while Instant::now() < settle {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) {
                messages.push((String::new(), message.payload().unwrap_or_default().to_vec()));
            }
        }
        messages
    }

    #[test]
    fn preload_produces_every_message_once_to_the_mock_cluster() {
        let cluster = mock_cluster_with_topic("trades");
        let brokers = cluster.bootstrap_servers();
        let generator = GeneratorParams {
            malformed_ratio: 0.02,
            ..seeded(11)
        };
        let report = preload(&brokers, "trades", 20_000, generator, Spread::ByKey).expect("preload");
        assert_eq!(report.valid.len() as u64 + report.malformed, 20_000);
        assert!(report.malformed > 200, "{} malformed", report.malformed);
        assert!(report.bytes > 20_000 * 60);

        let consumed = consume_all(&brokers, "trades", 20_000);
        assert_eq!(consumed.len(), 20_000);
        let mut expected: HashMap<TradeKey, usize> = HashMap::new();
        for trade in &report.valid {
            *expected.entry(trade.clone()).or_default() += 1;
        }
        let mut returned: HashMap<TradeKey, usize> = HashMap::new();
        let mut malformed = 0;
        for (key, payload) in &consumed {
            match strict_parse(key, payload) {
                Ok(parsed) => {
                    *returned
                        .entry((parsed.exchange, parsed.symbol, parsed.trade_id))
                        .or_default() += 1
                }
                Err(_) => malformed += 1,
            }
        }
        assert_eq!(malformed, report.malformed);
        assert!(
            returned == expected,
            "the trades read back differ from the trades produced"
        );
    }

    #[test]
    fn preload_to_a_missing_topic_fails_with_the_topic_name() {
        let cluster = mock_cluster_with_topic("trades");
        let error = preload(
            &cluster.bootstrap_servers(),
            "no-such-topic",
            10,
            seeded(1),
            Spread::ByKey,
        )
        .expect_err("missing topic");
        assert!(format!("{error:#}").contains("no-such-topic"), "{error:#}");
    }

    #[test]
    fn a_run_starting_at_a_later_sequence_repeats_no_trade_id() {
        let ids = |first_sequence| {
            let mut generator = TradeGenerator::new(GeneratorParams {
                first_sequence,
                ..seeded(3)
            });
            (0..2_000)
                .map(|_| generator.next_message(1).trade.expect("valid"))
                .collect::<HashSet<_>>()
        };
        let earlier = ids(1);
        let later = ids(run_start_sequence(std::time::SystemTime::now()));
        assert_eq!(earlier.len(), 2_000);
        assert!(earlier.is_disjoint(&later));

        let mut generator = TradeGenerator::new(GeneratorParams {
            first_sequence: 1_000_000_001,
            binance_native_ratio: 0.0,
            ..seeded(3)
        });
        let mut first = HashMap::new();
        for _ in 0..2_000 {
            let message = generator.next_message(1);
            let parsed = strict_parse(&message.key, &message.payload).expect("valid");
            first
                .entry(message.key)
                .or_insert((parsed.sequence, parsed.trade_id));
        }
        assert_eq!(
            first["BINANCE:BTCUSDT"],
            (1_000_000_001, "1000000001".to_string())
        );
        assert_eq!(first["ASX:BHP"], (1_000_000_001, "BHP-1000000001".to_string()));
    }

    #[test]
    fn run_start_sequences_grow_with_the_clock_and_stay_in_range() {
        let at = |ms: u64| run_start_sequence(std::time::UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(0), 1);
        assert_eq!(at(1_733_000_000_000), 1_733_000_000_000_001);
        assert!(at(1_733_000_000_001) - at(1_733_000_000_000) == 1_000);
        assert_eq!(at(u64::MAX), MAX_FIRST_SEQUENCE);
        let error = GeneratorParams {
            first_sequence: 0,
            ..GeneratorParams::default()
        }
        .validate()
        .expect_err("0 is not a sequence number");
        assert!(error.to_string().contains("got 0"), "{error}");
    }

    #[test]
    fn ids_file_lines_round_trip_and_a_bad_line_names_its_field() {
        let trade = ProducedTrade {
            key: ("BINANCE".into(), "BTCUSDT".into(), "17".into()),
            priority: Priority::Critical,
            partition: 3,
            offset: 1041,
        };
        assert_eq!(trade.to_string(), "BINANCE,BTCUSDT,17,CRITICAL,3,1041");
        assert!(!trade.is_reference());
        assert_eq!(trade.to_string().parse::<ProducedTrade>(), Ok(trade));
        let error = |line: &str| line.parse::<ProducedTrade>().expect_err(line);
        assert!(error("BINANCE,BTCUSDT,17").contains("expected 6 fields"));
        assert!(error("BINANCE,BTCUSDT,17,URGENT,3,1").contains("URGENT"));
        assert!(error("BINANCE,BTCUSDT,17,LOW,x,1").contains("partition `x`"));
        assert!(error("BINANCE,BTCUSDT,17,LOW,3,-").contains("offset `-`"));
        let reference = ProducedTrade::reference("ASX".into(), "BHP".into(), 2, 377);
        assert_eq!(reference.to_string(), "ASX,BHP,reference,LOW,2,377");
        let parsed: ProducedTrade = "ASX,BHP,reference,LOW,2,377".parse().expect("a reference line");
        assert!(parsed.is_reference());
        assert_eq!(parsed, reference);
    }

    #[test]
    fn run_loadgen_stops_at_total_and_records_acknowledged_ids() {
        let cluster = mock_cluster_with_topic("trades");
        let dir = tempfile::tempdir().expect("tempdir");
        let ids_path = dir.path().join("ids.csv");
        let params = LoadgenParams {
            brokers: cluster.bootstrap_servers(),
            topic: "trades".into(),
            rate: 0,
            shape: Default::default(),
            duration: None,
            total: Some(5_000),
            ids_file: Some(ids_path.clone()),
            tiers: Default::default(),
            generator: GeneratorParams {
                malformed_ratio: 0.1,
                reference_ratio: 0.05,
                ..seeded(12)
            },
            progress: false,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let report = runtime
            .block_on(run_loadgen(params, std::future::pending()))
            .expect("loadgen");
        assert_eq!(report.produced, 5_000);
        assert_eq!(report.failed, 0);
        assert!((300..700).contains(&report.malformed), "{}", report.malformed);
        assert!((150..350).contains(&report.reference), "{}", report.reference);
        let ids = read_ids_file(&ids_path).expect("ids file");
        assert_eq!(ids.len() as u64, report.produced - report.malformed);
        let tiers = TierTable::default();
        let mut offsets = HashSet::new();
        for trade in &ids {
            let (exchange, symbol, trade_id) = &trade.key;
            assert!(
                ["BINANCE", "ASX", "COINBASE"].contains(&exchange.as_str()),
                "{trade}"
            );
            if trade_id == ProducedTrade::REFERENCE_ID {
                assert!(trade.is_reference(), "{trade}");
            } else {
                assert_eq!(trade.priority, tiers.trade_priority(exchange, symbol), "{trade}");
            }
            assert!(
                offsets.insert((trade.partition, trade.offset)),
                "offset twice: {trade}"
            );
        }
        let references = ids.iter().filter(|t| t.is_reference()).count() as u64;
        assert_eq!(references, report.reference);
        // The default tiers make BTCUSDT CRITICAL and leave the tail of the universe NORMAL;
        // reference data is LOW.
        for priority in Priority::ALL {
            assert!(ids.iter().any(|t| t.priority == priority), "no {priority} trade");
        }
        assert_eq!(
            consume_all(&cluster.bootstrap_servers(), "trades", 5_000).len(),
            5_000
        );
    }

    #[test]
    fn run_loadgen_respects_the_rate_and_stops_on_shutdown() {
        let cluster = mock_cluster_with_topic("trades");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let params = LoadgenParams {
            brokers: cluster.bootstrap_servers(),
            topic: "trades".into(),
            rate: 5_000,
            shape: Default::default(),
            duration: None,
            total: None,
            ids_file: None,
            tiers: Default::default(),
            generator: seeded(13),
            progress: false,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let task = runtime.spawn(run_loadgen(params, async move {
            let _ = stop_rx.await;
        }));
        // Wait (with a deadline) until 2,500 messages are in the topic, then shut down.
        let watcher: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .create()
            .expect("consumer");
        let started = Instant::now();
        let in_topic = || -> i64 {
            (0..4)
                .filter_map(|p| watcher.fetch_watermarks("trades", p, Duration::from_secs(5)).ok())
                .map(|(_, high)| high)
                .sum()
        };
        while in_topic() < 2_500 {
            assert!(started.elapsed() < Duration::from_secs(30), "loadgen too slow");
            std::thread::yield_now();
        }
        let reached = started.elapsed();
        let _ = stop_tx.send(());
        let report = runtime.block_on(task).expect("join").expect("loadgen");
        // 2,500 messages at 5,000/s take about half a second: unpaced would take milliseconds.
        assert!(
            reached >= Duration::from_millis(400),
            "2,500 messages after {reached:?}"
        );
        assert!(
            report.produced >= 2_500 && report.produced < 2_500 + 5_000,
            "{report:?}"
        );
        assert_eq!(report.failed, 0);
    }

    #[test]
    fn duplicates_repeat_the_previous_valid_trade_and_gaps_skip_numbers_only_after_a_first_trade() {
        let params = GeneratorParams {
            duplicate_ratio: 0.05,
            gap_ratio: 0.02,
            malformed_ratio: 0.01,
            ..seeded(5)
        };
        let mut generator = TradeGenerator::new(params);
        let messages: Vec<_> = (0..20_000)
            .map(|i| generator.next_message(NOW_US + i as i64))
            .collect();
        let (duplicates, gaps) = (generator.duplicates(), generator.gaps());
        assert!((800..1_200).contains(&duplicates), "{duplicates}");
        assert!((250..500).contains(&gaps), "{gaps}");
        let mut last_valid: Option<&GeneratedMessage> = None;
        let mut last_sequence: HashMap<String, i64> = HashMap::new();
        let mut skipped = 0;
        for message in &messages {
            if message.duplicate {
                let last = last_valid.expect("a duplicate follows a valid trade");
                assert_eq!((&message.key, &message.payload), (&last.key, &last.payload));
                continue;
            }
            if message.trade.is_none() {
                continue;
            }
            let parsed = strict_parse(&message.key, &message.payload).expect("valid trade");
            match last_sequence.insert(message.key.clone(), parsed.sequence) {
                None => assert_eq!(
                    parsed.sequence, 1,
                    "the first trade of {} skips nothing",
                    message.key
                ),
                Some(previous) => skipped += parsed.sequence - previous - 1,
            }
            last_valid = Some(message);
        }
        assert_eq!(
            skipped as u64, gaps,
            "every skipped number is counted, and only those"
        );
        assert_eq!(messages.iter().filter(|m| m.duplicate).count() as u64, duplicates);
    }

    #[test]
    fn a_ramp_climbs_linearly_then_holds_and_bursts_come_on_their_period() {
        let secs = Duration::from_secs_f64;
        let ramp = RateShape {
            ramp: Some(Ramp {
                to: 300_000,
                over: secs(120.0),
            }),
            burst: None,
        };
        assert_eq!(ramp.rate_at(1_000, secs(0.0)), 1_000);
        assert_eq!(ramp.rate_at(1_000, secs(60.0)), 150_500);
        assert_eq!(ramp.rate_at(1_000, secs(120.0)), 300_000);
        assert_eq!(ramp.rate_at(1_000, secs(500.0)), 300_000);
        let down = RateShape {
            ramp: Some(Ramp {
                to: 100,
                over: secs(10.0),
            }),
            burst: None,
        };
        assert_eq!(down.rate_at(1_100, secs(5.0)), 600);
        let bursts = RateShape {
            ramp: None,
            burst: Some(Burst {
                rate: 50_000,
                lasting: secs(2.0),
                every: secs(10.0),
            }),
        };
        let at = |t: f64| bursts.rate_at(5_000, secs(t));
        assert_eq!(
            [at(0.0), at(1.0), at(9.9)],
            [5_000; 3],
            "no burst before the first period"
        );
        assert_eq!([at(10.0), at(11.9), at(30.5)], [50_000; 3]);
        assert_eq!([at(12.0), at(19.0), at(32.0)], [5_000; 3]);
        assert!(RateShape::default().is_flat());
        assert_eq!(RateShape::default().rate_at(7, secs(3.0)), 7);
    }

    #[test]
    fn a_shape_that_cannot_run_is_refused_with_the_flag_to_fix() {
        let secs = Duration::from_secs_f64;
        let ramp = |to, over| RateShape {
            ramp: Some(Ramp { to, over: secs(over) }),
            burst: None,
        };
        let burst = |rate, lasting, every| RateShape {
            ramp: None,
            burst: Some(Burst {
                rate,
                lasting: secs(lasting),
                every: secs(every),
            }),
        };
        for (shape, base, says) in [
            (ramp(10, 5.0), 0, "base --rate above 0"),
            (ramp(0, 5.0), 10, "--ramp-to must be above 0"),
            (ramp(10, 0.0), 10, "--ramp-secs must be above 0"),
            (burst(0, 1.0, 5.0), 10, "--burst-rate must be above 0"),
            (burst(10, 5.0, 5.0), 10, "below --burst-every"),
            (burst(10, 0.0, 5.0), 10, "--burst-secs (0 s) must be above 0"),
        ] {
            let err = shape.validate(base).unwrap_err().to_string();
            assert!(err.contains(says), "{shape:?}: {err:?}");
        }
        assert!(ramp(10, 5.0).validate(1).is_ok());
        assert!(RateShape::default().validate(0).is_ok(), "unpaced and flat");
        assert_eq!(
            GeneratorParams {
                gap_ratio: 1.5,
                ..seeded(1)
            }
            .validate(),
            Err(LoadgenError::Ratio {
                name: "gap_ratio",
                value: 1.5
            })
        );
    }
}
