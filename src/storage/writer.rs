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
    ArrayRef, BooleanArray, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow_schema::SchemaRef;
use iceberg::arrow::{RecordBatchPartitionSplitter, schema_to_arrow_schema};
use iceberg::spec::{DataFile, DataFileFormat};
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
    properties: WriterProperties,
    target_file_size_bytes: usize,
}

impl TableWriter {
    pub fn new(table: &Table, zstd_level: i32, target_file_size_bytes: u64) -> iceberg::Result<Self> {
        let metadata = table.metadata();
        let schema = metadata.current_schema().clone();
        let arrow_schema = Arc::new(schema_to_arrow_schema(&schema)?);
        let spec = metadata.default_partition_spec().clone();
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
            properties,
            target_file_size_bytes: target_file_size_bytes as usize,
        })
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
                writer.write(batch).await?;
                writer.close().await
            }
            Some(splitter) => {
                let mut writer = FanoutWriter::new(builder);
                for (key, part) in splitter.split(&batch)? {
                    writer.write(key, part).await?;
                }
                writer.close().await
            }
        }
    }
}
