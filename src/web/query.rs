//! Hybrid queries (`crate::query`): trades committed and not yet committed,
//! each once, in event-time order.
//!
//! - `GET /v1/trades?exchange=&symbol=&from=&to=&limit=` (RFC 3339 times,
//!   `from` inclusive, `to` exclusive): the first `limit` trades from `from`.
//! - `GET /v1/trades/recent?exchange=&symbol=&minutes=15&limit=`: the last
//!   `limit` trades of the last `minutes`.
//! - `GET /v1/ohlcv?exchange=&symbol=&interval=1m|5m|1h|1d&from=&to=`: bars
//!   with open, high, low, close, volume, VWAP and trade count.
//! - `POST /v1/query {"sql": "..."}`: read-only SQL over `market.trades`,
//!   `market.reference`, `k2.*` and `live`.
//!
//! JSON by default, CSV or Arrow IPC by `Accept`. A bad parameter is a 400
//! that names it; a query past `query.timeout_ms` is a 504, past
//! `query.memory_limit_bytes` a 422; an answer cut at its row limit says
//! `truncated` (header `X-K2-Truncated` for CSV and Arrow). Every answer's
//! `Server-Timing` header gives the milliseconds K2 spent copying live rows,
//! loading tables, executing and encoding it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use arrow_array::builder::{Decimal128Builder, Int64Builder, TimestampMicrosecondBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use serde::Deserialize;

use super::{AppState, error};
use crate::metrics as m;
use crate::query::output::{self, Format};
use crate::query::trades::{self, Bar, BarInterval, Keep, TradeFilter};
use crate::query::{QueryAnswer, QueryError, Timings};

const DEFAULT_LIMIT: usize = 1_000;
const MAX_MINUTES: u64 = 7 * 24 * 60;
const MAX_NAME_CHARS: usize = 64;

fn status_of(err: &QueryError) -> StatusCode {
    match err {
        QueryError::BadRequest(_) | QueryError::NotAQuery(_) => StatusCode::BAD_REQUEST,
        QueryError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        QueryError::TooMuchMemory(_) => StatusCode::UNPROCESSABLE_ENTITY,
        QueryError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        QueryError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Counts a query by endpoint and outcome and times it.
fn observe<T>(
    endpoint: &'static str,
    started: std::time::Instant,
    result: &Result<T, QueryError>,
    truncated: impl Fn(&T) -> bool,
) {
    let outcome = match result {
        Ok(answer) if truncated(answer) => "truncated",
        Ok(_) => "ok",
        Err(QueryError::BadRequest(_) | QueryError::NotAQuery(_)) => "bad_request",
        Err(QueryError::Timeout(_)) => "timeout",
        Err(QueryError::TooMuchMemory(_)) => "memory",
        Err(QueryError::Unavailable(_)) => "unavailable",
        Err(QueryError::Failed(_)) => "failed",
    };
    metrics::counter!(m::QUERIES, "endpoint" => endpoint, "outcome" => outcome).increment(1);
    metrics::histogram!(m::QUERY_DURATION, "endpoint" => endpoint).record(started.elapsed().as_secs_f64());
}

fn failure(err: QueryError) -> HttpResponse {
    error(status_of(&err), err.to_string())
}

fn bad(message: String) -> HttpResponse {
    error(StatusCode::BAD_REQUEST, message)
}

/// The format the request accepts, or the 406 that names what it asked for.
fn format_of(request: &HttpRequest) -> Result<Format, Box<HttpResponse>> {
    let accept = request
        .headers()
        .get(actix_web::http::header::ACCEPT)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    Format::from_accept(accept).map_err(|m| Box::new(error(StatusCode::NOT_ACCEPTABLE, m)))
}

fn respond(answer: &QueryAnswer, format: Format) -> HttpResponse {
    let encoding = std::time::Instant::now();
    match output::encode(answer, format) {
        Ok(body) => {
            let mut response = HttpResponse::Ok();
            response
                .content_type(format.content_type())
                .insert_header(("X-K2-Row-Count", answer.rows.to_string()))
                .insert_header(("X-K2-Truncated", answer.truncated.to_string()))
                .insert_header(("X-K2-Live-Rows", answer.live_rows.to_string()))
                .insert_header((
                    "Server-Timing",
                    server_timing(&answer.timings, encoding.elapsed()),
                ));
            if let Some(snapshot) = answer.snapshot_id {
                response.insert_header(("X-K2-Snapshot-Id", snapshot.to_string()));
            }
            response.body(body)
        }
        Err(err) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("failed to encode the answer: {err}"),
        ),
    }
}

/// The query's phases as a `Server-Timing` header (W3C Server Timing):
/// milliseconds copying live rows, loading tables, executing and encoding.
fn server_timing(timings: &Timings, encode: Duration) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "live;dur={:.2}, load;dur={:.2}, execute;dur={:.2}, encode;dur={:.2}",
        ms(timings.live),
        ms(timings.load),
        ms(timings.execute),
        ms(encode)
    )
}

/// Query-string parameters, each parsed with an error that names it.
struct Params(HashMap<String, String>);

impl Params {
    fn parse(request: &HttpRequest, allowed: &[&str]) -> Result<Self, String> {
        let pairs = web::Query::<Vec<(String, String)>>::from_query(request.query_string())
            .map_err(|e| format!("bad query string: {e}"))?;
        let mut params = HashMap::new();
        for (key, value) in pairs.into_inner() {
            if !allowed.contains(&key.as_str()) {
                return Err(format!(
                    "unknown parameter `{key}` (expected one of: {})",
                    allowed.join(", ")
                ));
            }
            if params.insert(key.clone(), value).is_some() {
                return Err(format!("parameter `{key}` is given twice"));
            }
        }
        Ok(Self(params))
    }

    fn name(&self, key: &str) -> Result<Option<String>, String> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) if v.is_empty() || v.chars().count() > MAX_NAME_CHARS => {
                Err(format!("`{key}` must be 1 to {MAX_NAME_CHARS} characters"))
            }
            Some(v) => Ok(Some(v.clone())),
        }
    }

    fn time(&self, key: &str) -> Result<Option<i64>, String> {
        self.0
            .get(key)
            .map(|v| {
                chrono::DateTime::parse_from_rfc3339(v)
                    .map(|t| t.timestamp_micros())
                    .map_err(|e| {
                        format!("`{key}` must be an RFC 3339 time such as 2026-12-04T10:00:00Z: {e}")
                    })
            })
            .transpose()
    }

    fn number(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>, String> {
        self.0
            .get(key)
            .map(|v| match v.parse::<u64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(format!(
                    "`{key}` must be a whole number from {min} to {max}, not {v:?}"
                )),
            })
            .transpose()
    }

    /// `limit`: 1 to `max`, default 1,000 (or `max` if lower).
    fn limit(&self, max: usize) -> Result<usize, String> {
        Ok(self
            .number("limit", 1, max as u64)?
            .map_or(DEFAULT_LIMIT.min(max), |n| n as usize))
    }

    fn filter(&self) -> Result<TradeFilter, String> {
        let filter = TradeFilter {
            exchange: self.name("exchange")?,
            symbol: self.name("symbol")?,
            from_us: self.time("from")?,
            to_us: self.time("to")?,
        };
        if let (Some(from), Some(to)) = (filter.from_us, filter.to_us)
            && from >= to
        {
            return Err("`from` must be before `to`".into());
        }
        Ok(filter)
    }
}

pub async fn get_trades(state: web::Data<AppState>, request: HttpRequest) -> HttpResponse {
    let max = state.query.limits().max_rows;
    let parsed = Params::parse(&request, &["exchange", "symbol", "from", "to", "limit"])
        .and_then(|p| Ok((p.filter()?, p.limit(max)?)));
    trades_answer(&state, &request, parsed, Keep::Oldest, "trades").await
}

pub async fn get_recent(state: web::Data<AppState>, request: HttpRequest) -> HttpResponse {
    let max = state.query.limits().max_rows;
    let parsed = Params::parse(&request, &["exchange", "symbol", "minutes", "limit"]).and_then(|p| {
        let minutes = p.number("minutes", 1, MAX_MINUTES)?.unwrap_or(15);
        let limit = p.limit(max)?;
        let filter = TradeFilter {
            exchange: p.name("exchange")?,
            symbol: p.name("symbol")?,
            from_us: Some(crate::model::now_us() - minutes as i64 * 60_000_000),
            to_us: None,
        };
        Ok((filter, limit))
    });
    trades_answer(&state, &request, parsed, Keep::Newest, "recent").await
}

/// The trades of `/v1/trades` and `/v1/trades/recent`, once their
/// parameters are parsed (or the 400 that names the bad one).
async fn trades_answer(
    state: &AppState,
    request: &HttpRequest,
    parsed: Result<(TradeFilter, usize), String>,
    keep: Keep,
    endpoint: &'static str,
) -> HttpResponse {
    let (filter, limit) = match parsed {
        Ok(parsed) => parsed,
        Err(message) => return bad(message),
    };
    let format = match format_of(request) {
        Ok(format) => format,
        Err(response) => return *response,
    };
    let started = std::time::Instant::now();
    let answer = trades::trades(&state.query, filter, limit, keep).await;
    observe(endpoint, started, &answer, |a| a.truncated);
    match answer {
        Ok(answer) => respond(&answer, format),
        Err(err) => failure(err),
    }
}

pub async fn get_ohlcv(state: web::Data<AppState>, request: HttpRequest) -> HttpResponse {
    let parsed = Params::parse(&request, &["exchange", "symbol", "interval", "from", "to"]).and_then(|p| {
        let interval =
            p.0.get("interval")
                .ok_or("`interval` is required (1m, 5m, 1h or 1d)")?;
        let interval = BarInterval::parse(interval).map_err(|e| e.to_string())?;
        Ok((p.filter()?, interval))
    });
    let (filter, interval) = match parsed {
        Ok(parsed) => parsed,
        Err(message) => return bad(message),
    };
    let format = match format_of(&request) {
        Ok(format) => format,
        Err(response) => return *response,
    };
    let started = std::time::Instant::now();
    let found = trades::ohlcv(&state.query, filter, interval).await;
    observe("ohlcv", started, &found, |(_, a)| a.truncated);
    let (bars, answer) = match found {
        Ok(found) => found,
        Err(err) => return failure(err),
    };
    match bars_batch(&bars) {
        Ok(batch) => respond(
            &QueryAnswer {
                schema: batch.schema(),
                batches: vec![batch],
                ..answer
            },
            format,
        ),
        Err(err) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("failed to build the bars: {err}"),
        ),
    }
}

/// Bars as a batch: start time, the five decimals at scale 8, the count.
fn bars_batch(bars: &[Bar]) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let decimal = |pick: fn(&Bar) -> i128| -> Result<ArrayRef, arrow_schema::ArrowError> {
        let mut builder = Decimal128Builder::with_capacity(bars.len());
        for bar in bars {
            builder.append_value(pick(bar));
        }
        Ok(Arc::new(builder.finish().with_precision_and_scale(38, 8)?))
    };
    let mut start = TimestampMicrosecondBuilder::with_capacity(bars.len()).with_timezone("+00:00");
    let mut count = Int64Builder::with_capacity(bars.len());
    for bar in bars {
        start.append_value(bar.start_us);
        count.append_value(bar.trades);
    }
    RecordBatch::try_from_iter([
        ("start", Arc::new(start.finish()) as ArrayRef),
        ("open", decimal(|b| b.open)?),
        ("high", decimal(|b| b.high)?),
        ("low", decimal(|b| b.low)?),
        ("close", decimal(|b| b.close)?),
        ("volume", decimal(|b| b.volume)?),
        ("vwap", decimal(|b| b.vwap)?),
        ("trades", Arc::new(count.finish()) as ArrayRef),
    ])
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlBody {
    sql: String,
}

pub async fn post_query(state: web::Data<AppState>, request: HttpRequest, body: web::Bytes) -> HttpResponse {
    let body: SqlBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(err) => return bad(format!("the body must be {{\"sql\": \"SELECT ...\"}}: {err}")),
    };
    let format = match format_of(&request) {
        Ok(format) => format,
        Err(response) => return *response,
    };
    let started = std::time::Instant::now();
    let answer = state.query.sql(&body.sql).await;
    observe("sql", started, &answer, |a| a.truncated);
    match answer {
        Ok(answer) => respond(&answer, format),
        Err(err) => failure(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_timing_names_each_phase_in_milliseconds() {
        let timings = Timings {
            live: Duration::from_micros(1_500),
            load: Duration::ZERO,
            execute: Duration::from_millis(42),
        };
        assert_eq!(
            server_timing(&timings, Duration::from_micros(250)),
            "live;dur=1.50, load;dur=0.00, execute;dur=42.00, encode;dur=0.25"
        );
    }
}
