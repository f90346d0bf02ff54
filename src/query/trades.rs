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

/// Trades in event-time order (ties by partition and offset), at most `limit`
/// (itself at most `query.max_rows`).
pub async fn trades(
    engine: &QueryEngine,
    filter: TradeFilter,
    limit: usize,
    keep: Keep,
) -> Result<QueryAnswer, QueryError> {
    let first = FirstRows::new(limit.min(engine.limits().max_rows), keep);
    let ((batches, truncated), mut answer) = engine
        .fold(
            move |cut| async move { Ok((filter.frame(&cut).await?, cut)) },
            first,
            FirstRows::add,
            FirstRows::finish,
        )
        .await?;
    answer.rows = batches.iter().map(RecordBatch::num_rows).sum();
    answer.batches = batches;
    answer.truncated = truncated;
    Ok(answer)
}

/// The first `limit` rows of a stream by event time, partition and offset
/// (the last `limit` for [`Keep::Newest`]), and whether there were more,
/// holding at most about twice `limit` rows: past that, the rows held are
/// sorted and cut back to `limit` + 1. Most answers are smaller than their
/// limit and are sorted once, at the end (DataFusion's sort with a limit kept
/// every row in a heap of its own encoding and spent a sixth of a recent
/// query's CPU doing it).
struct FirstRows {
    limit: usize,
    newest: bool,
    held: Vec<RecordBatch>,
    rows: usize,
}

/// Rows held before the first cut, however small the limit.
const FIRST_ROWS_MIN_HELD: usize = 8_192;

impl FirstRows {
    fn new(limit: usize, keep: Keep) -> Self {
        Self {
            limit,
            newest: keep == Keep::Newest,
            held: Vec::new(),
            rows: 0,
        }
    }

    fn add(&mut self, batch: &RecordBatch) -> Result<(), QueryError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.held.push(batch.clone());
        self.rows += batch.num_rows();
        if self.rows > self.limit.saturating_mul(2).max(FIRST_ROWS_MIN_HELD) {
            // One more than the limit: enough to tell there were more.
            let (rows, order) = self.order(self.limit.saturating_add(1))?;
            let kept = take(&rows, &order)?;
            self.rows = kept.num_rows();
            self.held = vec![kept];
        }
        Ok(())
    }

    /// The rows held in one batch, and the first `n` of them in order
    /// (newest first for `Keep::Newest`).
    fn order(&self, n: usize) -> Result<(RecordBatch, arrow_array::UInt32Array), QueryError> {
        let rows =
            arrow_select::concat::concat_batches(&self.held[0].schema(), &self.held).map_err(order_failed)?;
        let options = arrow_schema::SortOptions {
            descending: self.newest,
            nulls_first: false,
        };
        let columns = ["event_time", "kafka_partition", "kafka_offset"]
            .into_iter()
            .map(|name| {
                let values = rows
                    .column_by_name(name)
                    .ok_or_else(|| QueryError::Failed(format!("trades without a `{name}` column")))?;
                Ok(arrow_ord::sort::SortColumn {
                    values: values.clone(),
                    options: Some(options),
                })
            })
            .collect::<Result<Vec<_>, QueryError>>()?;
        let order = arrow_ord::sort::lexsort_to_indices(&columns, Some(n)).map_err(order_failed)?;
        Ok((rows, order))
    }

    /// The rows kept, in event-time order (one batch, none if no row came),
    /// and whether more than the limit matched.
    fn finish(self) -> Result<(Vec<RecordBatch>, bool), QueryError> {
        if self.held.is_empty() {
            return Ok((Vec::new(), false));
        }
        let (rows, order) = self.order(self.limit.saturating_add(1))?;
        let truncated = order.len() > self.limit;
        let mut order: Vec<u32> = order.values()[..order.len().min(self.limit)].to_vec();
        if self.newest {
            // Newest first, so that the limit cut the oldest; turned around.
            order.reverse();
        }
        Ok((vec![take(&rows, &order.into())?], truncated))
    }
}

fn order_failed(err: arrow_schema::ArrowError) -> QueryError {
    QueryError::Failed(format!("failed to order the rows: {err}"))
}

fn take(rows: &RecordBatch, order: &arrow_array::UInt32Array) -> Result<RecordBatch, QueryError> {
    arrow_select::take::take_record_batch(rows, order).map_err(order_failed)
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
    let ((bars, truncated), mut answer) = engine
        .fold(
            move |cut| async move {
                let columns = ["event_time", "sequence", "trade_id", "price", "quantity"];
                Ok((filter.frame(&cut).await?.select_columns(&columns)?, cut))
            },
            bars,
            Bars::add,
            |bars| {
                let truncated = bars.cut_from.is_some();
                Ok((bars.finish()?, truncated))
            },
        )
        .await?;
    answer.truncated = truncated;
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

    /// Rows of (event time, partition, offset), in batches of `per_batch`.
    fn keyed(rows: &[(i64, i32, i64)], per_batch: usize) -> Vec<RecordBatch> {
        rows.chunks(per_batch)
            .map(|chunk| {
                RecordBatch::try_from_iter([
                    (
                        "event_time",
                        Arc::new(Int64Array::from_iter_values(chunk.iter().map(|r| r.0))) as _,
                    ),
                    (
                        "kafka_partition",
                        Arc::new(arrow_array::Int32Array::from_iter_values(
                            chunk.iter().map(|r| r.1),
                        )) as _,
                    ),
                    (
                        "kafka_offset",
                        Arc::new(Int64Array::from_iter_values(chunk.iter().map(|r| r.2))) as _,
                    ),
                ])
                .unwrap()
            })
            .collect()
    }

    fn keys_of(batches: &[RecordBatch]) -> Vec<(i64, i32, i64)> {
        let mut keys = Vec::new();
        for batch in batches {
            let column = |i: usize| batch.column(i).clone();
            let (times, partitions, offsets) = (column(0), column(1), column(2));
            let times = times.as_any().downcast_ref::<Int64Array>().unwrap();
            let partitions = partitions
                .as_any()
                .downcast_ref::<arrow_array::Int32Array>()
                .unwrap();
            let offsets = offsets.as_any().downcast_ref::<Int64Array>().unwrap();
            keys.extend(
                (0..batch.num_rows()).map(|r| (times.value(r), partitions.value(r), offsets.value(r))),
            );
        }
        keys
    }

    fn first_rows(batches: &[RecordBatch], limit: usize, keep: Keep) -> (Vec<(i64, i32, i64)>, bool) {
        let mut first = FirstRows::new(limit, keep);
        for batch in batches {
            first.add(batch).unwrap();
            assert!(
                first.rows <= (2 * limit).max(FIRST_ROWS_MIN_HELD),
                "held {} rows for a limit of {limit}",
                first.rows
            );
        }
        let (batches, truncated) = first.finish().unwrap();
        (keys_of(&batches), truncated)
    }

    #[test]
    fn first_rows_are_the_oldest_or_newest_in_event_time_order_however_many_come() {
        // Times repeat (ties go by partition, then offset), rows come in no
        // order, and enough of them that small limits cut the rows held.
        let mut rows: Vec<(i64, i32, i64)> = (0..30_000i64)
            .map(|i| ((i * 7_919) % 5_003, (i % 4) as i32, i))
            .collect();
        let mut sorted = rows.clone();
        sorted.sort_unstable();
        rows.rotate_left(11_111);
        let batches = keyed(&rows, 977);
        for limit in [0, 1, 10, 5_000, 29_999, 30_000, 100_000] {
            let expected_oldest: Vec<_> = sorted.iter().take(limit).copied().collect();
            let expected_newest: Vec<_> = sorted[sorted.len() - limit.min(sorted.len())..].to_vec();
            let truncated = limit < rows.len();
            assert_eq!(
                first_rows(&batches, limit, Keep::Oldest),
                (expected_oldest, truncated),
                "oldest, limit {limit}"
            );
            assert_eq!(
                first_rows(&batches, limit, Keep::Newest),
                (expected_newest, truncated),
                "newest, limit {limit}"
            );
        }
        assert_eq!(first_rows(&[], 10, Keep::Newest), (Vec::new(), false));
    }

    #[test]
    fn intervals_are_the_four_the_api_names() {
        assert_eq!(BarInterval::parse("5m").unwrap().micros(), 300_000_000);
        assert!(matches!(BarInterval::parse("2m"), Err(QueryError::BadRequest(m)) if m.contains("interval")));
    }
}
