//! The trade queries behind `/v1/trades`, `/v1/trades/recent` and
//! `/v1/ohlcv`: the same filter over `market.trades` and `live`, unioned, in
//! event-time order. OHLCV bars keep prices exact: DataFusion sums decimals,
//! and VWAP is one exact division of sum(price × quantity) by sum(quantity),
//! rounded half to even at the table's 8 decimal places.

use arrow_array::{Array, Decimal128Array, Int64Array};
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
/// trade id).
pub async fn ohlcv(
    engine: &QueryEngine,
    filter: TradeFilter,
    interval: BarInterval,
) -> Result<(Vec<Bar>, QueryAnswer), QueryError> {
    let width = interval.micros();
    let answer = engine
        .run(false, engine.limits().max_rows, move |cut| async move {
            let input = filter.frame(&cut).await?;
            cut.ctx.register_table("ohlcv_input", input.into_view())?;
            let order = "ORDER BY event_time, sequence, trade_id";
            let frame = cut
                .ctx
                .sql(&format!(
                    "SELECT (CAST(event_time AS BIGINT) / {width}) * {width} AS bucket_us, \
                     first_value(price {order}) AS open, max(price) AS high, min(price) AS low, \
                     last_value(price {order}) AS close, \
                     CAST(sum(quantity) AS DECIMAL(38, 8)) AS volume, \
                     CAST(sum(price * quantity) AS DECIMAL(38, 16)) AS notional, \
                     count(*) AS trades \
                     FROM ohlcv_input GROUP BY 1 ORDER BY 1"
                ))
                .await?;
            Ok((frame, cut))
        })
        .await?;
    let mut bars = Vec::with_capacity(answer.rows);
    for batch in &answer.batches {
        let int = |i: usize| batch.column(i).as_any().downcast_ref::<Int64Array>();
        let dec = |i: usize| batch.column(i).as_any().downcast_ref::<Decimal128Array>();
        let (
            Some(bucket),
            Some(open),
            Some(high),
            Some(low),
            Some(close),
            Some(volume),
            Some(notional),
            Some(count),
        ) = (int(0), dec(1), dec(2), dec(3), dec(4), dec(5), dec(6), int(7))
        else {
            return Err(QueryError::Failed(format!(
                "unexpected OHLCV column types: {:?}",
                batch.schema()
            )));
        };
        for row in 0..batch.num_rows() {
            let volume = volume.value(row);
            bars.push(Bar {
                start_us: bucket.value(row),
                open: open.value(row),
                high: high.value(row),
                low: low.value(row),
                close: close.value(row),
                volume,
                vwap: vwap(notional.value(row), volume)
                    .ok_or_else(|| QueryError::Failed("a bar with zero volume".into()))?,
                trades: count.value(row),
            });
        }
    }
    Ok((bars, answer))
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

/// A decimal times 10^8 as text with all 8 places, e.g. `42.50000000`.
pub fn decimal_text(value: i128) -> String {
    let scale = 10i128.pow(DECIMAL_SCALE as u32);
    let sign = if value < 0 { "-" } else { "" };
    let value = value.unsigned_abs();
    let scale = scale.unsigned_abs();
    format!(
        "{sign}{}.{:0width$}",
        value / scale,
        value % scale,
        width = DECIMAL_SCALE as usize
    )
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn decimals_print_with_all_their_places() {
        assert_eq!(decimal_text(4_250_000_000), "42.50000000");
        assert_eq!(decimal_text(1), "0.00000001");
        assert_eq!(decimal_text(-150_000_000), "-1.50000000");
    }

    #[test]
    fn intervals_are_the_four_the_api_names() {
        assert_eq!(BarInterval::parse("5m").unwrap().micros(), 300_000_000);
        assert!(matches!(BarInterval::parse("2m"), Err(QueryError::BadRequest(m)) if m.contains("interval")));
    }
}
