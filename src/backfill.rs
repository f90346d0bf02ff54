//! `k2 backfill`: ingests what load shedding left out of `market.trades`.
//!
//! Shedding defers, it never loses: every shed record's partition and
//! offsets are in `k2.shed_ledger` (`action = "shed"`). A backfill finds the
//! entries no `"backfilled"` row has closed yet, reads their offsets back
//! from Kafka, decodes them as the pipeline would have, and commits the
//! trades `market.trades` does not hold yet. Then it closes each entry with
//! a `"backfilled"` row saying what it found.
//!
//! Why a rerun is always safe (see `docs/backfill.md`):
//! - Trades are deduplicated against the table by (exchange, symbol,
//!   trade id) right before they are committed, so a crash between the
//!   trades commit and the closing rows leaves entries whose trades a rerun
//!   finds present: it commits nothing and just closes them.
//! - Backfill commits carry the tables' `k2.offsets.<topic>` summaries
//!   forward unchanged: where the pipeline resumes never moves.
//! - Only entries whose epoch the trades table has committed are handled.
//!   An entry above the table's recorded offset comes from an epoch the
//!   pipeline will replay (and shed, or commit, again); touching it could
//!   put a trade in the table twice.
//!
//! The Kafka side runs on a thread of its own ([`kafka_reader`]); this module
//! decodes, sequences, deduplicates and commits what it sends, a bounded
//! batch at a time.

mod kafka_reader;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::IsTerminal as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use iceberg::expr::Reference;
use iceberg::spec::{DataFile, Datum};
use iceberg::table::Table;
use iceberg::{Catalog, TableIdent};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use self::kafka_reader::{EntryRead, Fetched, FetchedRecord, PartitionPlan, ShedReader};
use crate::config::K2Config;
use crate::decode::{DecoderConfig, Record, TradeDecoder};
use crate::metrics as m;
use crate::model::{DeadLetter, ReferenceRecord, Trade, TradeKey, now_us};
use crate::sequence::{RecordPosition, SequenceEvent, SequenceTracker};
use crate::shedding::{LedgerAction, OffsetRanges, ShedEntry};
use crate::storage::catalog::open_existing_catalog;
use crate::storage::commit::Committer;
use crate::storage::offsets::TopicOffsets;
use crate::storage::reader::{
    find_trade_keys, scan_dead_letters, scan_reference_positions, scan_shed_ledger,
};
use crate::storage::tables::TableIdents;
use crate::storage::writer::{
    TableWriter, TradeBatchBuilder, dead_letter_batch, reference_batch, shed_ledger_batch,
};

/// Trades held before they are deduplicated and committed: what bounds a
/// backfill's memory (about 20 MB of trades, plus their keys).
const FLUSH_RECORDS: usize = 100_000;
/// Messages the Kafka thread may read ahead of the commits.
const READ_AHEAD_MESSAGES: usize = 4;
/// How long Kafka may deliver nothing before the backfill gives up.
const KAFKA_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Commit attempts of one batch of trades that lose the race to another writer.
const MAX_COMMIT_ATTEMPTS: usize = 20;
/// Dead letters logged one by one; past this, only counted (and summed per entry).
const MAX_LOGGED_DEAD_LETTERS: u64 = 20;
/// Snapshot summary key of every backfill commit (value: the run id), so a
/// backfill can tell its own kind of commit from the pipeline's.
pub const BACKFILL_RUN_KEY: &str = "k2.backfill.run";

/// How to run a backfill.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackfillOptions {
    /// List what is open and what Kafka still holds of it; change nothing.
    pub dry_run: bool,
    /// Draw a progress bar (only when stderr is a terminal).
    pub progress: bool,
}

/// What one entry's backfill found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryOutcome {
    pub entry_id: String,
    pub partition: i32,
    /// Offsets the entry holds.
    pub records: u64,
    /// Trades this run committed.
    pub committed: u64,
    /// Trades the table held already (or that this run read twice).
    pub present: u64,
    /// Records that did not decode.
    pub dead_letters: u64,
    /// Offsets Kafka no longer holds.
    pub expired: u64,
}

impl EntryOutcome {
    /// The `detail` of the entry's closing ledger row.
    pub fn detail(&self) -> String {
        format!(
            "committed {}, already present {}, dead letters {}, expired {}",
            self.committed, self.present, self.dead_letters, self.expired
        )
    }
}

/// What a backfill did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackfillReport {
    pub dry_run: bool,
    /// Open entries this run handles: shed, not closed by a backfilled row,
    /// of the configured topic, and in an epoch the trades table committed.
    pub open: Vec<ShedEntry>,
    /// Offsets those entries hold.
    pub open_records: u64,
    /// Open entries left for later: the trades table has not committed
    /// their epoch yet, and the pipeline will replay it.
    pub entries_pending: u64,
    /// Open entries of other topics (a run reads `kafka.topic` only).
    pub entries_other_topic: u64,
    pub entries_closed: u64,
    pub records_committed: u64,
    /// Trades found in the table already, or read twice by this run.
    pub records_present: u64,
    /// Records that no longer decode (they did when they were shed).
    pub dead_letters: u64,
    /// Offsets Kafka no longer holds. In a dry run: offsets below the low
    /// watermarks now.
    pub expired: u64,
    /// Gaps this run's own sequence tracker saw (informational: see
    /// `docs/backfill.md`).
    pub sequence_gaps: u64,
    pub sequence_resets: u64,
    /// The closed entries, in the order they were closed.
    pub closed: Vec<EntryOutcome>,
}

impl fmt::Display for BackfillReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dry_run {
            return write!(
                f,
                "{} open entries holding {} records ({} already gone from Kafka); \
                 {} pending (epoch not committed yet), {} of other topics; nothing changed",
                self.open.len(),
                self.open_records,
                self.expired,
                self.entries_pending,
                self.entries_other_topic
            );
        }
        write!(
            f,
            "{} entries closed: {} records committed, {} already present, {} dead letters, \
             {} expired; {} sequence gaps and {} resets seen; {} entries pending, {} of other topics",
            self.entries_closed,
            self.records_committed,
            self.records_present,
            self.dead_letters,
            self.expired,
            self.sequence_gaps,
            self.sequence_resets,
            self.entries_pending,
            self.entries_other_topic
        )
    }
}

/// The entries still to backfill among `rows` (all of `k2.shed_ledger`).
///
/// A `"shed"` entry is open for the offsets no `"backfilled"` row of its
/// topic and partition covers. Closing goes by offset, not by entry id: a
/// replayed epoch can cut its chunks differently and ledger a larger offset
/// set under the same id after a backfill closed the first one, and those
/// extra offsets are still to backfill. A shed entry written twice has the
/// union of its offsets and the earliest `recorded_at`. Sorted by topic,
/// partition and first offset.
pub fn open_entries(rows: Vec<ShedEntry>) -> Vec<ShedEntry> {
    let mut closed: HashMap<(String, i32), OffsetRanges> = HashMap::new();
    let mut shed: HashMap<String, ShedEntry> = HashMap::new();
    for row in rows {
        match row.action {
            LedgerAction::Backfilled => {
                let done = closed.entry((row.topic.clone(), row.partition)).or_default();
                *done = union(done, &row.offsets);
            }
            LedgerAction::Shed => match shed.entry(row.entry_id.clone()) {
                Entry::Vacant(slot) => {
                    slot.insert(row);
                }
                Entry::Occupied(mut slot) => {
                    let entry = slot.get_mut();
                    if entry.offsets != row.offsets {
                        entry.offsets = union(&entry.offsets, &row.offsets);
                        entry.records = entry.offsets.count();
                    }
                    entry.recorded_at_us = entry.recorded_at_us.min(row.recorded_at_us);
                }
            },
        }
    }
    let mut open: Vec<ShedEntry> = shed
        .into_values()
        .filter_map(|mut entry| {
            if let Some(done) = closed.get(&(entry.topic.clone(), entry.partition)) {
                let mut left = OffsetRanges::default();
                for offset in entry.offsets.iter().filter(|o| !done.contains(*o)) {
                    left.push(offset);
                }
                entry.records = left.count();
                entry.offsets = left;
            }
            (!entry.offsets.is_empty()).then_some(entry)
        })
        .collect();
    open.sort_by(|a, b| {
        (&a.topic, a.partition, a.offsets.first(), &a.entry_id).cmp(&(
            &b.topic,
            b.partition,
            b.offsets.first(),
            &b.entry_id,
        ))
    });
    open
}

/// Offsets in `a` or `b`. Offset by offset: only for the rare entry written
/// twice with different offsets.
fn union(a: &OffsetRanges, b: &OffsetRanges) -> OffsetRanges {
    let mut out = OffsetRanges::default();
    let (mut a, mut b) = (a.iter().peekable(), b.iter().peekable());
    loop {
        let next = match (a.peek().copied(), b.peek().copied()) {
            (Some(x), Some(y)) if x < y => a.next(),
            (Some(x), Some(y)) if y < x => b.next(),
            (Some(_), Some(_)) => {
                b.next();
                a.next()
            }
            (Some(_), None) => a.next(),
            (None, Some(_)) => b.next(),
            (None, None) => break,
        };
        if let Some(offset) = next {
            out.push(offset);
        }
    }
    out
}

/// Which open entries a run handles.
#[derive(Debug, Default)]
struct Plan {
    /// Entries to handle, in partition and offset order.
    entries: Vec<ShedEntry>,
    partitions: Vec<PartitionPlan>,
    pending: u64,
    other_topic: u64,
}

impl Plan {
    /// Keeps the entries of `topic` that lie wholly below the offset the
    /// trades table records for their partition (`recorded`).
    fn new(open: Vec<ShedEntry>, topic: &str, recorded: &TopicOffsets) -> Self {
        let mut plan = Plan::default();
        let mut by_partition: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
        for entry in open {
            if entry.topic != topic {
                plan.other_topic += 1;
                continue;
            }
            let committed = recorded
                .next_offset(entry.partition)
                .is_some_and(|next| entry.offsets.last().is_none_or(|last| last < next));
            if !committed {
                plan.pending += 1;
                continue;
            }
            by_partition
                .entry(entry.partition)
                .or_default()
                .push(plan.entries.len());
            plan.entries.push(entry);
        }
        plan.partitions = by_partition
            .into_iter()
            .map(|(partition, indices)| PartitionPlan::new(partition, &plan.entries, indices))
            .collect();
        plan
    }

    fn records(&self) -> u64 {
        self.entries.iter().map(|e| e.offsets.count()).sum()
    }
}

/// Backfills the open entries of `k2.shed_ledger` for `config.kafka.topic`,
/// reading from `brokers` (a bootstrap list). See the module docs.
pub async fn backfill(
    config: &K2Config,
    brokers: &str,
    base_dir: &Path,
    options: BackfillOptions,
) -> anyhow::Result<BackfillReport> {
    let topic = config.kafka.topic.as_str();
    let catalog = open_existing_catalog(&config.catalog, base_dir).await?;
    let idents = TableIdents::new(&config.catalog.namespace);
    // The trades table's offsets first: an epoch commits its ledger rows
    // before its trades, so every ledger row of an epoch these offsets
    // cover is in the ledger read after them. Read the other way round, a
    // replayed epoch committed in between could widen an entry this run
    // then closes without seeing the new offsets.
    let trades = load_existing(catalog.as_ref(), &idents.trades).await?;
    let recorded = TopicOffsets::from_table(&trades, topic)
        .with_context(|| format!("failed to read the offsets recorded in {}", idents.trades))?;
    let ledger = load_existing(catalog.as_ref(), &idents.shed_ledger).await?;
    let rows = scan_shed_ledger(&ledger)
        .await
        .with_context(|| format!("failed to read {}", idents.shed_ledger))?;
    let plan = Plan::new(open_entries(rows), topic, &recorded);
    let mut report = BackfillReport {
        dry_run: options.dry_run,
        open_records: plan.records(),
        entries_pending: plan.pending,
        entries_other_topic: plan.other_topic,
        ..BackfillReport::default()
    };
    info!(
        topic,
        open = plan.entries.len(),
        records = report.open_records,
        pending = plan.pending,
        other_topics = plan.other_topic,
        "shed ledger read"
    );
    if plan.other_topic > 0 {
        warn!(
            entries = plan.other_topic,
            topic, "open entries of other topics left alone: run a backfill with their config"
        );
    }
    if plan.entries.is_empty() {
        return Ok(report);
    }
    let consumer = kafka_reader::create_consumer(&config.kafka, brokers)?;
    if options.dry_run {
        let Plan {
            entries, partitions, ..
        } = plan;
        let topic = topic.to_string();
        let (entries, expired) = tokio::task::spawn_blocking(move || {
            let expired = expired_now(&consumer, &topic, &entries, &partitions);
            (entries, expired)
        })
        .await
        .context("the Kafka watermark thread failed")?;
        report.expired = expired?;
        report.open = entries;
        return Ok(report);
    }

    let run_id = uuid::Uuid::now_v7().to_string();
    let run = Run::new(config, catalog, idents, &run_id, report, &plan, options.progress);
    run.execute(plan, consumer).await
}

/// Offsets of the planned entries below their partition's low watermark.
fn expired_now(
    consumer: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    entries: &[ShedEntry],
    partitions: &[PartitionPlan],
) -> anyhow::Result<u64> {
    let mut expired = 0;
    for plan in partitions {
        let (low, _) = kafka_reader::watermarks(consumer, topic, plan.partition)?;
        let indices = plan.spans.iter().flat_map(|span| &span.entries);
        expired += indices
            .map(|&i| kafka_reader::count_below(&entries[i].offsets, low))
            .sum::<u64>();
    }
    Ok(expired)
}

async fn load_existing(catalog: &dyn Catalog, ident: &TableIdent) -> anyhow::Result<Table> {
    let exists = catalog
        .table_exists(ident)
        .await
        .with_context(|| format!("failed to look up table {ident}"))?;
    if !exists {
        bail!(
            "table {ident} does not exist in this catalog: has `k2 run` ever run against it \
             (check [catalog] uri and warehouse)?"
        );
    }
    catalog
        .load_table(ident)
        .await
        .with_context(|| format!("failed to load table {ident}"))
}

/// What a run found for one entry so far.
#[derive(Debug, Clone, Copy, Default)]
struct EntryCounts {
    committed: u64,
    present: u64,
    dead_letters: u64,
    expired: u64,
}

/// Trades read and not yet committed, all of one partition, and entries
/// read to the end whose closing rows wait for those trades' commit.
#[derive(Default)]
struct Batch {
    partition: i32,
    trades: Vec<(usize, Trade)>,
    /// Shed reference data, for `market.reference`.
    reference: Vec<(usize, ReferenceRecord)>,
    /// Shed records that do not decode (shed by key, before decoding).
    dead_letters: Vec<DeadLetter>,
    done: Vec<usize>,
}

/// What a batch of trades commits once deduplicated.
struct Selection {
    files: Vec<DataFile>,
    /// Per entry: (committed, present).
    counts: BTreeMap<usize, (u64, u64)>,
}

struct Run<'a> {
    config: &'a K2Config,
    catalog: Arc<dyn Catalog>,
    idents: TableIdents,
    committer: Committer,
    decoder: TradeDecoder,
    tracker: SequenceTracker,
    events: Vec<SequenceEvent>,
    counts: Vec<EntryCounts>,
    batch: Batch,
    /// Entries closed so far (to check the reader finished every one).
    closed: usize,
    /// Snapshot properties of every commit of this run.
    properties: HashMap<String, String>,
    progress: ProgressBar,
    report: BackfillReport,
}

impl<'a> Run<'a> {
    fn new(
        config: &'a K2Config,
        catalog: Arc<dyn Catalog>,
        idents: TableIdents,
        run_id: &str,
        report: BackfillReport,
        plan: &Plan,
        progress: bool,
    ) -> Self {
        let committer = Committer {
            catalog: catalog.clone(),
            idents: idents.clone(),
            topic: config.kafka.topic.clone(),
            writer_id: format!("backfill-{run_id}"),
            zstd_level: config.batcher.zstd_level,
        };
        let decoder = TradeDecoder::new(DecoderConfig {
            format: config.decode.format,
            max_event_time_skew_ms: config.decode.max_event_time_skew_ms,
            binance_exchange: config.decode.binance_exchange.clone(),
        });
        let progress = if progress && std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(report.open_records);
            bar.set_style(
                ProgressStyle::with_template("{spinner} backfill [{bar:30}] {pos}/{len} records {msg}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        } else {
            ProgressBar::hidden()
        };
        Self {
            config,
            catalog,
            idents,
            committer,
            decoder,
            tracker: SequenceTracker::new(config.sequence.clone()),
            events: Vec::new(),
            counts: vec![EntryCounts::default(); plan.entries.len()],
            batch: Batch::default(),
            closed: 0,
            properties: HashMap::from([(BACKFILL_RUN_KEY.to_string(), run_id.to_string())]),
            progress,
            report,
        }
    }

    async fn execute(
        mut self,
        plan: Plan,
        consumer: rdkafka::consumer::BaseConsumer,
    ) -> anyhow::Result<BackfillReport> {
        let entries: Arc<[ShedEntry]> = plan.entries.into();
        let partitions = plan.partitions;
        let (tx, mut rx) = mpsc::channel(READ_AHEAD_MESSAGES);
        let reader = ShedReader::new(consumer, &self.config.kafka.topic, KAFKA_IDLE_TIMEOUT);
        let thread = std::thread::Builder::new()
            .name("k2-backfill-kafka".into())
            .spawn({
                let entries = entries.clone();
                move || reader.run(&entries, &partitions, &tx)
            })
            .context("failed to start the Kafka reader thread")?;

        let result = async {
            while let Some(fetched) = rx.recv().await {
                self.handle(&entries, fetched?).await?;
            }
            anyhow::Ok(())
        }
        .await;
        // Closing the channel stops the reader at its next record.
        drop(rx);
        let joined = tokio::task::spawn_blocking(move || thread.join()).await;
        self.progress.finish_and_clear();
        result?;
        if !matches!(joined, Ok(Ok(()))) {
            bail!("the Kafka reader thread panicked");
        }
        if self.closed != entries.len() {
            bail!(
                "the Kafka reader stopped after {} of {} entries without an error",
                self.closed,
                entries.len()
            );
        }

        self.tracker.close_windows(&mut self.events);
        self.count_sequence_events();
        let mut report = self.report;
        report.open = entries.to_vec();
        info!(
            closed = report.entries_closed,
            committed = report.records_committed,
            present = report.records_present,
            dead_letters = report.dead_letters,
            expired = report.expired,
            sequence_gaps = report.sequence_gaps,
            "backfill done"
        );
        Ok(report)
    }

    async fn handle(&mut self, entries: &[ShedEntry], fetched: Fetched) -> anyhow::Result<()> {
        match fetched {
            Fetched::Records { partition, records } => {
                self.switch_partition(entries, partition).await?;
                self.progress.inc(records.len() as u64);
                for record in records {
                    self.decode(entries, partition, record);
                }
                self.count_sequence_events();
                if self.batch.trades.len() + self.batch.reference.len() >= FLUSH_RECORDS {
                    self.flush(entries).await?;
                }
            }
            Fetched::EntriesDone {
                partition,
                entries: read,
            } => {
                self.switch_partition(entries, partition).await?;
                for EntryRead {
                    entry,
                    delivered,
                    below_low_watermark,
                } in read
                {
                    let shed = &entries[entry];
                    let expired = shed.offsets.count().saturating_sub(delivered);
                    self.counts[entry].expired = expired;
                    self.progress.inc(expired);
                    if expired > 0 {
                        warn!(
                            entry = %shed.entry_id,
                            partition,
                            expired,
                            below_low_watermark,
                            skipped_inside_retention = expired.saturating_sub(below_low_watermark),
                            offsets = %shed.offsets,
                            "Kafka no longer holds offsets of a shed entry: those records cannot be backfilled"
                        );
                    }
                    self.batch.done.push(entry);
                }
            }
            Fetched::PartitionDone { partition } => {
                self.switch_partition(entries, partition).await?;
                self.flush(entries).await?;
            }
        }
        Ok(())
    }

    /// A batch holds one partition: commit what another left behind.
    async fn switch_partition(&mut self, entries: &[ShedEntry], partition: i32) -> anyhow::Result<()> {
        if self.batch.partition != partition {
            self.flush(entries).await?;
            self.batch.partition = partition;
        }
        Ok(())
    }

    fn decode(&mut self, entries: &[ShedEntry], partition: i32, record: FetchedRecord) {
        let shed = &entries[record.entry];
        let payload = record.payload.as_deref().unwrap_or_default();
        // The skew check is judged as at shedding time: a trade that was
        // current then is not rejected for being old now.
        match self
            .decoder
            .decode_record(payload, partition, record.offset, shed.recorded_at_us)
        {
            Ok(Record::Reference(reference)) => self.batch.reference.push((record.entry, reference)),
            Ok(Record::Trade(trade)) => {
                let at = RecordPosition {
                    partition,
                    offset: record.offset,
                    detected_at_us: now_us(),
                };
                self.tracker.observe(
                    &trade.exchange,
                    &trade.symbol,
                    trade.sequence,
                    at,
                    &mut self.events,
                );
                self.batch.trades.push((record.entry, trade));
            }
            Err(err) => {
                // Shed by its key before it was decoded, or [decode] changed
                // since: either way it goes to k2.dead_letters, as the
                // pipeline would have sent it.
                self.counts[record.entry].dead_letters += 1;
                self.report.dead_letters += 1;
                if self.report.dead_letters <= MAX_LOGGED_DEAD_LETTERS {
                    warn!(
                        entry = %shed.entry_id,
                        partition,
                        offset = record.offset,
                        reason = %err,
                        "a shed record does not decode; it goes to the dead letters"
                    );
                }
                self.batch.dead_letters.push(DeadLetter {
                    topic: shed.topic.clone(),
                    partition,
                    offset: record.offset,
                    raw: payload.to_vec(),
                    reason: err.to_string(),
                    dead_lettered_at_us: now_us(),
                });
            }
        }
    }

    fn count_sequence_events(&mut self) {
        for event in self.events.drain(..) {
            match event {
                SequenceEvent::Gap(_) => self.report.sequence_gaps += 1,
                SequenceEvent::Reset(_) => self.report.sequence_resets += 1,
            }
        }
    }

    /// Commits the batch's trades the table does not hold yet, then closes
    /// the entries read to the end.
    async fn flush(&mut self, entries: &[ShedEntry]) -> anyhow::Result<()> {
        let partition = self.batch.partition;
        let trades = std::mem::take(&mut self.batch.trades);
        let reference = std::mem::take(&mut self.batch.reference);
        let dead_letters = std::mem::take(&mut self.batch.dead_letters);
        let done = std::mem::take(&mut self.batch.done);
        if !trades.is_empty() {
            self.commit_trades(partition, &trades).await?;
        }
        if !reference.is_empty() {
            self.commit_reference(partition, reference).await?;
        }
        if !dead_letters.is_empty() {
            self.commit_dead_letters(partition, dead_letters).await?;
        }
        if !done.is_empty() {
            self.close(entries, &done).await?;
        }
        Ok(())
    }

    async fn commit_trades(&mut self, partition: i32, trades: &[(usize, Trade)]) -> anyhow::Result<()> {
        let wanted: HashSet<TradeKey> = trades.iter().map(|(_, trade)| trade_key(trade)).collect();
        let mut table = self.load(&self.idents.trades).await?;
        let mut selection = self.select(&table, partition, trades, &wanted).await?;
        let mut attempts = 0;
        while !selection.files.is_empty() {
            attempts += 1;
            match self
                .committer
                .append_keeping_offsets(&table, selection.files.clone(), &self.properties)
                .await
            {
                Ok(_) => break,
                Err(err) if err.is_fence() && attempts < MAX_COMMIT_ATTEMPTS => {
                    let current = self.load(&self.idents.trades).await?;
                    let rescan = !only_pipeline_commits_since(&table, &current);
                    table = current;
                    if rescan {
                        // Another backfill (or history this run cannot see)
                        // committed since the scan: it may hold these trades.
                        // The files written for the old selection stay
                        // orphans that no snapshot names.
                        info!(
                            partition,
                            "the trades table moved under another backfill, deduplicating again"
                        );
                        selection = self.select(&table, partition, trades, &wanted).await?;
                    }
                }
                Err(err) if err.is_fence() => bail!(
                    "lost the commit race on {} {attempts} times in a row while committing backfilled \
                     trades of partition {partition}; nothing of this batch was committed, rerun the backfill",
                    self.idents.trades
                ),
                Err(err) => {
                    return Err(err).with_context(|| {
                        format!(
                            "failed to commit backfilled trades of partition {partition} to {}",
                            self.idents.trades
                        )
                    });
                }
            }
        }
        let (mut committed, mut present) = (0, 0);
        for (entry, (c, p)) in selection.counts {
            self.counts[entry].committed += c;
            self.counts[entry].present += p;
            committed += c;
            present += p;
        }
        self.report.records_committed += committed;
        self.report.records_present += present;
        metrics::counter!(m::BACKFILL_RECORDS, "outcome" => "committed").increment(committed);
        metrics::counter!(m::BACKFILL_RECORDS, "outcome" => "present").increment(present);
        info!(partition, committed, present, "backfilled trades committed");
        Ok(())
    }

    /// Appends shed reference data to `market.reference`, leaving out the
    /// positions it holds already (a rerun, or records committed after all),
    /// with its offsets summary carried forward.
    async fn commit_reference(
        &mut self,
        partition: i32,
        rows: Vec<(usize, ReferenceRecord)>,
    ) -> anyhow::Result<()> {
        let ident = self.idents.reference.clone();
        let table = self.load(&ident).await?;
        let mut held: HashSet<(i32, i64)> = scan_reference_positions(&table)
            .await
            .with_context(|| format!("failed to read {ident}"))?
            .into_iter()
            .filter(|(p, _)| *p == partition)
            .collect();
        let mut new_rows = Vec::with_capacity(rows.len());
        for (entry, row) in rows {
            if held.insert((row.partition, row.offset)) {
                self.counts[entry].committed += 1;
                new_rows.push(row);
            } else {
                self.counts[entry].present += 1;
                self.report.records_present += 1;
            }
        }
        if new_rows.is_empty() {
            return Ok(());
        }
        self.append_rows(&ident, &table, |schema| reference_batch(&new_rows, schema))
            .await
            .with_context(|| format!("failed to commit {} reference records to {ident}", new_rows.len()))?;
        let committed = new_rows.len() as u64;
        self.report.records_committed += committed;
        metrics::counter!(m::BACKFILL_RECORDS, "outcome" => "committed").increment(committed);
        info!(
            partition,
            reference = committed,
            "backfilled reference data committed"
        );
        Ok(())
    }

    /// Appends the shed records that do not decode to `k2.dead_letters`,
    /// leaving out offsets it holds already (a rerun after a crash before
    /// the closing rows), with its offsets summary carried forward.
    async fn commit_dead_letters(&mut self, partition: i32, rows: Vec<DeadLetter>) -> anyhow::Result<()> {
        let ident = self.idents.dead_letters.clone();
        let table = self.load(&ident).await?;
        let held: HashSet<(i32, i64)> = scan_dead_letters(&table)
            .await
            .with_context(|| format!("failed to read {ident}"))?
            .into_iter()
            .map(|row| (row.partition, row.offset))
            .collect();
        let rows: Vec<DeadLetter> = rows
            .into_iter()
            .filter(|row| !held.contains(&(row.partition, row.offset)))
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        self.append_rows(&ident, &table, |schema| dead_letter_batch(&rows, schema))
            .await
            .with_context(|| format!("failed to commit {} dead letters to {ident}", rows.len()))?;
        info!(
            partition,
            dead_letters = rows.len(),
            "shed records that do not decode dead-lettered"
        );
        Ok(())
    }

    /// Drops the trades `table` holds already (or this batch holds twice)
    /// and writes the rest as data files.
    async fn select(
        &self,
        table: &Table,
        partition: i32,
        trades: &[(usize, Trade)],
        wanted: &HashSet<TradeKey>,
    ) -> anyhow::Result<Selection> {
        // Iceberg skips the files of other partitions by their column stats.
        let filter = Reference::new("kafka_partition").equal_to(Datum::int(partition));
        let present = find_trade_keys(table, filter, wanted).await.with_context(|| {
            format!(
                "failed to scan {} for trades of partition {partition}",
                self.idents.trades
            )
        })?;
        let mut seen = HashSet::with_capacity(trades.len());
        let mut builder = TradeBatchBuilder::with_capacity(trades.len().saturating_sub(present.len()));
        let mut counts: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
        for (entry, trade) in trades {
            let key = trade_key(trade);
            let count = counts.entry(*entry).or_default();
            if present.contains(&key) || !seen.insert(key) {
                count.1 += 1;
            } else {
                builder.push(trade);
                count.0 += 1;
            }
        }
        let mut files = Vec::new();
        if !builder.is_empty() {
            let writer = TableWriter::new(
                table,
                self.config.batcher.zstd_level,
                self.config.batcher.target_file_size_bytes,
            )?;
            let batch = builder.finish(writer.arrow_schema())?;
            files = writer
                .write(batch)
                .await
                .with_context(|| format!("failed to write data files for {}", self.idents.trades))?;
        }
        Ok(Selection { files, counts })
    }

    /// Appends a `"backfilled"` row for each of `done` to the ledger.
    async fn close(&mut self, entries: &[ShedEntry], done: &[usize]) -> anyhow::Result<()> {
        let now = now_us();
        let mut outcomes = Vec::with_capacity(done.len());
        let mut rows = Vec::with_capacity(done.len());
        for &i in done {
            let (shed, counts) = (&entries[i], self.counts[i]);
            let outcome = EntryOutcome {
                entry_id: shed.entry_id.clone(),
                partition: shed.partition,
                records: shed.offsets.count(),
                committed: counts.committed,
                present: counts.present,
                dead_letters: counts.dead_letters,
                expired: counts.expired,
            };
            rows.push(ShedEntry {
                entry_id: shed.entry_id.clone(),
                action: LedgerAction::Backfilled,
                topic: shed.topic.clone(),
                partition: shed.partition,
                offsets: shed.offsets.clone(),
                records: counts.committed,
                priority: shed.priority,
                level: shed.level,
                detail: Some(outcome.detail()),
                recorded_at_us: now,
            });
            outcomes.push(outcome);
        }
        let table = self.load(&self.idents.shed_ledger).await?;
        self.append_rows(&self.idents.shed_ledger, &table, |schema| {
            shed_ledger_batch(&rows, schema)
        })
        .await
        .with_context(|| {
            format!(
                "failed to close {} entries in {} (their trades are committed; a rerun closes them)",
                rows.len(),
                self.idents.shed_ledger
            )
        })?;

        let (mut dead_letters, mut expired) = (0, 0);
        for outcome in &outcomes {
            dead_letters += outcome.dead_letters;
            expired += outcome.expired;
            if outcome.dead_letters > 0 {
                error!(
                    entry = %outcome.entry_id,
                    partition = outcome.partition,
                    dead_letters = outcome.dead_letters,
                    "entry closed with records that no longer decode"
                );
            }
        }
        self.report.expired += expired;
        self.report.entries_closed += rows.len() as u64;
        self.closed += rows.len();
        self.report.closed.extend(outcomes);
        metrics::counter!(m::BACKFILL_RECORDS, "outcome" => "dead_letter").increment(dead_letters);
        metrics::counter!(m::BACKFILL_RECORDS, "outcome" => "expired").increment(expired);
        info!(entries = rows.len(), "shed entries closed");
        Ok(())
    }

    /// Writes the rows `batch` builds (for the table's Arrow schema) as data
    /// files of `table` and appends them, carrying its offsets summary
    /// forward.
    async fn append_rows(
        &self,
        ident: &TableIdent,
        table: &Table,
        batch: impl FnOnce(&arrow_schema::SchemaRef) -> Result<arrow_array::RecordBatch, arrow_schema::ArrowError>,
    ) -> anyhow::Result<()> {
        let writer = TableWriter::new(
            table,
            self.config.batcher.zstd_level,
            self.config.batcher.target_file_size_bytes,
        )?;
        let files = writer
            .write(batch(writer.arrow_schema())?)
            .await
            .with_context(|| format!("failed to write data files for {ident}"))?;
        self.committer
            .append_keeping_offsets_retrying(ident, files, &self.properties)
            .await?;
        Ok(())
    }

    async fn load(&self, ident: &TableIdent) -> anyhow::Result<Table> {
        self.catalog
            .load_table(ident)
            .await
            .with_context(|| format!("failed to load table {ident}"))
    }
}

fn trade_key(trade: &Trade) -> TradeKey {
    (
        trade.exchange.to_string(),
        trade.symbol.to_string(),
        trade.trade_id.to_string(),
    )
}

/// Whether every snapshot `current` added after `base` is a pipeline commit
/// (no [`BACKFILL_RUN_KEY`]). A pipeline commit only adds offsets at or past
/// the ones the table recorded when this run planned, so it cannot hold the
/// records being backfilled. A history this cannot follow (an expired
/// snapshot) answers no.
fn only_pipeline_commits_since(base: &Table, current: &Table) -> bool {
    let stop = base.metadata().current_snapshot_id();
    let metadata = current.metadata();
    let mut next = metadata.current_snapshot_id();
    while next != stop {
        let Some(snapshot) = next.and_then(|id| metadata.snapshot_by_id(id)) else {
            return false;
        };
        if snapshot
            .summary()
            .additional_properties
            .contains_key(BACKFILL_RUN_KEY)
        {
            return false;
        }
        next = snapshot.parent_snapshot_id();
    }
    true
}

/// Prints a report for the command line: the summary on stdout, and the
/// entries that lost records on stderr.
pub fn print_report(report: &BackfillReport) {
    const LISTED: usize = 50;
    if report.dry_run {
        for entry in report.open.iter().take(LISTED) {
            println!(
                "  {}  partition {}  offsets {}  records {}  {}  shed at {}",
                entry.entry_id,
                entry.partition,
                entry.offsets,
                entry.offsets.count(),
                entry.priority,
                entry.level
            );
        }
        if report.open.len() > LISTED {
            println!("  ... and {} more", report.open.len() - LISTED);
        }
    }
    println!("k2 backfill: {report}");
    let lossy = report
        .closed
        .iter()
        .filter(|o| o.expired > 0 || o.dead_letters > 0);
    for outcome in lossy.take(LISTED) {
        eprintln!(
            "k2 backfill: warning: entry {} (partition {}): {} of {} records expired from Kafka, {} dead letters",
            outcome.entry_id, outcome.partition, outcome.expired, outcome.records, outcome.dead_letters
        );
    }
    if report.expired > 0 && !report.dry_run {
        eprintln!(
            "k2 backfill: warning: {} shed records are gone from Kafka and cannot be backfilled",
            report.expired
        );
    }
    if report.dead_letters > 0 {
        eprintln!(
            "k2 backfill: warning: {} shed records no longer decode (see the log for offsets and reasons)",
            report.dead_letters
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::degradation::DegradationLevel;
    use crate::shedding::Priority;

    fn row(action: LedgerAction, partition: i32, offsets: &str, recorded_at_us: i64) -> ShedEntry {
        let offsets: OffsetRanges = offsets.parse().unwrap();
        let first = offsets.first().unwrap();
        ShedEntry {
            entry_id: ShedEntry::entry_id("t", partition, first, Priority::Normal),
            action,
            topic: "t".into(),
            partition,
            records: offsets.count(),
            offsets,
            priority: Priority::Normal,
            level: DegradationLevel::Aggressive,
            detail: None,
            recorded_at_us,
        }
    }

    fn ids(entries: &[ShedEntry]) -> Vec<&str> {
        entries.iter().map(|e| e.entry_id.as_str()).collect()
    }

    #[test]
    fn an_entry_closed_by_a_backfilled_row_is_not_open_whatever_the_row_order() {
        let open = open_entries(vec![
            row(LedgerAction::Backfilled, 0, "10-19", 5),
            row(LedgerAction::Shed, 0, "10-19", 1),
            row(LedgerAction::Shed, 0, "30-39", 2),
            row(LedgerAction::Shed, 1, "10-19", 3),
        ]);
        assert_eq!(ids(&open), vec!["t/0/30/NORMAL", "t/1/10/NORMAL"]);
    }

    #[test]
    fn an_entry_written_twice_is_open_once_with_the_union_of_its_offsets() {
        let open = open_entries(vec![
            row(LedgerAction::Shed, 0, "10-12,20", 7),
            row(LedgerAction::Shed, 0, "10-12,20", 9),
            row(LedgerAction::Shed, 0, "10,13-14,21", 3),
        ]);
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].offsets.to_string(), "10-14,20-21");
        assert_eq!(open[0].records, 7);
        assert_eq!(open[0].recorded_at_us, 3, "the earliest shedding time is kept");
    }

    #[test]
    fn a_backfill_closes_only_the_offsets_it_handled_of_an_entry_a_replay_widened() {
        // The first epoch shed 100-105 and the backfill handled those; the
        // replayed epoch cut its chunks differently and shed 100-110 under
        // the same entry id. 106-110 are still to backfill.
        let open = open_entries(vec![
            row(LedgerAction::Shed, 0, "100-105", 1),
            row(LedgerAction::Backfilled, 0, "100-105", 5),
            row(LedgerAction::Shed, 0, "100-110", 3),
        ]);
        assert_eq!(open.len(), 1, "{open:?}");
        assert_eq!(open[0].offsets.to_string(), "106-110");
        assert_eq!(open[0].records, 5);
        assert_eq!(open[0].entry_id, "t/0/100/NORMAL", "the entry keeps its id");
        // Once those are backfilled too, nothing is open.
        let open = open_entries(vec![
            row(LedgerAction::Shed, 0, "100-105", 1),
            row(LedgerAction::Backfilled, 0, "100-105", 5),
            row(LedgerAction::Shed, 0, "100-110", 3),
            row(LedgerAction::Backfilled, 0, "106-110", 8),
        ]);
        assert!(open.is_empty(), "{open:?}");
    }

    #[test]
    fn open_entries_are_sorted_by_partition_then_offset() {
        let open = open_entries(vec![
            row(LedgerAction::Shed, 2, "5", 0),
            row(LedgerAction::Shed, 0, "300", 0),
            row(LedgerAction::Shed, 0, "40-41", 0),
        ]);
        assert_eq!(
            ids(&open),
            vec!["t/0/40/NORMAL", "t/0/300/NORMAL", "t/2/5/NORMAL"]
        );
    }

    #[test]
    fn only_entries_below_the_tables_recorded_offset_are_planned() {
        let mut recorded = TopicOffsets::default();
        recorded.set(0, 100, "w");
        let mut other = row(LedgerAction::Shed, 0, "1-5", 0);
        other.topic = "elsewhere".into();
        let plan = Plan::new(
            vec![
                row(LedgerAction::Shed, 0, "10-20", 0),
                row(LedgerAction::Shed, 0, "90-99", 0),
                // Its epoch is not committed yet: the pipeline replays it.
                row(LedgerAction::Shed, 0, "95-100", 0),
                // A partition the table has never committed.
                row(LedgerAction::Shed, 3, "1-2", 0),
                other,
            ],
            "t",
            &recorded,
        );
        assert_eq!(ids(&plan.entries), vec!["t/0/10/NORMAL", "t/0/90/NORMAL"]);
        assert_eq!((plan.pending, plan.other_topic), (2, 1));
        assert_eq!(plan.records(), 21);
        assert_eq!(plan.partitions.len(), 1);
        assert_eq!(plan.partitions[0].spans.len(), 2);
    }

    #[test]
    fn outcome_detail_says_what_the_backfill_found() {
        let outcome = EntryOutcome {
            committed: 120,
            present: 3,
            dead_letters: 1,
            expired: 4,
            ..EntryOutcome::default()
        };
        assert_eq!(
            outcome.detail(),
            "committed 120, already present 3, dead letters 1, expired 4"
        );
    }
}
