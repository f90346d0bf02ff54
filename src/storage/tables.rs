//! The Iceberg tables K2 writes, their schemas and partition specs.

use std::sync::Arc;

use iceberg::spec::{NestedField, PrimitiveType, Schema, Transform, Type, UnboundPartitionSpec};
use iceberg::{Catalog, NamespaceIdent, TableCreation, TableIdent};

use crate::model::{DECIMAL_PRECISION, DECIMAL_SCALE};

/// Namespace of K2's own operational tables (`k2.dead_letters`, ...).
pub const K2_NAMESPACE: &str = "k2";
pub const TRADES_TABLE: &str = "trades";
pub const REFERENCE_TABLE: &str = "reference";
pub const DEAD_LETTERS_TABLE: &str = "dead_letters";
pub const SEQUENCE_GAPS_TABLE: &str = "sequence_gaps";
pub const PROBABLE_DUPLICATES_TABLE: &str = "probable_duplicates";
pub const SHED_LEDGER_TABLE: &str = "shed_ledger";

/// The tables one pipeline writes.
#[derive(Debug, Clone)]
pub struct TableIdents {
    pub trades: TableIdent,
    /// `market.reference`, beside trades in the market namespace.
    pub reference: TableIdent,
    pub dead_letters: TableIdent,
    pub sequence_gaps: TableIdent,
    pub probable_duplicates: TableIdent,
    pub shed_ledger: TableIdent,
}

impl TableIdents {
    pub fn new(market_namespace: &str) -> Self {
        Self {
            trades: TableIdent::new(
                NamespaceIdent::new(market_namespace.to_string()),
                TRADES_TABLE.to_string(),
            ),
            reference: TableIdent::new(
                NamespaceIdent::new(market_namespace.to_string()),
                REFERENCE_TABLE.to_string(),
            ),
            dead_letters: k2_table(DEAD_LETTERS_TABLE),
            sequence_gaps: k2_table(SEQUENCE_GAPS_TABLE),
            probable_duplicates: k2_table(PROBABLE_DUPLICATES_TABLE),
            shed_ledger: k2_table(SHED_LEDGER_TABLE),
        }
    }
}

impl TableIdents {
    /// The ident of one of the tables.
    pub fn get(&self, table: K2Table) -> &TableIdent {
        match table {
            K2Table::Trades => &self.trades,
            K2Table::Reference => &self.reference,
            K2Table::DeadLetters => &self.dead_letters,
            K2Table::SequenceGaps => &self.sequence_gaps,
            K2Table::ProbableDuplicates => &self.probable_duplicates,
            K2Table::ShedLedger => &self.shed_ledger,
        }
    }

    /// Every table, trades first.
    pub fn all(&self) -> Vec<TableIdent> {
        K2Table::ALL.into_iter().map(|t| self.get(t).clone()).collect()
    }

    /// Which of the tables `ident` names, if any.
    pub fn kind(&self, ident: &TableIdent) -> Option<K2Table> {
        K2Table::ALL.into_iter().find(|&t| self.get(t) == ident)
    }
}

/// The tables one pipeline writes, by role (faults and metrics name them so).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum K2Table {
    Trades,
    Reference,
    DeadLetters,
    SequenceGaps,
    ProbableDuplicates,
    ShedLedger,
}

impl K2Table {
    pub const ALL: [K2Table; 6] = [
        K2Table::Trades,
        K2Table::Reference,
        K2Table::DeadLetters,
        K2Table::SequenceGaps,
        K2Table::ProbableDuplicates,
        K2Table::ShedLedger,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            K2Table::Trades => "trades",
            K2Table::Reference => "reference",
            K2Table::DeadLetters => "dead_letters",
            K2Table::SequenceGaps => "sequence_gaps",
            K2Table::ProbableDuplicates => "probable_duplicates",
            K2Table::ShedLedger => "shed_ledger",
        }
    }
}

fn k2_table(name: &str) -> TableIdent {
    TableIdent::new(NamespaceIdent::new(K2_NAMESPACE.to_string()), name.to_string())
}

fn decimal() -> Type {
    Type::Primitive(PrimitiveType::Decimal {
        precision: DECIMAL_PRECISION as u32,
        scale: DECIMAL_SCALE as u32,
    })
}

fn string() -> Type {
    Type::Primitive(PrimitiveType::String)
}

fn timestamptz() -> Type {
    Type::Primitive(PrimitiveType::Timestamptz)
}

/// Field id of `event_time` in the trades schema (the partition source).
pub const TRADES_EVENT_TIME_FIELD_ID: i32 = 8;

/// `market.trades`: one row per accepted trade.
pub fn trades_schema() -> Schema {
    let fields = vec![
        NestedField::required(1, "exchange", string()),
        NestedField::required(2, "symbol", string()),
        NestedField::required(3, "sequence", Type::Primitive(PrimitiveType::Long)),
        NestedField::required(4, "trade_id", string()),
        NestedField::required(5, "price", decimal()),
        NestedField::required(6, "quantity", decimal()),
        NestedField::required(7, "side", string()),
        NestedField::required(TRADES_EVENT_TIME_FIELD_ID, "event_time", timestamptz()),
        NestedField::required(9, "ingest_time", timestamptz()),
        NestedField::required(10, "kafka_partition", Type::Primitive(PrimitiveType::Int)),
        NestedField::required(11, "kafka_offset", Type::Primitive(PrimitiveType::Long)),
    ];
    Schema::builder()
        .with_schema_id(0)
        .with_fields(fields.into_iter().map(Arc::new))
        .build()
        .expect("the trades schema is statically valid")
}

/// Trades are partitioned by day of event time.
pub fn trades_partition_spec() -> UnboundPartitionSpec {
    UnboundPartitionSpec::builder()
        .add_partition_field(TRADES_EVENT_TIME_FIELD_ID, "event_day", Transform::Day)
        .expect("the trades partition spec is statically valid")
        .build()
}

/// `market.reference`: one row per reference-data update, with the Kafka
/// position it came from (its identity: a replayed or backfilled update is
/// recognised by partition and offset).
pub fn reference_schema() -> Schema {
    let fields = vec![
        NestedField::required(1, "exchange", string()),
        NestedField::required(2, "symbol", string()),
        NestedField::optional(3, "name", string()),
        NestedField::optional(4, "currency", string()),
        NestedField::required(5, "tick_size", decimal()),
        NestedField::required(6, "lot_size", decimal()),
        NestedField::required(7, "status", string()),
        NestedField::required(8, "effective_time", timestamptz()),
        NestedField::required(9, "ingest_time", timestamptz()),
        NestedField::required(10, "kafka_partition", Type::Primitive(PrimitiveType::Int)),
        NestedField::required(11, "kafka_offset", long()),
    ];
    Schema::builder()
        .with_schema_id(0)
        .with_fields(fields.into_iter().map(Arc::new))
        .build()
        .expect("the reference schema is statically valid")
}

/// `k2.dead_letters`: records that could not be decoded or validated, and
/// offset ranges Kafka deleted before K2 could read them.
pub fn dead_letters_schema() -> Schema {
    let fields = vec![
        NestedField::required(1, "topic", string()),
        NestedField::required(2, "partition", Type::Primitive(PrimitiveType::Int)),
        NestedField::required(3, "offset", Type::Primitive(PrimitiveType::Long)),
        NestedField::required(4, "raw", Type::Primitive(PrimitiveType::Binary)),
        NestedField::required(5, "reason", string()),
        NestedField::required(6, "dead_lettered_at", timestamptz()),
    ];
    Schema::builder()
        .with_schema_id(0)
        .with_fields(fields.into_iter().map(Arc::new))
        .build()
        .expect("the dead-letter schema is statically valid")
}

fn long() -> Type {
    Type::Primitive(PrimitiveType::Long)
}

/// `k2.sequence_gaps`: gaps and resets of per-(exchange, symbol) sequences.
pub fn sequence_gaps_schema() -> Schema {
    let fields = vec![
        NestedField::required(1, "kind", string()),
        NestedField::required(2, "exchange", string()),
        NestedField::required(3, "symbol", string()),
        NestedField::optional(4, "expected", long()),
        NestedField::required(5, "received", long()),
        NestedField::optional(6, "missing", long()),
        NestedField::optional(7, "previous", long()),
        NestedField::required(8, "topic", string()),
        NestedField::required(9, "partition", Type::Primitive(PrimitiveType::Int)),
        NestedField::required(10, "offset", long()),
        NestedField::required(11, "reported_offset", long()),
        NestedField::required(12, "detected_at", timestamptz()),
    ];
    Schema::builder()
        .with_schema_id(0)
        .with_fields(fields.into_iter().map(Arc::new))
        .build()
        .expect("the sequence-gaps schema is statically valid")
}

/// `k2.probable_duplicates`: trades the long-window Bloom filter has
/// probably seen before, which no exact structure could confirm.
pub fn probable_duplicates_schema() -> Schema {
    let fields = vec![
        NestedField::required(1, "exchange", string()),
        NestedField::required(2, "symbol", string()),
        NestedField::required(3, "trade_id", string()),
        NestedField::required(4, "topic", string()),
        NestedField::required(5, "partition", Type::Primitive(PrimitiveType::Int)),
        NestedField::required(6, "offset", long()),
        NestedField::required(7, "kept", Type::Primitive(PrimitiveType::Boolean)),
        NestedField::required(8, "detected_at", timestamptz()),
    ];
    Schema::builder()
        .with_schema_id(0)
        .with_fields(fields.into_iter().map(Arc::new))
        .build()
        .expect("the probable-duplicates schema is statically valid")
}

/// `k2.shed_ledger`: what load shedding left out of the trades table (one
/// row per partition, priority and chunk, offsets as ranges) and the
/// backfills that restored it (`action = "backfilled"`, same `entry_id`).
pub fn shed_ledger_schema() -> Schema {
    let fields = vec![
        NestedField::required(1, "entry_id", string()),
        NestedField::required(2, "action", string()),
        NestedField::required(3, "topic", string()),
        NestedField::required(4, "partition", Type::Primitive(PrimitiveType::Int)),
        NestedField::required(5, "first_offset", long()),
        NestedField::required(6, "last_offset", long()),
        NestedField::required(7, "offsets", string()),
        NestedField::required(8, "records", long()),
        NestedField::required(9, "priority", string()),
        NestedField::required(10, "level", string()),
        NestedField::optional(11, "detail", string()),
        NestedField::required(12, "recorded_at", timestamptz()),
    ];
    Schema::builder()
        .with_schema_id(0)
        .with_fields(fields.into_iter().map(Arc::new))
        .build()
        .expect("the shed-ledger schema is statically valid")
}

/// Create the namespaces and tables that do not exist yet. Safe to run from
/// several processes at once: a creation that loses the race is not an error.
pub async fn ensure_tables(catalog: &dyn Catalog, idents: &TableIdents) -> iceberg::Result<()> {
    let wanted = [
        (&idents.trades, trades_schema(), Some(trades_partition_spec())),
        (&idents.reference, reference_schema(), None),
        (&idents.dead_letters, dead_letters_schema(), None),
        (&idents.sequence_gaps, sequence_gaps_schema(), None),
        (&idents.probable_duplicates, probable_duplicates_schema(), None),
        (&idents.shed_ledger, shed_ledger_schema(), None),
    ];
    for (ident, schema, spec) in wanted {
        let namespace = ident.namespace();
        if !catalog.namespace_exists(namespace).await?
            && let Err(err) = catalog.create_namespace(namespace, Default::default()).await
            && !catalog.namespace_exists(namespace).await?
        {
            return Err(err);
        }
        if catalog.table_exists(ident).await? {
            continue;
        }
        let creation = TableCreation::builder()
            .name(ident.name().to_string())
            .schema(schema)
            .partition_spec_opt(spec)
            .properties(std::collections::HashMap::from([(
                // Data files are ZSTD-compressed by K2's writer; record it for readers.
                "write.parquet.compression-codec".to_string(),
                "zstd".to_string(),
            )]))
            .build();
        if let Err(err) = catalog.create_table(namespace, creation).await
            && !catalog.table_exists(ident).await?
        {
            return Err(err);
        }
    }
    Ok(())
}
