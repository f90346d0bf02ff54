//! Reading shed offsets back from Kafka, on a thread of its own.
//!
//! A plain `BaseConsumer` with no group subscription: each partition is
//! assigned at the offset to read, so nothing joins (or disturbs) the
//! pipeline's consumer group and no offset is committed anywhere. Entries
//! whose offset ranges overlap (one chunk shed at two priorities) are read
//! together in one pass, a [`Span`]; every record goes to each entry whose
//! offsets hold it, and the rest are skipped.
//!
//! Offsets an entry names that Kafka does not deliver are *expired*: below
//! the low watermark (retention or `DeleteRecords` removed them), or skipped
//! inside the retained range (compaction, aborted transactions). Reading
//! never waits forever: a partition that delivers nothing for the idle
//! timeout is an error that names the partition, offsets and entry.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::config::KafkaConfig;
use crate::shedding::{OffsetRanges, ShedEntry};

/// Records per [`Fetched::Records`] message.
const RECORDS_PER_MESSAGE: usize = 5_000;
/// How far ahead of the next entry the consumer may be and keep reading
/// (discarding what lies between) rather than seek.
const MAX_SKIP_AHEAD: i64 = 10_000;
const POLL_INTERVAL: Duration = Duration::from_millis(200);
const WATERMARKS_TIMEOUT: Duration = Duration::from_secs(10);
/// Times in a row one span may find its next offset deleted under it
/// (retention running while backfill reads) before giving up.
const MAX_OUT_OF_RANGE: u32 = 5;

/// What the reader thread sends, in order: the records of a partition's
/// entries, each entry once every offset of it was read or found gone, then
/// the partition's end.
#[derive(Debug)]
pub enum Fetched {
    Records {
        partition: i32,
        records: Vec<FetchedRecord>,
    },
    EntriesDone {
        partition: i32,
        entries: Vec<EntryRead>,
    },
    PartitionDone {
        partition: i32,
    },
}

/// One Kafka record of one entry.
#[derive(Debug)]
pub struct FetchedRecord {
    /// Index of the entry in the plan.
    pub entry: usize,
    pub offset: i64,
    /// None for a record without a value (it decodes as an empty payload).
    pub payload: Option<Vec<u8>>,
}

/// How much of an entry Kafka delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRead {
    pub entry: usize,
    /// Offsets of the entry Kafka delivered.
    pub delivered: u64,
    /// Offsets of the entry below the partition's low watermark.
    pub below_low_watermark: u64,
}

/// The entries of one partition to read, in offset order.
#[derive(Debug, Clone)]
pub struct PartitionPlan {
    pub partition: i32,
    /// Entries without offsets (nothing to read; reported done at once).
    pub empty: Vec<usize>,
    pub spans: Vec<Span>,
}

/// Entries whose offset ranges overlap, read in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub first: i64,
    pub last: i64,
    pub entries: Vec<usize>,
}

impl PartitionPlan {
    /// Groups `indices` (entries of `partition`, any order) into spans.
    pub fn new(partition: i32, entries: &[ShedEntry], mut indices: Vec<usize>) -> Self {
        indices.sort_by_key(|&i| (entries[i].offsets.first(), i));
        let mut plan = PartitionPlan {
            partition,
            empty: Vec::new(),
            spans: Vec::new(),
        };
        for i in indices {
            let (Some(first), Some(last)) = (entries[i].offsets.first(), entries[i].offsets.last()) else {
                plan.empty.push(i);
                continue;
            };
            match plan.spans.last_mut() {
                Some(span) if first <= span.last => {
                    span.last = span.last.max(last);
                    span.entries.push(i);
                }
                _ => plan.spans.push(Span {
                    first,
                    last,
                    entries: vec![i],
                }),
            }
        }
        plan
    }
}

/// Builds the consumer: `[kafka]`'s client properties, no group
/// subscription, no offset commits, out-of-range offsets reported (never
/// reset), end of partition reported.
pub fn create_consumer(config: &KafkaConfig, brokers: &str) -> anyhow::Result<BaseConsumer> {
    let mut client = ClientConfig::new();
    for (key, value) in &config.client {
        client.set(key, value);
    }
    client
        .set("bootstrap.servers", brokers)
        // Never used to join the group (partitions are assigned, not
        // subscribed) nor to commit; a distinct name keeps it apart anyway.
        .set("group.id", format!("{}.backfill", config.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "error")
        .set("enable.partition.eof", "true");
    if !config.client.contains_key("queued.max.messages.kbytes") {
        client.set("queued.max.messages.kbytes", "16384");
    }
    client
        .create()
        .with_context(|| format!("failed to create a Kafka consumer for brokers {brokers}"))
}

/// Low and high watermarks of `partition`.
pub fn watermarks(consumer: &BaseConsumer, topic: &str, partition: i32) -> anyhow::Result<(i64, i64)> {
    consumer
        .fetch_watermarks(topic, partition, WATERMARKS_TIMEOUT)
        .with_context(|| format!("failed to read the watermarks of partition {partition} of topic {topic}"))
}

/// Offsets of `offsets` below `low`.
pub fn count_below(offsets: &OffsetRanges, low: i64) -> u64 {
    offsets
        .ranges()
        .iter()
        .filter(|(first, _)| *first < low)
        .map(|(first, last)| ((*last).min(low - 1) - first + 1) as u64)
        .sum()
}

/// Reads every planned partition and sends what it finds to `out`; an error
/// is sent as the last message. Blocking: run it on its own thread.
pub struct ShedReader {
    consumer: BaseConsumer,
    topic: String,
    idle_timeout: Duration,
    /// The next offset the consumer delivers in the current partition.
    next: Option<i64>,
    /// A record read past the end of the previous span, kept for the next.
    carried: Option<(i64, Option<Vec<u8>>)>,
}

/// Where the reader sends; a closed channel means the backfill gave up.
struct Outbox<'a>(&'a mpsc::Sender<anyhow::Result<Fetched>>);

impl Outbox<'_> {
    fn send(&self, fetched: Fetched) -> anyhow::Result<()> {
        self.0
            .blocking_send(Ok(fetched))
            .map_err(|_| anyhow::anyhow!("the backfill stopped reading"))
    }

    fn closed(&self) -> bool {
        self.0.is_closed()
    }
}

impl ShedReader {
    pub fn new(consumer: BaseConsumer, topic: &str, idle_timeout: Duration) -> Self {
        Self {
            consumer,
            topic: topic.to_string(),
            idle_timeout,
            next: None,
            carried: None,
        }
    }

    pub fn run(
        mut self,
        entries: &[ShedEntry],
        plans: &[PartitionPlan],
        out: &mpsc::Sender<anyhow::Result<Fetched>>,
    ) {
        let outbox = Outbox(out);
        for plan in plans {
            if let Err(err) = self.read_partition(entries, plan, &outbox) {
                if !outbox.closed() {
                    let _ = out.blocking_send(Err(err));
                }
                return;
            }
        }
    }

    fn read_partition(
        &mut self,
        entries: &[ShedEntry],
        plan: &PartitionPlan,
        out: &Outbox<'_>,
    ) -> anyhow::Result<()> {
        let partition = plan.partition;
        self.next = None;
        self.carried = None;
        if !plan.empty.is_empty() {
            let done = plan
                .empty
                .iter()
                .map(|&entry| EntryRead {
                    entry,
                    delivered: 0,
                    below_low_watermark: 0,
                })
                .collect();
            out.send(Fetched::EntriesDone {
                partition,
                entries: done,
            })?;
        }
        let mut marks = watermarks(&self.consumer, &self.topic, partition)?;
        for span in &plan.spans {
            if span.last >= marks.1 {
                marks = watermarks(&self.consumer, &self.topic, partition)?;
                if span.last >= marks.1 {
                    bail!(
                        "entry {}: offset {} is past the end of partition {partition} of topic {} \
                         (high watermark {}): Kafka never held it; is this the cluster and topic the \
                         pipeline read?",
                        entries[span.entries[0]].entry_id,
                        span.last,
                        self.topic,
                        marks.1
                    );
                }
            }
            let mut delivered = vec![0u64; span.entries.len()];
            marks.0 = self.read_span(entries, partition, span, marks.0, &mut delivered, out)?;
            let done = span
                .entries
                .iter()
                .zip(delivered)
                .map(|(&entry, delivered)| EntryRead {
                    entry,
                    delivered,
                    below_low_watermark: count_below(&entries[entry].offsets, marks.0),
                })
                .collect();
            out.send(Fetched::EntriesDone {
                partition,
                entries: done,
            })?;
        }
        out.send(Fetched::PartitionDone { partition })
    }

    /// Reads `span` from `max(first, low)` through its last offset, sending
    /// the entries' records. Returns the low watermark as last seen.
    fn read_span(
        &mut self,
        entries: &[ShedEntry],
        partition: i32,
        span: &Span,
        mut low: i64,
        delivered: &mut [u64],
        out: &Outbox<'_>,
    ) -> anyhow::Result<i64> {
        let first_entry = &entries[span.entries[0]].entry_id;
        let mut records = Vec::new();
        // The lowest offset of the span still to read.
        let mut want = span.first.max(low);
        if let Some((offset, payload)) = self.carried.take() {
            if offset > span.last {
                // Kafka skipped this whole span.
                self.carried = Some((offset, payload));
                return Ok(low);
            }
            if offset >= want {
                route(entries, span, offset, payload, delivered, &mut records);
                want = offset + 1;
            }
        }
        if want > span.last {
            flush_records(partition, &mut records, out)?;
            return Ok(low);
        }
        let keep_reading = self
            .next
            .is_some_and(|next| next <= want && want - next <= MAX_SKIP_AHEAD);
        if !keep_reading {
            self.assign(partition, want)?;
        }
        // Whether the consumer was positioned during this span. Only then
        // does an end-of-partition event prove something about the span: one
        // queued earlier (the consumer caught up with an older high
        // watermark) says nothing about offsets produced since.
        let mut positioned = !keep_reading;
        let mut idle_since = Instant::now();
        let mut last_error: Option<KafkaError> = None;
        let mut out_of_range = 0;
        while want <= span.last {
            if out.closed() {
                bail!("the backfill stopped reading");
            }
            match self.consumer.poll(POLL_INTERVAL) {
                None => {}
                Some(Ok(message)) => {
                    idle_since = Instant::now();
                    last_error = None;
                    out_of_range = 0;
                    if message.partition() != partition {
                        continue;
                    }
                    let offset = message.offset();
                    self.next = Some(offset + 1);
                    if offset < want {
                        continue;
                    }
                    let payload = message.payload().map(<[u8]>::to_vec);
                    if offset > span.last {
                        self.carried = Some((offset, payload));
                        break;
                    }
                    route(entries, span, offset, payload, delivered, &mut records);
                    want = offset + 1;
                    if records.len() >= RECORDS_PER_MESSAGE {
                        flush_records(partition, &mut records, out)?;
                    }
                    continue;
                }
                Some(Err(KafkaError::PartitionEOF(p))) if p == partition && !positioned => {
                    self.assign(partition, want)?;
                    positioned = true;
                    idle_since = Instant::now();
                    continue;
                }
                Some(Err(KafkaError::PartitionEOF(p))) if p == partition => {
                    // Caught up with a high watermark at least as high as the
                    // one past the span when it started: every record below
                    // it was delivered, so what is left of the span is not
                    // held (compaction, aborted transactions).
                    let marks = watermarks(&self.consumer, &self.topic, partition)?;
                    low = marks.0;
                    if marks.1 > span.last {
                        debug!(
                            partition,
                            want,
                            last = span.last,
                            "end of partition before the span's end"
                        );
                        self.next = Some(marks.1);
                        break;
                    }
                    bail!(
                        "partition {partition} of topic {} ends at offset {} but entry {first_entry} \
                         runs to offset {}",
                        self.topic,
                        marks.1,
                        span.last
                    );
                }
                Some(Err(err)) if is_out_of_range(&err) => {
                    out_of_range += 1;
                    if out_of_range > MAX_OUT_OF_RANGE {
                        bail!(
                            "partition {partition} of topic {}: offset {want} of entry {first_entry} is out \
                             of range {out_of_range} times in a row: {err}",
                            self.topic
                        );
                    }
                    low = watermarks(&self.consumer, &self.topic, partition)?.0;
                    warn!(
                        partition,
                        offset = want,
                        low_watermark = low,
                        entry = %first_entry,
                        "Kafka deleted offsets while backfill was reading them"
                    );
                    want = want.max(low);
                    if want > span.last {
                        break;
                    }
                    self.assign(partition, want)?;
                    positioned = true;
                    idle_since = Instant::now();
                    continue;
                }
                Some(Err(err)) => {
                    // librdkafka retries transient broker trouble itself; the
                    // idle timeout bounds how long that may take.
                    debug!(partition, error = %err, "kafka error while reading shed offsets");
                    last_error = Some(err);
                }
            }
            if idle_since.elapsed() >= self.idle_timeout {
                let cause = last_error.map_or_else(String::new, |err| format!(" (last error: {err})"));
                bail!(
                    "timed out after {:?} waiting for offset {want} of partition {partition} of topic {} \
                     (entry {first_entry}, which runs to offset {}){cause}",
                    self.idle_timeout,
                    self.topic,
                    span.last
                );
            }
        }
        flush_records(partition, &mut records, out)?;
        Ok(low)
    }

    fn assign(&mut self, partition: i32, offset: i64) -> anyhow::Result<()> {
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&self.topic, partition, Offset::Offset(offset))
            .with_context(|| format!("failed to position partition {partition} at offset {offset}"))?;
        self.consumer
            .assign(&assignment)
            .with_context(|| format!("failed to assign partition {partition} of topic {}", self.topic))?;
        self.next = Some(offset);
        self.carried = None;
        Ok(())
    }
}

/// Hands the record at `offset` to every entry of `span` whose offsets hold it.
fn route(
    entries: &[ShedEntry],
    span: &Span,
    offset: i64,
    payload: Option<Vec<u8>>,
    delivered: &mut [u64],
    records: &mut Vec<FetchedRecord>,
) {
    let holds = |entry: usize| entries[entry].offsets.contains(offset);
    // The same offset in two entries is rare (a replayed epoch shed it under
    // another entry id); only then is the payload copied.
    let mut holders_left = span.entries.iter().filter(|&&entry| holds(entry)).count();
    let mut payload = Some(payload);
    for (slot, &entry) in span.entries.iter().enumerate() {
        if !holds(entry) {
            continue;
        }
        holders_left -= 1;
        delivered[slot] += 1;
        let payload = if holders_left == 0 {
            payload.take().flatten()
        } else {
            payload.clone().flatten()
        };
        records.push(FetchedRecord {
            entry,
            offset,
            payload,
        });
    }
}

fn flush_records(partition: i32, records: &mut Vec<FetchedRecord>, out: &Outbox<'_>) -> anyhow::Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    out.send(Fetched::Records {
        partition,
        records: std::mem::take(records),
    })
}

fn is_out_of_range(err: &KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(RDKafkaErrorCode::OffsetOutOfRange) | Some(RDKafkaErrorCode::AutoOffsetReset)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::degradation::DegradationLevel;
    use crate::shedding::{LedgerAction, Priority};

    fn entry(offsets: &str) -> ShedEntry {
        let offsets: OffsetRanges = offsets.parse().unwrap();
        ShedEntry {
            entry_id: format!("t/0/{}/LOW", offsets.first().unwrap_or_default()),
            action: LedgerAction::Shed,
            topic: "t".into(),
            partition: 0,
            offsets,
            records: 0,
            priority: Priority::Low,
            level: DegradationLevel::Graceful,
            detail: None,
            recorded_at_us: 0,
        }
    }

    #[test]
    fn overlapping_entries_share_a_span_and_disjoint_ones_do_not() {
        let entries = vec![
            entry("200-210"),
            entry("100,102,104"),
            entry("101,103"),
            entry(""),
        ];
        let plan = PartitionPlan::new(0, &entries, vec![0, 1, 2, 3]);
        assert_eq!(plan.empty, vec![3]);
        assert_eq!(
            plan.spans,
            vec![
                Span {
                    first: 100,
                    last: 104,
                    entries: vec![1, 2]
                },
                Span {
                    first: 200,
                    last: 210,
                    entries: vec![0]
                },
            ]
        );
    }

    #[test]
    fn offsets_below_the_low_watermark_are_counted_per_range() {
        let offsets: OffsetRanges = "10-19,30,40-49".parse().unwrap();
        assert_eq!(count_below(&offsets, 0), 0);
        assert_eq!(count_below(&offsets, 15), 5);
        assert_eq!(count_below(&offsets, 31), 11);
        assert_eq!(count_below(&offsets, 45), 16);
        assert_eq!(count_below(&offsets, 1_000), 21);
    }
}
