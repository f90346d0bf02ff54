//! The trade queries behind `/v1/trades`, `/v1/trades/recent` and
//! `/v1/ohlcv`: the same filter over `market.trades` and `live`, unioned, in
//! event-time order. OHLCV bars keep prices exact: K2 sums the decimals in
//! 128-bit integers as the trades stream by (`Bars`), and VWAP is one exact
//! division of sum(price × quantity) by sum(quantity), rounded half to even
//! at the table's 8 decimal places.

use arrow_array::{Array, Decimal128Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::DataType;
use datafusion::prelude::{DataFrame, Expr, col, lit};
use datafusion::scalar::ScalarValue;

use super::{Cut, QueryAnswer, QueryEngine, QueryError};
use crate::model::DECIMAL_SCALE;

/// Which trades: every field optional; times are microseconds since the
/// epoch, `from` inclusive and `to` exclusive.
#[derive(Debug, Clone, Default)]
pub struct TradeFilter {
    pub exchange: Option<String>,
    pub symbol: Option<String>,
    pub from_us: Option<i64>,
    pub to_us: Option<i64>,
}

impl TradeFilter {
    fn expr(&self) -> Option<Expr> {
        let timestamp = |us: i64| lit(ScalarValue::TimestampMicrosecond(Some(us), Some("+00:00".into())));
        [
            self.exchange
                .as_ref()
                .map(|e| col("exchange").eq(lit(e.as_str()))),
            self.symbol.as_ref().map(|s| col("symbol").eq(lit(s.as_str()))),
            self.from_us.map(|us| col("event_time").gt_eq(timestamp(us))),
            self.to_us.map(|us| col("event_time").lt(timestamp(us))),
        ]
        .into_iter()
        .flatten()
        .reduce(Expr::and)
    }

    /// The matching trades of the table's snapshot and of the live rows.
    async fn frame(&self, cut: &Cut) -> Result<DataFrame, QueryError> {
        let mut table = cut.ctx.table("market.trades").await?;
        let mut live = cut.ctx.table("live").await?;
        if let Some(filter) = self.expr() {
            table = table.filter(filter.clone())?;
            live = live.filter(filter)?;
        }
        Ok(table.union(live)?)
    }
}

/// Which end of the range a limited answer keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The first trades from `from` on (`/v1/trades`).
    Oldest,
    /// The last trades before `to` (`/v1/trades/recent`).
    Newest,
}

/// Trades in event-time order (ties by partition and offset), at most `limit`.
pub async fn trades(
    engine: &QueryEngine,
    filter: TradeFilter,
    limit: usize,
    keep: Keep,
) -> Result<QueryAnswer, QueryError> {
    let answer = engine
        .run(false, limit, move |cut| async move {
            // Newest first for Keep::Newest, so that the row limit cuts the
            // oldest; turned around below.
            let ascending = keep == Keep::Oldest;
            let order = vec![
                col("event_time").sort(ascending, false),
                col("kafka_partition").sort(ascending, false),
                col("kafka_offset").sort(ascending, false),
            ];
            Ok((filter.frame(&cut).await?.sort(order)?, cut))
        })
        .await?;
    match keep {
        Keep::Oldest => Ok(answer),
        Keep::Newest => reversed(answer),
    }
}

/// The answer's rows in the opposite order.
fn reversed(mut answer: QueryAnswer) -> Result<QueryAnswer, QueryError> {
    let failed = |e: arrow_schema::ArrowError| QueryError::Failed(format!("failed to order the rows: {e}"));
    let rows = arrow_select::concat::concat_batches(&answer.schema, &answer.batches).map_err(failed)?;
    let backwards = arrow_array::UInt32Array::from_iter_values((0..rows.num_rows() as u32).rev());
    answer.batches = vec![arrow_select::take::take_record_batch(&rows, &backwards).map_err(failed)?];
    Ok(answer)
}

/// OHLCV bar widths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarInterval {
    M1,
    M5,
    H1,
    D1,
}

impl BarInterval {
    pub fn parse(text: &str) -> Result<Self, QueryError> {
        match text {
            "1m" => Ok(Self::M1),
            "5m" => Ok(Self::M5),
            "1h" => Ok(Self::H1),
            "1d" => Ok(Self::D1),
            other => Err(QueryError::BadRequest(format!(
                "`interval` must be 1m, 5m, 1h or 1d, not {other:?}"
            ))),
        }
    }

    pub fn micros(self) -> i64 {
        const MINUTE: i64 = 60_000_000;
        match self {
            Self::M1 => MINUTE,
            Self::M5 => 5 * MINUTE,
            Self::H1 => 60 * MINUTE,
            Self::D1 => 24 * 60 * MINUTE,
        }
    }
}

/// One bar. Prices, volume and VWAP are decimals times 10^8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bar {
    /// Start of the bar, microseconds since the epoch (UTC).
    pub start_us: i64,
    pub open: i128,
    pub high: i128,
    pub low: i128,
    pub close: i128,
    pub volume: i128,
    pub vwap: i128,
    pub trades: i64,
}

/// Bars of the filter's trades, oldest first, at most `query.max_rows`.
/// Open and close are the first and last trade by (event time, sequence,
/// trade id). The trades stream through one pass that keeps a bar per
/// bucket ([`Bars`]): no sort, and no more memory than the bars.
pub async fn ohlcv(
    engine: &QueryEngine,
    filter: TradeFilter,
    interval: BarInterval,
) -> Result<(Vec<Bar>, QueryAnswer), QueryError> {
    let bars = Bars::new(interval.micros(), engine.limits().max_rows);
    let (bars, mut answer) = engine
        .fold(
            move |cut| async move {
                let columns = ["event_time", "sequence", "trade_id", "price", "quantity"];
                Ok((filter.frame(&cut).await?.select_columns(&columns)?, cut))
            },
            bars,
            Bars::add,
        )
        .await?;
    answer.truncated = bars.cut_from.is_some();
    let bars = bars.finish()?;
    answer.rows = bars.len();
    Ok((bars, answer))
}

/// Where a trade falls in a bar's order: event time, sequence, trade id.
#[derive(Debug)]
struct Tick {
    event_time_us: i64,
    sequence: i64,
    trade_id: compact_str::CompactString,
    price: i128,
}

impl Tick {
    /// Whether this trade comes after the one at (`event_time_us`,
    /// `sequence`, `trade_id`) in a bar's order.
    fn follows(&self, event_time_us: i64, sequence: i64, trade_id: &str) -> bool {
        (event_time_us, sequence, trade_id) < (self.event_time_us, self.sequence, self.trade_id.as_str())
    }
}

/// One bar being built: exact sums in 128 bits (prices and quantities at
/// scale 8, their products at scale 16).
#[derive(Debug)]
struct OpenBar {
    open: Tick,
    close: Tick,
    high: i128,
    low: i128,
    volume: i128,
    notional: i128,
    trades: i64,
}

/// The bars of a stream of trades, by bucket start, at most `max_bars`:
/// past that, the latest buckets are dropped and no trade at or after the
/// first dropped one counts, so the bars kept are exact.
#[derive(Debug)]
struct Bars {
    width_us: i64,
    max_bars: usize,
    bars: std::collections::BTreeMap<i64, OpenBar>,
    /// The first bucket dropped past `max_bars`, if any.
    cut_from: Option<i64>,
}

impl Bars {
    fn new(width_us: i64, max_bars: usize) -> Self {
        Self {
            width_us,
            max_bars,
            bars: std::collections::BTreeMap::new(),
            cut_from: None,
        }
    }

    fn add(&mut self, batch: &RecordBatch) -> Result<(), QueryError> {
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| QueryError::Failed(format!("OHLCV input has no `{name}` column")))
        };
        let unexpected =
            |name: &str| QueryError::Failed(format!("OHLCV input column `{name}` has an unexpected type"));
        let times = column("event_time")?
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .ok_or_else(|| unexpected("event_time"))?;
        let sequences = column("sequence")?
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| unexpected("sequence"))?;
        let ids = arrow_cast::cast(column("trade_id")?, &DataType::Utf8)
            .map_err(|e| QueryError::Failed(format!("OHLCV input column `trade_id`: {e}")))?;
        let ids = ids
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| unexpected("trade_id"))?;
        let decimals = |name: &str| {
            column(name)?
                .as_any()
                .downcast_ref::<Decimal128Array>()
                .filter(|d| d.scale() == DECIMAL_SCALE)
                .ok_or_else(|| unexpected(name))
        };
        let (prices, quantities) = (decimals("price")?, decimals("quantity")?);
        let nulls = [
            times.null_count(),
            sequences.null_count(),
            ids.null_count(),
            prices.null_count(),
            quantities.null_count(),
        ];
        if nulls.into_iter().any(|n| n > 0) {
            return Err(QueryError::Failed(
                "OHLCV input has nulls in required columns".into(),
            ));
        }
        let overflow = || QueryError::Failed("a bar's sums overflow a 128-bit decimal".into());
        for row in 0..batch.num_rows() {
            let time = times.value(row);
            let bucket = time.div_euclid(self.width_us) * self.width_us;
            if self.cut_from.is_some_and(|cut| bucket >= cut) {
                continue;
            }
            let (sequence, id) = (sequences.value(row), ids.value(row));
            let (price, quantity) = (prices.value(row), quantities.value(row));
            let notional = price.checked_mul(quantity).ok_or_else(overflow)?;
            let tick = || Tick {
                event_time_us: time,
                sequence,
                trade_id: id.into(),
                price,
            };
            match self.bars.entry(bucket) {
                std::collections::btree_map::Entry::Vacant(entry) => {
                    entry.insert(OpenBar {
                        open: tick(),
                        close: tick(),
                        high: price,
                        low: price,
                        volume: quantity,
                        notional,
                        trades: 1,
                    });
                }
                std::collections::btree_map::Entry::Occupied(mut entry) => {
                    let bar = entry.get_mut();
                    if bar.open.follows(time, sequence, id) {
                        bar.open = tick();
                    } else if !bar.close.follows(time, sequence, id) {
                        bar.close = tick();
                    }
                    bar.high = bar.high.max(price);
                    bar.low = bar.low.min(price);
                    bar.volume = bar.volume.checked_add(quantity).ok_or_else(overflow)?;
                    bar.notional = bar.notional.checked_add(notional).ok_or_else(overflow)?;
                    bar.trades += 1;
                }
            }
            if self.bars.len() > self.max_bars
                && let Some((dropped, _)) = self.bars.pop_last()
            {
                self.cut_from = Some(self.cut_from.map_or(dropped, |cut| cut.min(dropped)));
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<Vec<Bar>, QueryError> {
        self.bars
            .into_iter()
            .map(|(start_us, bar)| {
                Ok(Bar {
                    start_us,
                    open: bar.open.price,
                    high: bar.high,
                    low: bar.low,
                    close: bar.close.price,
                    volume: bar.volume,
                    vwap: vwap(bar.notional, bar.volume)
                        .ok_or_else(|| QueryError::Failed("a bar with zero volume".into()))?,
                    trades: bar.trades,
                })
            })
            .collect()
    }
}

/// sum(price × quantity) at scale 16 over sum(quantity) at scale 8: the
/// VWAP at scale 8, rounded half to even. None if the volume is zero.
pub fn vwap(notional: i128, volume: i128) -> Option<i128> {
    if volume == 0 {
        return None;
    }
    let (quotient, remainder) = (notional / volume, notional % volume);
    let twice = remainder.unsigned_abs() * 2;
    let divisor = volume.unsigned_abs();
    let away = twice > divisor || (twice == divisor && quotient % 2 != 0);
    let sign = if (notional < 0) != (volume < 0) { -1 } else { 1 };
    Some(if away { quotient + sign } else { quotient })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn vwap_rounds_half_to_even_at_eight_places() {
        // 1.5 (scale 16) / 1 (scale 8) = 1.5e-8 → rounds to 2e-8 (odd 1 goes up).
        assert_eq!(vwap(150_000_000, 100_000_000), Some(2));
        // 2.5e-8 → 2e-8 (even stays).
        assert_eq!(vwap(250_000_000, 100_000_000), Some(2));
        // 2.6e-8 → 3e-8.
        assert_eq!(vwap(260_000_000, 100_000_000), Some(3));
        // price 100 × qty 2 + price 101 × qty 1 = 301 over 3 = 100.33333333...
        let notional = (100 * 2 + 101) * 10i128.pow(16);
        assert_eq!(vwap(notional, 3 * 10i128.pow(8)), Some(10_033_333_333));
        assert_eq!(vwap(1, 0), None);
    }

    fn trades(rows: &[(i64, i64, &str, i128, i128)]) -> RecordBatch {
        let decimals = |values: Vec<i128>| {
            Arc::new(
                Decimal128Array::from(values)
                    .with_precision_and_scale(38, DECIMAL_SCALE)
                    .unwrap(),
            ) as arrow_array::ArrayRef
        };
        RecordBatch::try_from_iter([
            (
                "event_time",
                Arc::new(
                    TimestampMicrosecondArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())
                        .with_timezone("+00:00"),
                ) as _,
            ),
            (
                "sequence",
                Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())) as _,
            ),
            (
                "trade_id",
                Arc::new(StringArray::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())) as _,
            ),
            ("price", decimals(rows.iter().map(|r| r.3).collect())),
            ("quantity", decimals(rows.iter().map(|r| r.4).collect())),
        ])
        .unwrap()
    }

    #[test]
    fn bars_take_open_and_close_by_time_sequence_and_id_whatever_the_order_rows_come_in() {
        const M: i64 = 60_000_000;
        // Bucket 0: opens at (10, 1, "b") (ties on time and sequence go to the
        // smaller id), closes at (50, 2, "a"); bucket 1 has one trade.
        let rows = [
            (50, 1, "x", 103, 1),
            (10, 1, "c", 999, 1),
            (M + 5, 9, "z", 7, 3),
            (50, 2, "a", 104, 2),
            (10, 1, "b", 100, 1),
            (30, 0, "q", 90, 4),
        ];
        let mut bars = Bars::new(M, 10);
        bars.add(&trades(&rows[..3])).unwrap();
        bars.add(&trades(&rows[3..])).unwrap();
        let bars = bars.finish().unwrap();
        assert_eq!(bars.len(), 2);
        let first = &bars[0];
        assert_eq!((first.start_us, first.open, first.close), (0, 100, 104));
        assert_eq!((first.high, first.low, first.trades), (999, 90, 5));
        assert_eq!(first.volume, 1 + 1 + 2 + 1 + 4);
        assert_eq!(first.vwap, vwap(103 + 999 + 208 + 100 + 360, 9).unwrap());
        assert_eq!(
            (bars[1].start_us, bars[1].open, bars[1].close, bars[1].trades),
            (M, 7, 7, 1)
        );
    }

    #[test]
    fn bars_past_the_limit_drop_the_latest_buckets_whole() {
        const M: i64 = 60_000_000;
        // Four buckets, newest first, then more trades of every bucket: with
        // room for two bars, the two oldest are exact and nothing else counts.
        let mut rows: Vec<(i64, i64, &str, i128, i128)> =
            (0..4).rev().map(|b| (b * M, 0, "a", 10, 1)).collect();
        rows.extend((0..4).map(|b| (b * M + 1, 1, "b", 20, 1)));
        let mut bars = Bars::new(M, 2);
        bars.add(&trades(&rows)).unwrap();
        assert!(bars.cut_from.is_some());
        let bars = bars.finish().unwrap();
        let starts: Vec<i64> = bars.iter().map(|b| b.start_us).collect();
        assert_eq!(starts, vec![0, M]);
        assert!(
            bars.iter()
                .all(|b| b.trades == 2 && b.open == 10 && b.close == 20)
        );
    }

    #[test]
    fn intervals_are_the_four_the_api_names() {
        assert_eq!(BarInterval::parse("5m").unwrap().micros(), 300_000_000);
        assert!(matches!(BarInterval::parse("2m"), Err(QueryError::BadRequest(m)) if m.contains("interval")));
    }
}
