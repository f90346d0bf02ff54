//! `GET /v1/sequence/gaps?exchange=&symbol=&since=&limit=`: sequence gaps
//! and resets from `k2.sequence_gaps` (every K2 process's, as committed),
//! oldest first; `limit` keeps the newest.

use actix_web::{HttpResponse, web};
use iceberg::expr::{Predicate, Reference};
use iceberg::spec::Datum;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::AppState;
use crate::model::SequenceEventRow;
use crate::storage::reader::scan_sequence_events;

const DEFAULT_LIMIT: usize = 1_000;
const MAX_LIMIT: usize = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GapQuery {
    exchange: Option<String>,
    symbol: Option<String>,
    /// RFC 3339, e.g. `2026-11-23T10:00:00Z`: events detected at or after it.
    since: Option<String>,
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
struct GapEvent {
    kind: &'static str,
    exchange: String,
    symbol: String,
    expected: Option<i64>,
    received: i64,
    missing: Option<i64>,
    previous: Option<i64>,
    topic: String,
    partition: i32,
    offset: i64,
    detected_at: String,
}

impl From<SequenceEventRow> for GapEvent {
    fn from(row: SequenceEventRow) -> Self {
        Self {
            kind: row.kind,
            exchange: row.exchange,
            symbol: row.symbol,
            expected: row.expected,
            received: row.received,
            missing: row.missing,
            previous: row.previous,
            topic: row.topic,
            partition: row.partition,
            offset: row.offset,
            detected_at: chrono::DateTime::from_timestamp_micros(row.detected_at_us)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
                .unwrap_or_default(),
        }
    }
}

fn bad_request(message: String) -> HttpResponse {
    HttpResponse::BadRequest().json(json!({ "error": message }))
}

pub async fn get_gaps(state: web::Data<AppState>, query: web::Query<GapQuery>) -> HttpResponse {
    let query = query.into_inner();
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return bad_request(format!("`limit` must be between 1 and {MAX_LIMIT}"));
    }
    let mut filter = Predicate::AlwaysTrue;
    if let Some(exchange) = &query.exchange {
        filter = filter.and(Reference::new("exchange").equal_to(Datum::string(exchange)));
    }
    if let Some(symbol) = &query.symbol {
        filter = filter.and(Reference::new("symbol").equal_to(Datum::string(symbol)));
    }
    if let Some(since) = &query.since {
        match chrono::DateTime::parse_from_rfc3339(since) {
            Ok(at) => {
                filter = filter.and(
                    Reference::new("detected_at")
                        .greater_than_or_equal_to(Datum::timestamptz_micros(at.timestamp_micros())),
                );
            }
            Err(err) => {
                return bad_request(format!(
                    "`since` must be an RFC 3339 timestamp such as 2026-11-23T10:00:00Z ({err})"
                ));
            }
        }
    }
    let rows = match state.catalog.load_table(&state.tables.sequence_gaps).await {
        Ok(table) => scan_sequence_events(&table, filter).await,
        Err(err) => Err(err),
    };
    match rows {
        Ok(mut rows) => {
            rows.sort_by_key(|r| (r.detected_at_us, r.partition, r.offset));
            let total = rows.len();
            let events: Vec<GapEvent> = rows
                .split_off(total.saturating_sub(limit))
                .into_iter()
                .map(GapEvent::from)
                .collect();
            HttpResponse::Ok().json(json!({
                "count": events.len(),
                "truncated": total > events.len(),
                "events": events,
            }))
        }
        Err(err) => HttpResponse::ServiceUnavailable()
            .json(json!({ "error": format!("cannot read {}: {err}", state.tables.sequence_gaps) })),
    }
}
