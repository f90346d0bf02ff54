//! The Kafka consumer group: client configuration, the rebalance callback
//! that seeks each assigned partition to the offset recorded in Iceberg, and
//! the driver thread that serves the group protocol.
//!
//! Every assigned partition gets its own queue (`split_partition_queue`) read
//! by its lane. The queues are split inside the rebalance callback, before
//! the assignment takes effect, so no record of an assigned partition can
//! reach the consumer's main queue. The start offsets come from the table
//! (never from Kafka's committed offsets) and are set in the assignment
//! itself, so fetching starts exactly there.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use actix::Recipient;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::config::{KafkaConfig, StartFrom};
use crate::messages::{LoadOffsets, PartitionsAssigned, PartitionsRevoked, StrayRecord};
use crate::metrics as m;
use crate::supervision::{PartitionControl, RetentionLimits};

pub type KafkaConsumer = BaseConsumer<K2ConsumerContext>;

/// A partition's record queue, read by its lane, with a wake-up signal that
/// fires when the queue becomes non-empty.
pub struct LaneQueue {
    pub partition: i32,
    pub queue: PartitionQueue<K2ConsumerContext>,
    pub ready: Arc<Notify>,
}

/// Each assigned partition's record queue, split in the rebalance callback
/// before the assignment takes effect; a lane takes its partition's queue
/// when it starts. Revoked partitions' queues leave once their lanes stopped.
#[derive(Clone, Default)]
pub struct LaneQueues(Arc<Mutex<HashMap<i32, Arc<LaneQueue>>>>);

impl LaneQueues {
    pub fn get(&self, partition: i32) -> Option<Arc<LaneQueue>> {
        self.lock().get(&partition).cloned()
    }

    fn insert(&self, queue: Arc<LaneQueue>) {
        self.lock().insert(queue.partition, queue);
    }

    fn remove(&self, partitions: &[i32]) {
        let mut queues = self.lock();
        for partition in partitions {
            queues.remove(partition);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Arc<LaneQueue>>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Where the rebalance callback sends its news.
pub struct GroupListeners {
    pub offsets: Recipient<LoadOffsets>,
    pub assigned: Recipient<PartitionsAssigned>,
    pub revoked: Recipient<PartitionsRevoked>,
    pub stray: Recipient<StrayRecord>,
}

pub struct K2ConsumerContext {
    topic: String,
    start_from: StartFrom,
    consumer: OnceLock<Weak<KafkaConsumer>>,
    listeners: OnceLock<GroupListeners>,
    queues: LaneQueues,
    /// Set when a partition can only be restarted by a new assignment (see
    /// [`K2ConsumerContext::request_rejoin`]).
    rejoin: AtomicBool,
}

impl ClientContext for K2ConsumerContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => error!(facility = fac, "librdkafka: {log_message}"),
            RDKafkaLogLevel::Warning => warn!(facility = fac, "librdkafka: {log_message}"),
            _ => tracing::debug!(facility = fac, "librdkafka: {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        warn!(error = %error, "kafka client error: {reason}");
    }
}

impl ConsumerContext for K2ConsumerContext {
    /// K2 uses the cooperative protocol: an assignment adds partitions and a
    /// revocation takes some away, and the partitions that stay keep their
    /// lanes, their uncommitted files and their fetch positions. A rebalance
    /// (another process joining or leaving) therefore never stops the lanes
    /// it does not move.
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(base_consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let assigned = self.prepare_assignment(tpl);
                let applied = if cooperative {
                    base_consumer.incremental_assign(tpl)
                } else {
                    base_consumer.assign(tpl)
                };
                if let Err(err) = applied {
                    error!(error = %err, "failed to apply the partition assignment");
                    return;
                }
                if let Some(listeners) = self.listeners.get()
                    && let Err(err) = futures::executor::block_on(listeners.assigned.send(assigned))
                {
                    error!(error = %err, "supervisor unreachable, assigned partitions not started");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let partitions: Vec<i32> = tpl
                    .elements_for_topic(&self.topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect();
                info!(
                    ?partitions,
                    lost = base_consumer.assignment_lost(),
                    "partitions revoked"
                );
                if let Some(listeners) = self.listeners.get() {
                    // Lanes must stop (and drop their queues) before the
                    // partitions can be assigned again.
                    let revoked = PartitionsRevoked {
                        partitions: partitions.clone(),
                    };
                    if let Err(err) = futures::executor::block_on(listeners.revoked.send(revoked)) {
                        error!(error = %err, "supervisor unreachable while partitions were revoked");
                    }
                }
                self.queues.remove(&partitions);
                let applied = if cooperative {
                    base_consumer.incremental_unassign(tpl)
                } else {
                    base_consumer.unassign()
                };
                if let Err(err) = applied {
                    error!(error = %err, "failed to give up the revoked partitions");
                }
            }
            other => {
                error!(code = ?other, "rebalance error");
                let _ = base_consumer.unassign();
            }
        }
    }
}

impl K2ConsumerContext {
    /// Asks the group thread to subscribe again and rejoin the group: the
    /// last resort for a partition that is assigned but cannot be read here
    /// (its queue could not be split). A partition stopped by retention is
    /// restarted alone instead ([`restart_partition`]).
    pub fn request_rejoin(&self) {
        self.rejoin.store(true, Ordering::Relaxed);
    }

    /// The queues of this consumer's assigned partitions.
    pub fn queues(&self) -> &LaneQueues {
        &self.queues
    }

    /// A partition is assigned but cannot get a lane: say so, count it, and
    /// rejoin so a new assignment tries again.
    fn unusable(&self, partition: i32, what: &str, error: &dyn std::fmt::Display) {
        error!(partition, error = %error, "{what}; the partition cannot be read here, rejoining the group");
        metrics::counter!(m::ASSIGNMENT_FAILURES).increment(1);
        self.request_rejoin();
    }

    /// Sets each assigned partition's start offset from the table and splits
    /// its queue. Runs in the rebalance callback, before the assignment.
    fn prepare_assignment(&self, tpl: &mut TopicPartitionList) -> PartitionsAssigned {
        let none = || PartitionsAssigned {
            partitions: Vec::new(),
            offsets_known: true,
        };
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        // None: the table could not be read.
        let recorded = match self.listeners.get() {
            Some(listeners) => {
                match futures::executor::block_on(listeners.offsets.send(LoadOffsets {
                    partitions: partitions.clone(),
                })) {
                    Ok(Ok(offsets)) => Some(offsets),
                    Ok(Err(err)) => {
                        // Without the table's offsets K2 cannot know where to
                        // start, and blocking this callback until the catalog
                        // returns would stall the group. The lanes wait in
                        // the supervisor instead.
                        warn!(error = %err, "cannot read offsets from Iceberg; the partitions start when it answers");
                        None
                    }
                    Err(err) => {
                        error!(error = %err, "committer unreachable; partitions not started");
                        return none();
                    }
                }
            }
            None => Some(Default::default()),
        };
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return none();
        };
        let mut assigned = Vec::with_capacity(partitions.len());
        for partition in partitions {
            let (start, offset) = match &recorded {
                Some(recorded) => {
                    let start = recorded.get(&partition).copied();
                    (
                        start,
                        start_offset(&consumer, &self.topic, partition, start, self.start_from),
                    )
                }
                // The log end: nothing older is fetched (and no reset error
                // stops the partition) before the lane's seek to the table's
                // offset; what is fetched meanwhile the seek discards.
                None => (None, Offset::End),
            };
            if let Err(err) = tpl.set_partition_offset(&self.topic, partition, offset) {
                self.unusable(partition, "failed to set the start offset", &err);
                continue;
            }
            let Some(mut queue) = consumer.split_partition_queue(&self.topic, partition) else {
                self.unusable(
                    partition,
                    "failed to split the partition queue",
                    &"librdkafka returned none",
                );
                continue;
            };
            let ready = Arc::new(Notify::new());
            let wake = ready.clone();
            queue.set_nonempty_callback(move || wake.notify_one());
            info!(partition, start = ?start, "partition assigned");
            self.queues.insert(Arc::new(LaneQueue {
                partition,
                queue,
                ready,
            }));
            assigned.push((partition, start));
        }
        PartitionsAssigned {
            partitions: assigned,
            offsets_known: recorded.is_some(),
        }
    }
}

/// Where to position a partition whose table offset is `start`: see
/// [`retained_start`]; `start_from` for a partition the table has never seen.
pub fn start_offset(
    consumer: &KafkaConsumer,
    topic: &str,
    partition: i32,
    start: Option<i64>,
    start_from: StartFrom,
) -> Offset {
    match (start, start_from) {
        (Some(next), _) => Offset::Offset(retained_start(consumer, topic, partition, next)),
        (None, StartFrom::Earliest) => Offset::Beginning,
        (None, StartFrom::Latest) => Offset::End,
    }
}

/// Where to start reading a partition whose table offset is `next`: `next`
/// itself, or the earliest offset Kafka still has if retention deleted
/// `next`. The lane reports the skipped range when its first record arrives
/// past its position (see `PartitionConsumer`).
fn retained_start(consumer: &KafkaConsumer, topic: &str, partition: i32, next: i64) -> i64 {
    match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
        Ok((low, _)) if low > next => {
            error!(
                partition,
                next,
                earliest = low,
                "the table's next offset is gone from Kafka (retention); starting at the earliest retained offset"
            );
            low
        }
        Ok(_) => next,
        Err(err) => {
            // If `next` is really gone, the fetch fails, the lane asks for a
            // rejoin, and this check runs again.
            warn!(partition, error = %err, "could not read the low watermark; starting at the table's offset");
            next
        }
    }
}

/// The low and high watermarks of `partition` as last seen in fetch
/// responses (no broker round trip; None before the first fetch). The high
/// watermark is what lag is measured against.
pub fn cached_watermarks(consumer: &KafkaConsumer, topic: &str, partition: i32) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives; the out
    // pointers are valid locals; librdkafka only reads its cache here.
    let code = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (code == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some((low, high))
}

/// Restarts one assigned partition at `offset`, leaving every other
/// partition alone: gives it up and takes it again (incremental unassign and
/// assign, the cooperative protocol's per-partition calls) with a new record
/// queue, which replaces the old one in [`LaneQueues`] and is returned for
/// the partition's lane. This is how a partition that librdkafka stopped
/// (its next offset is gone: retention, with `auto.offset.reset=error`) and
/// refuses to seek starts again. Blocking.
pub fn restart_partition(
    consumer: &Arc<KafkaConsumer>,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Arc<LaneQueue>, String> {
    // The old queue handle goes first: dropping it turns off the wake-up
    // callback of the partition's queue, which the new handle sets again.
    // (The lane gave up its own handle before calling this.)
    consumer.context().queues.remove(&[partition]);
    let mut one = TopicPartitionList::new();
    one.add_partition(topic, partition);
    consumer
        .incremental_unassign(&one)
        .map_err(|e| format!("cannot give up partition {partition}: {e}"))?;
    let mut queue = consumer
        .split_partition_queue(topic, partition)
        .ok_or_else(|| format!("cannot split the queue of partition {partition}"))?;
    let ready = Arc::new(Notify::new());
    let wake = ready.clone();
    queue.set_nonempty_callback(move || wake.notify_one());
    let queue = Arc::new(LaneQueue {
        partition,
        queue,
        ready,
    });
    consumer.context().queues.insert(queue.clone());
    let mut at = TopicPartitionList::new();
    at.add_partition_offset(topic, partition, Offset::Offset(offset))
        .map_err(|e| e.to_string())?;
    consumer
        .incremental_assign(&at)
        .map_err(|e| format!("cannot take partition {partition} again at offset {offset}: {e}"))?;
    info!(partition, offset, "partition restarted alone");
    Ok(queue)
}

/// Restarts `partition` at the earliest offset Kafka still holds (see
/// [`restart_partition`]); returns that offset and the new queue.
pub fn restart_at_retained_start(
    consumer: &Arc<KafkaConsumer>,
    topic: &str,
    partition: i32,
) -> Result<(i64, Arc<LaneQueue>), String> {
    let (low, _) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .map_err(|e| format!("cannot read the log start of partition {partition}: {e}"))?;
    Ok((low, restart_partition(consumer, topic, partition, low)?))
}

/// The supervisor's hold on the consumer's partitions (see [`PartitionControl`]).
pub struct KafkaPartitions {
    pub consumer: Arc<KafkaConsumer>,
    pub topic: String,
    pub start_from: StartFrom,
}

impl KafkaPartitions {
    fn list(&self, partitions: &[i32]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for &partition in partitions {
            tpl.add_partition(&self.topic, partition);
        }
        tpl
    }
}

impl PartitionControl for KafkaPartitions {
    fn pause(&self, partitions: &[i32]) -> Result<(), String> {
        self.consumer
            .pause(&self.list(partitions))
            .map_err(|e| e.to_string())
    }

    fn resume(&self, partitions: &[i32]) -> Result<(), String> {
        self.consumer
            .resume(&self.list(partitions))
            .map_err(|e| e.to_string())
    }

    fn seek_to_start(&self, partition: i32, start: Option<i64>) -> Result<(), String> {
        let offset = start_offset(&self.consumer, &self.topic, partition, start, self.start_from);
        match self
            .consumer
            .seek(&self.topic, partition, offset, Duration::from_secs(10))
        {
            Ok(()) => Ok(()),
            // librdkafka refuses to seek a partition it stopped (its offset
            // was out of range): restart that partition alone there.
            Err(err) if err.rdkafka_error_code() == Some(RDKafkaErrorCode::State) => match offset {
                Offset::Offset(at) => restart_partition(&self.consumer, &self.topic, partition, at).map(drop),
                _ => restart_at_retained_start(&self.consumer, &self.topic, partition).map(drop),
            },
            Err(err) => Err(err.to_string()),
        }
    }

    fn commit_offsets(&self, offsets: &BTreeMap<i32, i64>) {
        let mut tpl = TopicPartitionList::new();
        for (&partition, &next) in offsets {
            if let Err(err) = tpl.add_partition_offset(&self.topic, partition, Offset::Offset(next)) {
                warn!(partition, error = %err, "cannot commit an offset to the Kafka group");
            }
        }
        if let Err(err) = self.consumer.commit(&tpl, rdkafka::consumer::CommitMode::Async) {
            warn!(error = %err, "failed to commit offsets to the Kafka group");
        }
    }

    fn cached_watermarks(&self, partition: i32) -> Option<(i64, i64)> {
        cached_watermarks(&self.consumer, &self.topic, partition)
    }

    fn fetch_watermarks(&self, partition: i32) -> Option<(i64, i64)> {
        self.consumer
            .fetch_watermarks(&self.topic, partition, Duration::from_secs(2))
            .ok()
    }

    fn request_rejoin(&self) {
        self.consumer.context().request_rejoin();
    }
}

/// What the topic retains per partition, for the retention headroom: the
/// embedded broker's fixed limit; otherwise `kafka.retention_bytes` and
/// `kafka.retention_ms` where set, and the rest from the topic's own
/// `retention.bytes` and `retention.ms` (DescribeConfigs). A broker that
/// cannot say leaves them unknown: the headroom then counts from the
/// retained range once Kafka starts deleting.
pub async fn retention_limits(config: &KafkaConfig, brokers: &str) -> RetentionLimits {
    if config.is_embedded() {
        return RetentionLimits {
            bytes_per_partition: Some(crate::embedded::RETAINED_BYTES_PER_PARTITION),
            ms: None,
        };
    }
    let mut limits = RetentionLimits {
        bytes_per_partition: config.retention_bytes,
        ms: config.retention_ms,
    };
    if limits.bytes_per_partition.is_some() && limits.ms.is_some() {
        return limits;
    }
    match describe_retention(config, brokers).await {
        Ok((bytes, ms)) => {
            limits.bytes_per_partition = limits.bytes_per_partition.or(bytes);
            limits.ms = limits.ms.or(ms);
            info!(topic = %config.topic, ?limits, "retention read from the topic's config");
        }
        Err(err) => warn!(
            topic = %config.topic, error = %err,
            "cannot read the topic's retention (set kafka.retention_bytes / kafka.retention_ms); \
             retention headroom counts from the retained range once Kafka starts deleting"
        ),
    }
    limits
}

/// The topic's `retention.bytes` and `retention.ms` (None: unlimited).
async fn describe_retention(
    config: &KafkaConfig,
    brokers: &str,
) -> anyhow::Result<(Option<u64>, Option<u64>)> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;

    let mut client = ClientConfig::new();
    for (key, value) in &config.client {
        client.set(key, value);
    }
    client.set("bootstrap.servers", brokers);
    let admin: AdminClient<DefaultClientContext> = client.create()?;
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
    let topic = ResourceSpecifier::Topic(&config.topic);
    let results = tokio::time::timeout(
        Duration::from_secs(10),
        admin.describe_configs([&topic], &options),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no answer within 10 s"))??;
    let resource = results
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no answer for the topic"))?
        .map_err(|code| anyhow::anyhow!("{code:?}"))?;
    let value = |name: &str| {
        resource
            .get(name)
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse::<i64>().ok())
            .and_then(|v| u64::try_from(v).ok())
    };
    Ok((value("retention.bytes"), value("retention.ms")))
}

/// Builds the group consumer. `brokers` is a bootstrap list.
pub fn create_consumer(config: &KafkaConfig, brokers: &str) -> anyhow::Result<Arc<KafkaConsumer>> {
    use anyhow::Context as _;

    let mut client = ClientConfig::new();
    for (key, value) in &config.client {
        client.set(key, value);
    }
    client
        .set("bootstrap.servers", brokers)
        .set("group.id", &config.group_id)
        .set("session.timeout.ms", config.session_timeout_ms.to_string())
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A partition whose next offset was deleted by retention must be
        // reported, never silently reset.
        .set("auto.offset.reset", "error")
        .set("enable.partition.eof", "false")
        // Cooperative rebalancing: a rebalance moves only the partitions it
        // must, and one partition can be restarted alone (after retention
        // overtook it) while the others keep running.
        .set("partition.assignment.strategy", "cooperative-sticky");
    if !config.client.contains_key("queued.max.messages.kbytes") {
        // Bounds what librdkafka prefetches per partition (each lane has its
        // own queue): 64 partitions hold at most 128 MiB of payload, about
        // twice that in librdkafka's heap. 16 MiB held a whole 1M-trade
        // backlog in memory for the same throughput. Lower bounds lower the
        // peak only by rate-limiting: a partition whose queue passed its
        // bound is not fetched again for `fetch.queue.backoff.ms` (1 s), so
        // a backlog is read at ~bound per second per partition, and a lane
        // that drained its queue waits out the second (docs/perf.md, round
        // four).
        client.set("queued.max.messages.kbytes", "2048");
    }
    if !config.client.contains_key("fetch.wait.max.ms") {
        // How long a broker may hold a fetch that found nothing. A Kafka
        // broker answers as soon as a record arrives (fetch.min.bytes=1);
        // the embedded broker (librdkafka's mock) holds it the whole time,
        // so librdkafka's 500 ms put half a second between produce and
        // consume there at any rate below K2's. 50 ms costs a broker at most
        // 20 empty fetches a second per connection while nothing comes.
        client.set("fetch.wait.max.ms", "50");
    }
    if let Some(instance) = &config.group_instance_id {
        client.set("group.instance.id", instance);
    }
    let context = K2ConsumerContext {
        topic: config.topic.clone(),
        start_from: config.start_from,
        consumer: OnceLock::new(),
        listeners: OnceLock::new(),
        queues: LaneQueues::default(),
        rejoin: AtomicBool::new(false),
    };
    let consumer: KafkaConsumer = client
        .create_with_context(context)
        .with_context(|| format!("failed to create Kafka consumer for brokers {brokers}"))?;
    let consumer = Arc::new(consumer);
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    Ok(consumer)
}

/// Leaves the group and serves the revoke callback before returning, so the
/// lanes stop while the broker and the actors are still there and the group
/// hands the partitions on at once. Gives up after a bound: a broker that
/// is gone cannot answer the leave request.
///
/// rdkafka's `Drop` closes the consumer once more and logs "Failed to close
/// consumer queue on drop: … BrokerDestroy" (librdkafka: "Consumer already
/// closed"); the binary's default log filter hides that line.
fn leave_group(consumer: &KafkaConsumer) {
    const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);
    if let Err(err) = consumer.close_queue() {
        warn!(error = %err, "failed to leave the consumer group cleanly");
        consumer.unsubscribe();
        return;
    }
    let deadline = std::time::Instant::now() + LEAVE_TIMEOUT;
    while !consumer.closed() {
        if std::time::Instant::now() >= deadline {
            warn!(timeout = ?LEAVE_TIMEOUT, "gave up waiting to leave the consumer group");
            return;
        }
        // Records still arriving on the main queue are not processed: every
        // lane is stopping and resumes from Iceberg's offsets next time.
        let _ = consumer.poll(Duration::from_millis(100));
    }
    info!("left the consumer group");
}

/// Serves the group protocol on a dedicated thread until stopped. The
/// rebalance callback runs on this thread and may block it.
pub struct GroupDriver {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl GroupDriver {
    pub fn start(
        consumer: Arc<KafkaConsumer>,
        topic: &str,
        listeners: GroupListeners,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;

        if consumer.context().listeners.set(listeners).is_err() {
            anyhow::bail!("the consumer already has a group driver");
        }
        consumer
            .subscribe(&[topic])
            .with_context(|| format!("failed to subscribe to topic {topic}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let topic = topic.to_string();
        let thread = std::thread::Builder::new()
            .name("k2-kafka-group".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    if consumer.context().rejoin.swap(false, Ordering::Relaxed) {
                        // Unsubscribing revokes every partition of this
                        // process (the callback runs on this thread, in the
                        // next polls); subscribing again rejoins the group.
                        warn!("leaving and rejoining the consumer group");
                        consumer.unsubscribe();
                        if let Err(err) = consumer.subscribe(&[&topic]) {
                            error!(error = %err, "failed to subscribe again");
                        }
                    }
                    match consumer.poll(Duration::from_millis(100)) {
                        None => {}
                        Some(Ok(message)) => {
                            let (partition, offset) = (message.partition(), message.offset());
                            warn!(partition, offset, "record on the main queue, rewinding its lane");
                            if let Some(listeners) = consumer.context().listeners.get() {
                                listeners.stray.do_send(StrayRecord { partition, offset });
                            }
                        }
                        Some(Err(err)) => warn!(error = %err, "kafka consumer error"),
                    }
                }
                leave_group(&consumer);
            })
            .context("failed to start the Kafka group thread")?;
        Ok(Self {
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Stops serving the group and waits for the thread to leave it. The
    /// wait runs off the caller's thread: leaving the group revokes the
    /// partitions, and the callback needs the actors to answer.
    pub async fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}
