//! Reading K2's tables back: for verdicts, tests and tools that check what a
//! table holds.

use std::collections::HashSet;

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use futures::TryStreamExt;
use iceberg::table::Table;

use crate::model::{SequenceEventRow, TradeKey};
use crate::shedding::{LedgerAction, ShedEntry};

/// Trade keys read back from `market.trades`.
#[derive(Debug, Default)]
pub struct TradeKeys {
    /// (exchange, symbol, trade_id) of every row, in scan order.
    pub keys: Vec<TradeKey>,
    /// (kafka_partition, kafka_offset) of every row.
    pub positions: Vec<(i32, i64)>,
}

/// Scans the current snapshot of the trades table for its keys.
pub async fn scan_trade_keys(table: &Table) -> iceberg::Result<TradeKeys> {
    let mut out = TradeKeys::default();
    if table.metadata().current_snapshot().is_none() {
        return Ok(out);
    }
    let stream = table
        .scan()
        .select([
            "exchange",
            "symbol",
            "trade_id",
            "kafka_partition",
            "kafka_offset",
        ])
        .build()?
        .to_arrow()
        .await?;
    let batches: Vec<_> = stream.try_collect().await?;
    for batch in batches {
        let exchange = batch.column(0).as_string::<i32>();
        let symbol = batch.column(1).as_string::<i32>();
        let trade_id = batch.column(2).as_string::<i32>();
        let partition = batch.column(3).as_primitive::<arrow_array::types::Int32Type>();
        let offset = batch.column(4).as_primitive::<Int64Type>();
        for row in 0..batch.num_rows() {
            out.keys.push((
                exchange.value(row).to_string(),
                symbol.value(row).to_string(),
                trade_id.value(row).to_string(),
            ));
            out.positions.push((partition.value(row), offset.value(row)));
        }
    }
    Ok(out)
}

/// Counts the rows of a table's current snapshot from its manifests' summary.
pub fn committed_record_count(table: &Table) -> u64 {
    table
        .metadata()
        .current_snapshot()
        .and_then(|s| s.summary().additional_properties.get("total-records").cloned())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One row of `k2.dead_letters`, without its raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRow {
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
}

/// Scans the current snapshot of the dead-letter table.
pub async fn scan_dead_letters(table: &Table) -> iceberg::Result<Vec<DeadLetterRow>> {
    if table.metadata().current_snapshot().is_none() {
        return Ok(Vec::new());
    }
    let stream = table
        .scan()
        .select(["partition", "offset", "reason"])
        .build()?
        .to_arrow()
        .await?;
    let batches: Vec<_> = stream.try_collect().await?;
    let mut rows = Vec::new();
    for batch in batches {
        let partition = batch.column(0).as_primitive::<arrow_array::types::Int32Type>();
        let offset = batch.column(1).as_primitive::<Int64Type>();
        let reason = batch.column(2).as_string::<i32>();
        for row in 0..batch.num_rows() {
            rows.push(DeadLetterRow {
                partition: partition.value(row),
                offset: offset.value(row),
                reason: reason.value(row).to_string(),
            });
        }
    }
    Ok(rows)
}

/// Scans the current snapshot of `market.reference` for the (kafka_partition, kafka_offset) of
/// every row, in scan order: a reference row's identity, so two rows at one position are a
/// duplicate.
pub async fn scan_reference_positions(table: &Table) -> iceberg::Result<Vec<(i32, i64)>> {
    if table.metadata().current_snapshot().is_none() {
        return Ok(Vec::new());
    }
    let stream = table
        .scan()
        .select(["kafka_partition", "kafka_offset"])
        .build()?
        .to_arrow()
        .await?;
    let batches: Vec<_> = stream.try_collect().await?;
    let mut positions = Vec::new();
    for batch in batches {
        let partition = batch.column(0).as_primitive::<arrow_array::types::Int32Type>();
        let offset = batch.column(1).as_primitive::<Int64Type>();
        positions.extend((0..batch.num_rows()).map(|row| (partition.value(row), offset.value(row))));
    }
    Ok(positions)
}

/// Scans the current snapshot of `k2.sequence_gaps` for rows matching `filter`.
pub async fn scan_sequence_events(
    table: &Table,
    filter: iceberg::expr::Predicate,
) -> iceberg::Result<Vec<SequenceEventRow>> {
    use arrow_array::Array;
    use arrow_array::types::{Int32Type, TimestampMicrosecondType};

    if table.metadata().current_snapshot().is_none() {
        return Ok(Vec::new());
    }
    let batches: Vec<arrow_array::RecordBatch> = table
        .scan()
        .with_filter(filter)
        .select_all()
        .build()?
        .to_arrow()
        .await?
        .try_collect()
        .await?;
    let mut rows = Vec::new();
    for batch in batches {
        let text = |name: &str| column(&batch, name).map(|c| c.as_string::<i32>().clone());
        let long = |name: &str| column(&batch, name).map(|c| c.as_primitive::<Int64Type>().clone());
        let (kind, exchange, symbol, topic) =
            (text("kind")?, text("exchange")?, text("symbol")?, text("topic")?);
        let (expected, received, missing) = (long("expected")?, long("received")?, long("missing")?);
        let (previous, offset, reported) = (long("previous")?, long("offset")?, long("reported_offset")?);
        let partition = column(&batch, "partition")?.as_primitive::<Int32Type>().clone();
        let detected = column(&batch, "detected_at")?
            .as_primitive::<TimestampMicrosecondType>()
            .clone();
        let optional =
            |array: &arrow_array::Int64Array, row: usize| (!array.is_null(row)).then(|| array.value(row));
        for row in 0..batch.num_rows() {
            rows.push(SequenceEventRow {
                kind: if kind.value(row) == "reset" {
                    "reset"
                } else {
                    "gap"
                },
                exchange: exchange.value(row).to_string(),
                symbol: symbol.value(row).to_string(),
                expected: optional(&expected, row),
                received: received.value(row),
                missing: optional(&missing, row),
                previous: optional(&previous, row),
                topic: topic.value(row).to_string(),
                partition: partition.value(row),
                offset: offset.value(row),
                reported_offset: reported.value(row),
                detected_at_us: detected.value(row),
            });
        }
    }
    Ok(rows)
}

/// Which of `wanted` the trades table's rows matching `filter` hold.
/// Streams the scan, so memory follows `wanted`, not the table.
pub async fn find_trade_keys(
    table: &Table,
    filter: iceberg::expr::Predicate,
    wanted: &HashSet<TradeKey>,
) -> iceberg::Result<HashSet<TradeKey>> {
    let mut found = HashSet::new();
    if wanted.is_empty() || table.metadata().current_snapshot().is_none() {
        return Ok(found);
    }
    // Most rows are not wanted: their trade id alone says so, without
    // building an owned key for each.
    let wanted_ids: HashSet<&str> = wanted.iter().map(|(_, _, id)| id.as_str()).collect();
    let mut stream = table
        .scan()
        .with_filter(filter)
        .select(["exchange", "symbol", "trade_id"])
        .build()?
        .to_arrow()
        .await?;
    while let Some(batch) = stream.try_next().await? {
        let exchange = column(&batch, "exchange")?.as_string::<i32>();
        let symbol = column(&batch, "symbol")?.as_string::<i32>();
        let trade_id = column(&batch, "trade_id")?.as_string::<i32>();
        for row in 0..batch.num_rows() {
            if !wanted_ids.contains(trade_id.value(row)) {
                continue;
            }
            let key = (
                exchange.value(row).to_string(),
                symbol.value(row).to_string(),
                trade_id.value(row).to_string(),
            );
            if wanted.contains(&key) {
                found.insert(key);
            }
        }
    }
    Ok(found)
}

/// Scans every row of `k2.shed_ledger` (both actions, repeated entry ids
/// included: see `backfill::open_entries` for what is still to do).
pub async fn scan_shed_ledger(table: &Table) -> iceberg::Result<Vec<ShedEntry>> {
    use arrow_array::Array;
    use arrow_array::types::{Int32Type, TimestampMicrosecondType};

    if table.metadata().current_snapshot().is_none() {
        return Ok(Vec::new());
    }
    let mut stream = table
        .scan()
        .select([
            "entry_id",
            "action",
            "topic",
            "partition",
            "offsets",
            "records",
            "priority",
            "level",
            "detail",
            "recorded_at",
        ])
        .build()?
        .to_arrow()
        .await?;
    let mut rows = Vec::new();
    while let Some(batch) = stream.try_next().await? {
        let text = |name: &str| column(&batch, name).map(|c| c.as_string::<i32>().clone());
        let (entry_id, action, topic) = (text("entry_id")?, text("action")?, text("topic")?);
        let (offsets, priority, level, detail) = (
            text("offsets")?,
            text("priority")?,
            text("level")?,
            text("detail")?,
        );
        let partition = column(&batch, "partition")?.as_primitive::<Int32Type>().clone();
        let records = column(&batch, "records")?.as_primitive::<Int64Type>().clone();
        let recorded_at = column(&batch, "recorded_at")?
            .as_primitive::<TimestampMicrosecondType>()
            .clone();
        for row in 0..batch.num_rows() {
            let id = entry_id.value(row);
            let invalid = |column: &str, reason: String| {
                iceberg::Error::new(
                    iceberg::ErrorKind::DataInvalid,
                    format!("k2.shed_ledger entry `{id}`: column `{column}`: {reason}"),
                )
            };
            let records = records.value(row);
            rows.push(ShedEntry {
                entry_id: id.to_string(),
                action: action
                    .value(row)
                    .parse::<LedgerAction>()
                    .map_err(|e| invalid("action", e))?,
                topic: topic.value(row).to_string(),
                partition: partition.value(row),
                offsets: offsets.value(row).parse().map_err(|e| invalid("offsets", e))?,
                records: u64::try_from(records)
                    .map_err(|_| invalid("records", format!("negative count {records}")))?,
                priority: priority.value(row).parse().map_err(|e| invalid("priority", e))?,
                level: level
                    .value(row)
                    .parse()
                    .map_err(|e: crate::degradation::UnknownLevel| invalid("level", e.to_string()))?,
                detail: (!detail.is_null(row)).then(|| detail.value(row).to_string()),
                recorded_at_us: recorded_at.value(row),
            });
        }
    }
    Ok(rows)
}

fn column<'a>(batch: &'a arrow_array::RecordBatch, name: &str) -> iceberg::Result<&'a arrow_array::ArrayRef> {
    batch.column_by_name(name).ok_or_else(|| {
        iceberg::Error::new(
            iceberg::ErrorKind::DataInvalid,
            format!("column `{name}` missing from the scan"),
        )
    })
}
