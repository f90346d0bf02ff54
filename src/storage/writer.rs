//! Arrow batch building and Parquet data-file writing for K2's tables.
//!
//! Builders append records column by column (no per-record allocation beyond
//! Arrow's buffers); [`TableWriter`] turns a batch into Iceberg data files,
//! split by the table's partition spec, ZSTD-compressed, under a unique file
//! prefix per call so concurrent writers never collide.

use std::sync::Arc;

use arrow_array::builder::{
    Decimal128Builder, Int32Builder, Int64Builder, LargeBinaryBuilder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow_array::{
    Array as _, ArrayRef, BooleanArray, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow_schema::SchemaRef;
use iceberg::arrow::{RecordBatchPartitionSplitter, schema_to_arrow_schema};
use iceberg::spec::{
    DataFile, DataFileFormat, Literal, PartitionKey, PartitionSpec, SchemaRef as IcebergSchemaRef, Struct,
    Transform,
};
use iceberg::table::Table;
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::file_writer::location_generator::{DefaultFileNameGenerator, DefaultLocationGenerator};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::partitioning::PartitioningWriter;
use iceberg::writer::partitioning::fanout_writer::FanoutWriter;
use iceberg::writer::{IcebergWriter, IcebergWriterBuilder};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::model::{
    DECIMAL_PRECISION, DECIMAL_SCALE, DeadLetter, ProbableDuplicate, ReferenceRecord, SequenceEventRow, Trade,
};
use crate::shedding::ShedEntry;

const UTC: &str = "+00:00";

fn decimal_builder(capacity: usize) -> Decimal128Builder {
    Decimal128Builder::with_capacity(capacity)
        .with_precision_and_scale(DECIMAL_PRECISION, DECIMAL_SCALE)
        .expect("decimal(18,8) is a valid Arrow decimal")
}

fn timestamp_builder(capacity: usize) -> TimestampMicrosecondBuilder {
    TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone(UTC)
}

/// Accumulates trades as Arrow columns in the `market.trades` layout.
pub struct TradeBatchBuilder {
    exchange: StringBuilder,
    symbol: StringBuilder,
    sequence: Int64Builder,
    trade_id: StringBuilder,
    price: Decimal128Builder,
    quantity: Decimal128Builder,
    side: StringBuilder,
    event_time: TimestampMicrosecondBuilder,
    ingest_time: TimestampMicrosecondBuilder,
    kafka_partition: Int32Builder,
    kafka_offset: Int64Builder,
    rows: usize,
    estimated_bytes: u64,
}

/// Fixed-width bytes per trade row: 2×i64 + 2×i128 + 2×ts + i32 + i64 + 4 string offsets.
const TRADE_FIXED_BYTES: u64 = 8 + 16 + 16 + 8 + 8 + 4 + 8 + 4 * 4;

impl TradeBatchBuilder {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            exchange: StringBuilder::with_capacity(capacity, capacity * 8),
            symbol: StringBuilder::with_capacity(capacity, capacity * 8),
            sequence: Int64Builder::with_capacity(capacity),
            trade_id: StringBuilder::with_capacity(capacity, capacity * 16),
            price: decimal_builder(capacity),
            quantity: decimal_builder(capacity),
            side: StringBuilder::with_capacity(capacity, capacity * 4),
            event_time: timestamp_builder(capacity),
            ingest_time: timestamp_builder(capacity),
            kafka_partition: Int32Builder::with_capacity(capacity),
            kafka_offset: Int64Builder::with_capacity(capacity),
            rows: 0,
            estimated_bytes: 0,
        }
    }

    pub fn push(&mut self, trade: &Trade) {
        self.exchange.append_value(&trade.exchange);
        self.symbol.append_value(&trade.symbol);
        self.sequence.append_value(trade.sequence);
        self.trade_id.append_value(&trade.trade_id);
        self.price.append_value(trade.price);
        self.quantity.append_value(trade.quantity);
        self.side.append_value(trade.side.as_str());
        self.event_time.append_value(trade.event_time_us);
        self.ingest_time.append_value(trade.ingest_time_us);
        self.kafka_partition.append_value(trade.partition);
        self.kafka_offset.append_value(trade.offset);
        self.rows += 1;
        self.estimated_bytes +=
            TRADE_FIXED_BYTES + (trade.exchange.len() + trade.symbol.len() + trade.trade_id.len() + 4) as u64;
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Bytes the buffered rows occupy in memory (an estimate from field sizes).
    pub fn estimated_bytes(&self) -> u64 {
        self.estimated_bytes
    }

    /// Builds the batch and resets the builder. `schema` must be the table's
    /// Arrow schema (it carries the Iceberg field ids).
    pub fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, arrow_schema::ArrowError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.exchange.finish()),
            Arc::new(self.symbol.finish()),
            Arc::new(self.sequence.finish()),
            Arc::new(self.trade_id.finish()),
            Arc::new(self.price.finish()),
            Arc::new(self.quantity.finish()),
            Arc::new(self.side.finish()),
            Arc::new(self.event_time.finish()),
            Arc::new(self.ingest_time.finish()),
            Arc::new(self.kafka_partition.finish()),
            Arc::new(self.kafka_offset.finish()),
        ];
        self.rows = 0;
        self.estimated_bytes = 0;
        RecordBatch::try_new(schema.clone(), columns)
    }
}

impl TradeBatchBuilder {
    /// The buffered rows as a batch, leaving the builder as it is (a copy:
    /// live queries read a lane's buffer while it keeps filling).
    pub fn snapshot(&self, schema: &SchemaRef) -> Result<RecordBatch, arrow_schema::ArrowError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.exchange.finish_cloned()),
            Arc::new(self.symbol.finish_cloned()),
            Arc::new(self.sequence.finish_cloned()),
            Arc::new(self.trade_id.finish_cloned()),
            Arc::new(self.price.finish_cloned()),
            Arc::new(self.quantity.finish_cloned()),
            Arc::new(self.side.finish_cloned()),
            Arc::new(self.event_time.finish_cloned()),
            Arc::new(self.ingest_time.finish_cloned()),
            Arc::new(self.kafka_partition.finish_cloned()),
            Arc::new(self.kafka_offset.finish_cloned()),
        ];
        RecordBatch::try_new(schema.clone(), columns)
    }
}

/// Rows of one chunk of a [`TradeBuffer`].
pub const TRADE_BUFFER_CHUNK_ROWS: usize = 2_048;

/// A lane's trades as Arrow columns, in chunks of [`TRADE_BUFFER_CHUNK_ROWS`]
/// rows, each sized for its rows when it starts. A single builder grows by
/// doubling: each step allocates twice the rows, copies them and frees the
/// old buffers, so a batch touched about twice its final memory and copied
/// it once (with `k2 bench`'s 1M trades, faulting in those fresh pages was a
/// tenth of `k2 run`'s CPU). Chunks never grow or move, are all the same
/// size (the allocator reuses what committed batches freed), and a flush
/// hands them to the writer as they are.
pub struct TradeBuffer {
    full: Vec<TradeBatchBuilder>,
    /// The estimated bytes of the chunks in `full`.
    full_bytes: u64,
    current: TradeBatchBuilder,
}

impl Default for TradeBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl TradeBuffer {
    pub fn new() -> Self {
        Self {
            full: Vec::new(),
            full_bytes: 0,
            current: TradeBatchBuilder::with_capacity(TRADE_BUFFER_CHUNK_ROWS),
        }
    }

    pub fn push(&mut self, trade: &Trade) {
        if self.current.len() == TRADE_BUFFER_CHUNK_ROWS {
            self.full_bytes += self.current.estimated_bytes();
            let next = TradeBatchBuilder::with_capacity(TRADE_BUFFER_CHUNK_ROWS);
            self.full.push(std::mem::replace(&mut self.current, next));
        }
        self.current.push(trade);
    }

    pub fn len(&self) -> usize {
        self.full.len() * TRADE_BUFFER_CHUNK_ROWS + self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.full.is_empty() && self.current.is_empty()
    }

    /// Bytes the buffered rows occupy in memory (an estimate from field sizes).
    pub fn estimated_bytes(&self) -> u64 {
        self.full_bytes + self.current.estimated_bytes()
    }

    /// The buffered rows as batches, one per chunk, in the order they came;
    /// the buffer starts over empty. `schema` must be the table's Arrow schema.
    pub fn finish(&mut self, schema: &SchemaRef) -> Result<Vec<RecordBatch>, arrow_schema::ArrowError> {
        let mut batches = Vec::with_capacity(self.full.len() + 1);
        for mut chunk in self.full.drain(..) {
            batches.push(chunk.finish(schema)?);
        }
        if !self.current.is_empty() {
            batches.push(self.current.finish(schema)?);
        }
        self.current = TradeBatchBuilder::with_capacity(TRADE_BUFFER_CHUNK_ROWS);
        self.full_bytes = 0;
        Ok(batches)
    }

    /// The buffered rows as batches, leaving the buffer as it is (copies:
    /// live queries read a lane's buffer while it keeps filling).
    pub fn snapshot(&self, schema: &SchemaRef) -> Result<Vec<RecordBatch>, arrow_schema::ArrowError> {
        self.full
            .iter()
            .chain(Some(&self.current).filter(|c| !c.is_empty()))
            .map(|chunk| chunk.snapshot(schema))
            .collect()
    }
}

/// Builds a `k2.dead_letters` batch.
pub fn dead_letter_batch(
    dead_letters: &[DeadLetter],
    schema: &SchemaRef,
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let n = dead_letters.len();
    let mut topic = StringBuilder::with_capacity(n, n * 16);
    let mut partition = Int32Builder::with_capacity(n);
    let mut offset = Int64Builder::with_capacity(n);
    let mut raw = LargeBinaryBuilder::with_capacity(n, n * 128);
    let mut reason = StringBuilder::with_capacity(n, n * 48);
    let mut at = timestamp_builder(n);
    for dl in dead_letters {
        topic.append_value(&dl.topic);
        partition.append_value(dl.partition);
        offset.append_value(dl.offset);
        raw.append_value(&dl.raw);
        reason.append_value(&dl.reason);
        at.append_value(dl.dead_lettered_at_us);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(topic.finish()),
        Arc::new(partition.finish()),
        Arc::new(offset.finish()),
        Arc::new(raw.finish()),
        Arc::new(reason.finish()),
        Arc::new(at.finish()),
    ];
    RecordBatch::try_new(schema.clone(), columns)
}

fn timestamps(values: impl Iterator<Item = i64>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from_iter_values(values).with_timezone(UTC))
}

/// Builds a `market.reference` batch.
pub fn reference_batch(
    rows: &[ReferenceRecord],
    schema: &SchemaRef,
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let mut tick_size = decimal_builder(rows.len());
    let mut lot_size = decimal_builder(rows.len());
    for row in rows {
        tick_size.append_value(row.tick_size);
        lot_size.append_value(row.lot_size);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.exchange))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.symbol))),
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.name.as_deref()))),
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.currency.as_deref()))),
        Arc::new(tick_size.finish()),
        Arc::new(lot_size.finish()),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.status))),
        timestamps(rows.iter().map(|r| r.effective_time_us)),
        timestamps(rows.iter().map(|r| r.ingest_time_us)),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.partition))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.offset))),
    ];
    RecordBatch::try_new(schema.clone(), columns)
}

/// Builds a `k2.sequence_gaps` batch.
pub fn sequence_events_batch(
    rows: &[SequenceEventRow],
    schema: &SchemaRef,
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.kind))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.exchange))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.symbol))),
        Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.expected))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.received))),
        Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.missing))),
        Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.previous))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.topic))),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.partition))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.offset))),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.reported_offset),
        )),
        timestamps(rows.iter().map(|r| r.detected_at_us)),
    ];
    RecordBatch::try_new(schema.clone(), columns)
}

/// Builds a `k2.probable_duplicates` batch.
pub fn probable_duplicates_batch(
    rows: &[ProbableDuplicate],
    schema: &SchemaRef,
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.exchange))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.symbol))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.trade_id))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.topic))),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.partition))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.offset))),
        Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.kept)))),
        timestamps(rows.iter().map(|r| r.detected_at_us)),
    ];
    RecordBatch::try_new(schema.clone(), columns)
}

/// Builds a `k2.shed_ledger` batch.
pub fn shed_ledger_batch(
    rows: &[ShedEntry],
    schema: &SchemaRef,
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.entry_id))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.action.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.topic))),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.partition))),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.offsets.first().unwrap_or_default()),
        )),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.offsets.last().unwrap_or_default()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.offsets.to_string()),
        )),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.records as i64),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.priority.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.level.as_str()),
        )),
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.detail.as_deref()))),
        timestamps(rows.iter().map(|r| r.recorded_at_us)),
    ];
    RecordBatch::try_new(schema.clone(), columns)
}

/// Writes record batches of one table as Parquet data files.
#[derive(Clone)]
pub struct TableWriter {
    table: Table,
    arrow_schema: SchemaRef,
    splitter: Option<Arc<RecordBatchPartitionSplitter>>,
    /// For a table partitioned by `day(<timestamp>)` alone (`market.trades`).
    one_day: Option<Arc<OneDay>>,
    properties: WriterProperties,
    target_file_size_bytes: usize,
}

impl TableWriter {
    pub fn new(table: &Table, zstd_level: i32, target_file_size_bytes: u64) -> iceberg::Result<Self> {
        let metadata = table.metadata();
        let schema = metadata.current_schema().clone();
        let arrow_schema = Arc::new(schema_to_arrow_schema(&schema)?);
        let spec = metadata.default_partition_spec().clone();
        let one_day = OneDay::of(&schema, &spec, &arrow_schema).map(Arc::new);
        let splitter = if spec.is_unpartitioned() {
            None
        } else {
            Some(Arc::new(
                RecordBatchPartitionSplitter::try_new_with_computed_values(schema, spec)?,
            ))
        };
        let level = ZstdLevel::try_new(zstd_level).map_err(|err| {
            iceberg::Error::new(
                iceberg::ErrorKind::DataInvalid,
                format!("zstd level {zstd_level}: {err}"),
            )
        })?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .build();
        Ok(Self {
            table: table.clone(),
            arrow_schema,
            splitter,
            one_day,
            properties,
            target_file_size_bytes: target_file_size_bytes as usize,
        })
    }

    /// Row groups of at most `rows` rows (Parquet's default is 1M): smaller
    /// ones let readers skip more by their statistics.
    pub fn with_max_row_group_rows(mut self, rows: usize) -> Self {
        self.properties = self
            .properties
            .into_builder()
            .set_max_row_group_row_count(Some(rows))
            .build();
        self
    }

    /// The table's Arrow schema, to build batches with.
    pub fn arrow_schema(&self) -> &SchemaRef {
        &self.arrow_schema
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Writes `batch` into new data files (one or more per partition value).
    pub async fn write(&self, batch: RecordBatch) -> iceberg::Result<Vec<DataFile>> {
        self.write_all(std::slice::from_ref(&batch)).await
    }

    /// Writes `batches`, in order, into new data files (one or more per
    /// partition value), as [`Self::write`] would write them concatenated.
    pub async fn write_all(&self, batches: &[RecordBatch]) -> iceberg::Result<Vec<DataFile>> {
        if batches.iter().all(|b| b.num_rows() == 0) {
            return Ok(Vec::new());
        }
        let metadata = self.table.metadata();
        let parquet = ParquetWriterBuilder::new(self.properties.clone(), metadata.current_schema().clone());
        let rolling = RollingFileWriterBuilder::new(
            parquet,
            self.target_file_size_bytes,
            self.table.file_io().clone(),
            DefaultLocationGenerator::new(metadata)?,
            DefaultFileNameGenerator::new(uuid::Uuid::now_v7().to_string(), None, DataFileFormat::Parquet),
        );
        let builder = DataFileWriterBuilder::new(rolling);
        match &self.splitter {
            None => {
                let mut writer = builder.build(None).await?;
                for batch in batches {
                    writer.write(batch.clone()).await?;
                }
                writer.close().await
            }
            Some(splitter) => {
                let mut writer = FanoutWriter::new(builder);
                for batch in batches {
                    match self.one_day.as_ref().and_then(|day| day.key(batch)) {
                        Some(key) => writer.write(key, batch.clone()).await?,
                        None => {
                            for (key, part) in splitter.split(batch)? {
                                writer.write(key, part).await?;
                            }
                        }
                    }
                }
                writer.close().await
            }
        }
    }
}

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// A partition spec of one `day(<timestamp>)` field. A lane's batch nearly
/// always falls in one day, and iceberg's splitter builds a partition value
/// per row and filters the batch per value (~5% of a trade's CPU): when the
/// batch's earliest and latest times share a day, its key is that day's and
/// the batch is written whole.
struct OneDay {
    /// The timestamp column, in the Arrow schema.
    column: usize,
    spec: PartitionSpec,
    schema: IcebergSchemaRef,
}

impl OneDay {
    fn of(schema: &IcebergSchemaRef, spec: &PartitionSpec, arrow_schema: &SchemaRef) -> Option<Self> {
        let [field] = spec.fields() else {
            return None;
        };
        if field.transform != Transform::Day {
            return None;
        }
        let source = schema.field_by_id(field.source_id)?;
        let column = arrow_schema.index_of(&source.name).ok()?;
        matches!(
            arrow_schema.field(column).data_type(),
            arrow_schema::DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, _)
        )
        .then(|| Self {
            column,
            spec: spec.clone(),
            schema: schema.clone(),
        })
    }

    /// The partition key of `batch` if all its rows fall in one day; None
    /// otherwise (the splitter then splits it).
    fn key(&self, batch: &RecordBatch) -> Option<PartitionKey> {
        let times = batch
            .column(self.column)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()?;
        if times.null_count() > 0 {
            return None;
        }
        let values = times.values();
        let (min, max) = values
            .iter()
            .fold((*values.first()?, *values.first()?), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let day = min.div_euclid(MICROS_PER_DAY);
        if day != max.div_euclid(MICROS_PER_DAY) {
            return None;
        }
        let value = Struct::from_iter([Some(Literal::date(i32::try_from(day).ok()?))]);
        Some(PartitionKey::new(self.spec.clone(), self.schema.clone(), value))
    }
}

/// Rows a row group of a file sorted for queries holds at most: a symbol's
/// trades of a compaction sit in one or a few row groups, and a query of one
/// symbol skips the rest by their statistics and decodes little it drops.
pub const SORTED_ROW_GROUP_ROWS: usize = 16 * 1024;

/// Trades sorted by (exchange, symbol, event time), the order queries filter
/// by, as one batch in buffers of its own size; K2's other tables (no such
/// columns) concatenated as they are. Lanes write their files in arrival
/// order, a partition's symbols mixed: compaction gives the table this
/// layout, and the batches kept for queries (`crate::query::recent`) are kept
/// in it. Only the three key columns are concatenated to find the order; the
/// rows are then taken from `batches` directly, so the whole of them is
/// copied once. `schema` is the batches' schema (for no batches at all).
pub fn sorted_for_queries(
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    const KEYS: [&str; 3] = ["exchange", "symbol", "event_time"];
    let Some(key_columns) = KEYS
        .iter()
        .map(|name| schema.index_of(name).ok())
        .collect::<Option<Vec<_>>>()
    else {
        return arrow_select::concat::concat_batches(schema, batches);
    };
    let batches: Vec<&RecordBatch> = batches.iter().filter(|batch| batch.num_rows() > 0).collect();
    let sort = key_columns
        .iter()
        .map(|&column| {
            let values = match batches.as_slice() {
                [] => arrow_array::new_empty_array(schema.field(column).data_type()),
                [one] => one.column(column).clone(),
                many => {
                    let parts: Vec<&dyn arrow_array::Array> =
                        many.iter().map(|batch| batch.column(column).as_ref()).collect();
                    arrow_select::concat::concat(&parts)?
                }
            };
            Ok(arrow_ord::sort::SortColumn {
                values,
                options: None,
            })
        })
        .collect::<Result<Vec<_>, arrow_schema::ArrowError>>()?;
    let indices = arrow_ord::sort::lexsort_to_indices(&sort, None)?;
    match batches.as_slice() {
        [] => Ok(RecordBatch::new_empty(schema.clone())),
        [one] => arrow_select::take::take_record_batch(one, &indices),
        many => {
            // Row `i` of the concatenated keys is row `i - starts[b]` of batch
            // `b`, the last batch starting at or before `i` (none is empty).
            let starts: Vec<usize> = many
                .iter()
                .scan(0, |start, batch| {
                    let this = *start;
                    *start += batch.num_rows();
                    Some(this)
                })
                .collect();
            let rows: Vec<(usize, usize)> = indices
                .values()
                .iter()
                .map(|&i| {
                    let i = i as usize;
                    let batch = starts.partition_point(|&start| start <= i) - 1;
                    (batch, i - starts[batch])
                })
                .collect();
            arrow_select::interleave::interleave_record_batch(many, &rows)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CatalogConfig;
    use crate::model::Side;
    use crate::storage::catalog::open_catalog;
    use crate::storage::tables::{TableIdents, ensure_tables};

    async fn trades_table(dir: &std::path::Path) -> Table {
        let config = CatalogConfig::sqlite_in(dir);
        let catalog = open_catalog(&config, dir).await.unwrap();
        let idents = TableIdents::new(&config.namespace);
        ensure_tables(catalog.as_ref(), &idents).await.unwrap();
        catalog.load_table(&idents.trades).await.unwrap()
    }

    fn trade(offset: usize, event_time_us: i64) -> Trade {
        Trade {
            exchange: "ASX".into(),
            symbol: "BHP".into(),
            sequence: offset as i64,
            trade_id: format!("BHP-{offset}").into(),
            price: 1,
            quantity: 1,
            side: Side::Buy,
            event_time_us,
            ingest_time_us: event_time_us,
            partition: 0,
            offset: offset as i64,
        }
    }

    fn batch(writer: &TableWriter, times: &[i64]) -> RecordBatch {
        let mut builder = TradeBatchBuilder::with_capacity(times.len());
        for (offset, &event_time_us) in times.iter().enumerate() {
            builder.push(&trade(offset, event_time_us));
        }
        builder.finish(writer.arrow_schema()).unwrap()
    }

    fn offsets(batches: &[RecordBatch]) -> Vec<i64> {
        batches
            .iter()
            .flat_map(|b| {
                b.column_by_name("kafka_offset")
                    .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect()
    }

    #[actix_rt::test]
    async fn a_trade_buffer_fills_fixed_chunks_and_writes_them_as_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let table = trades_table(dir.path()).await;
        let writer = TableWriter::new(&table, 1, 64 << 20).unwrap();
        let schema = writer.arrow_schema().clone();
        let rows = 2 * TRADE_BUFFER_CHUNK_ROWS + 5;
        let day = 20_791 * DAY;
        let mut buffer = TradeBuffer::new();
        let mut whole = TradeBatchBuilder::with_capacity(rows);
        for offset in 0..rows {
            buffer.push(&trade(offset, day + offset as i64));
            whole.push(&trade(offset, day + offset as i64));
        }
        assert_eq!(buffer.len(), rows);
        assert_eq!(buffer.estimated_bytes(), whole.estimated_bytes());
        let seen = buffer.snapshot(&schema).unwrap();
        assert_eq!(buffer.len(), rows, "a snapshot leaves the rows in place");
        let batches = buffer.finish(&schema).unwrap();
        assert!(buffer.is_empty() && buffer.estimated_bytes() == 0);
        let sizes: Vec<usize> = batches.iter().map(RecordBatch::num_rows).collect();
        assert_eq!(sizes, vec![TRADE_BUFFER_CHUNK_ROWS, TRADE_BUFFER_CHUNK_ROWS, 5]);
        let expected: Vec<i64> = (0..rows as i64).collect();
        assert_eq!(offsets(&batches), expected, "every row once, in order");
        assert_eq!(offsets(&seen), expected);
        assert!(buffer.finish(&schema).unwrap().is_empty());

        let files = writer.write_all(&batches).await.unwrap();
        assert_eq!(files.len(), 1, "one day, one file");
        assert_eq!(files[0].record_count(), rows as u64);
        assert!(
            writer.write_all(&[]).await.unwrap().is_empty(),
            "nothing to write, no file"
        );
    }

    const DAY: i64 = MICROS_PER_DAY;

    #[actix_rt::test]
    async fn a_batch_within_one_day_gets_the_key_the_splitter_gives_and_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let table = trades_table(dir.path()).await;
        let writer = TableWriter::new(&table, 1, 64 << 20).unwrap();
        let (one_day, splitter) = (writer.one_day.clone().unwrap(), writer.splitter.clone().unwrap());
        // 2026-12-04, from its first to its last microsecond; and a day before 1970.
        let day = 20_791 * DAY;
        for times in [vec![day + DAY - 1, day, day + 5], vec![-DAY, -1, -DAY + 7]] {
            let batch = batch(&writer, &times);
            let key = one_day.key(&batch).expect("one day");
            let split = splitter.split(&batch).unwrap();
            assert_eq!(split.len(), 1);
            assert_eq!(key.to_path(), split[0].0.to_path());
            let files = writer.write(batch).await.unwrap();
            assert_eq!(files.len(), 1);
            assert_eq!(files[0].record_count(), 3);
            let expected = Struct::from_iter([Some(Literal::date((times[1].div_euclid(DAY)) as i32))]);
            assert_eq!(files[0].partition(), &expected);
        }
    }

    #[actix_rt::test]
    async fn a_batch_across_midnight_is_split_by_day() {
        let dir = tempfile::tempdir().unwrap();
        let table = trades_table(dir.path()).await;
        let writer = TableWriter::new(&table, 1, 64 << 20).unwrap();
        let day = 20_791 * DAY;
        let batch = batch(&writer, &[day - 1, day, day + 1, day - 2]);
        assert!(writer.one_day.as_ref().unwrap().key(&batch).is_none());
        let files = writer.write(batch).await.unwrap();
        let mut by_day: Vec<(String, u64)> = files
            .iter()
            .map(|f| (format!("{:?}", f.partition()), f.record_count()))
            .collect();
        by_day.sort();
        assert_eq!(by_day.len(), 2, "{by_day:?}");
        assert_eq!(by_day.iter().map(|(_, n)| n).sum::<u64>(), 4, "{by_day:?}");
    }
}
