//! The embedded Kafka broker: librdkafka's in-process mock cluster, which
//! speaks the real Kafka protocol on a local port. Used by `k2 demo`,
//! `k2 broker`, `k2 bench` and the tests, where no real broker exists.
//!
//! The mock cluster is not `Send`, so it lives on a thread of its own for as
//! long as this handle does. It keeps only about 5 MiB per partition and
//! silently drops the oldest records beyond that; K2 detects the loss like
//! any retention loss (see `PartitionConsumer`).

use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::Context as _;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

/// What the mock cluster keeps per partition before it drops the oldest
/// records (hard-coded in librdkafka's `rdkafka_mock.c`: 5 MiB of message
/// sets, or 100,000 of them, whichever comes first).
pub const RETAINED_BYTES_PER_PARTITION: u64 = 5 * 1024 * 1024;

/// Partitions at most for the embedded topic, however high the rate: each
/// is a lane of five actors on this machine's cores.
pub const MAX_PARTITIONS: i32 = 64;

/// How the embedded topic is sized for a rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopicSizing {
    pub partitions: i32,
    /// How far K2 can fall behind, in seconds at the rate, before the broker
    /// drops records it has not read: on the partition of the hottest key,
    /// which no number of partitions spreads.
    pub lag_budget_s: f64,
    /// False when the wanted lag budget does not hold, because even
    /// [`MAX_PARTITIONS`] are too few or the hottest key's partition fills
    /// faster.
    pub holds_budget: bool,
}

/// What the topic is sized for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopicLoad {
    /// Records a second.
    pub rate: u64,
    /// Bytes a record takes in the log (key, value and overhead).
    pub record_bytes: f64,
    /// The largest share of the rate that carries one key, so goes to one
    /// partition (1 / partitions when keys spread evenly).
    pub hottest_key_share: f64,
}

/// Partitions the embedded topic needs so that `load` leaves K2
/// `lag_budget_s` of lag on every partition before the broker's retention
/// drops unread records: at least `min_partitions`, at most
/// [`MAX_PARTITIONS`]. The partition of the hottest key takes at least its
/// share of the rate however many partitions there are.
pub fn size_topic(load: TopicLoad, lag_budget_s: f64, min_partitions: i32) -> TopicSizing {
    let retained_records = RETAINED_BYTES_PER_PARTITION as f64 / load.record_bytes.max(1.0);
    let rate = load.rate as f64;
    let wanted = (rate * lag_budget_s / retained_records).ceil() as i64;
    let partitions = wanted.clamp(min_partitions.max(1) as i64, MAX_PARTITIONS as i64) as i32;
    let hottest_partition_rate = rate * load.hottest_key_share.max(1.0 / partitions as f64);
    let budget = if load.rate == 0 {
        f64::INFINITY
    } else {
        retained_records / hottest_partition_rate
    };
    TopicSizing {
        partitions,
        lag_budget_s: budget,
        holds_budget: budget >= lag_budget_s,
    }
}

/// A running embedded broker; stops when dropped.
pub struct EmbeddedBroker {
    bootstrap: String,
    commands: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

enum Command {
    Stop,
    RequestErrors(RDKafkaApiKey, Vec<RDKafkaRespErr>),
    /// Takes the broker down (true) or brings it back (false), answering
    /// whether the mock cluster did.
    SetDown(bool, mpsc::Sender<Result<(), String>>),
}

/// The one broker of the embedded cluster (librdkafka numbers them from 1).
const BROKER_ID: i32 = 1;

impl EmbeddedBroker {
    /// Starts a one-broker cluster with the given topics (name, partitions).
    pub fn start(topics: &[(String, i32)]) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<String>>();
        let (commands, command_rx) = mpsc::channel();
        let topics = topics.to_vec();
        let thread = std::thread::Builder::new()
            .name("k2-embedded-broker".into())
            .spawn(move || {
                let cluster = match MockCluster::new(1) {
                    Ok(cluster) => cluster,
                    Err(err) => {
                        let _ =
                            ready_tx.send(Err(anyhow::anyhow!("failed to start the mock cluster: {err}")));
                        return;
                    }
                };
                for (topic, partitions) in &topics {
                    if let Err(err) = cluster.create_topic(topic, *partitions, 1) {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("failed to create topic {topic}: {err}")));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Keep the cluster alive until told to stop or the handle is gone.
                loop {
                    match command_rx.recv() {
                        Ok(Command::RequestErrors(api, errors)) => cluster.request_errors(api, &errors),
                        Ok(Command::SetDown(down, answer)) => {
                            let result = if down {
                                cluster.broker_down(BROKER_ID)
                            } else {
                                cluster.broker_up(BROKER_ID)
                            };
                            let _ = answer.send(result.map_err(|e| e.to_string()));
                        }
                        Ok(Command::Stop) | Err(_) => break,
                    }
                }
                drop(cluster);
            })
            .context("failed to start the embedded broker thread")?;
        let bootstrap = ready_rx
            .recv()
            .context("embedded broker thread exited during start-up")??;
        Ok(Self {
            bootstrap,
            commands,
            thread: Some(thread),
        })
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// The next requests of kind `api`, from any client, fail with `errors`,
    /// one each, in order (fault drills and tests: a consumer whose fetches
    /// fail for a while).
    pub fn request_errors(&self, api: RDKafkaApiKey, errors: Vec<RDKafkaRespErr>) {
        let _ = self.commands.send(Command::RequestErrors(api, errors));
    }

    /// What the `broker_down` fault takes down and brings back.
    pub fn control(&self) -> std::sync::Arc<dyn crate::faults::BrokerControl> {
        std::sync::Arc::new(BrokerSwitch {
            commands: self.commands.clone(),
        })
    }
}

/// Takes the embedded broker down and up from any thread.
struct BrokerSwitch {
    commands: mpsc::Sender<Command>,
}

impl crate::faults::BrokerControl for BrokerSwitch {
    fn set_down(&self, down: bool) -> Result<(), String> {
        let (answer, result) = mpsc::channel();
        self.commands
            .send(Command::SetDown(down, answer))
            .map_err(|_| "the embedded broker has stopped".to_string())?;
        result
            .recv_timeout(std::time::Duration::from_secs(5))
            .map_err(|_| "the embedded broker did not answer within 5 s".to_string())?
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn even(rate: u64) -> TopicLoad {
        TopicLoad {
            rate,
            record_bytes: 180.0,
            hottest_key_share: 0.0,
        }
    }

    #[test]
    fn the_topic_grows_with_the_rate_up_to_the_cap_and_says_when_the_budget_does_not_hold() {
        // 180 bytes a record: 29,127 records a partition.
        let slow = size_topic(even(10_000), 30.0, 8);
        assert_eq!((slow.partitions, slow.holds_budget), (11, true));
        assert!(slow.lag_budget_s >= 30.0);
        let idle = size_topic(even(100), 30.0, 8);
        assert_eq!(idle.partitions, 8, "never below the configured partitions");
        let flood = size_topic(even(400_000), 30.0, 8);
        assert_eq!((flood.partitions, flood.holds_budget), (MAX_PARTITIONS, false));
        assert!((flood.lag_budget_s - 4.66).abs() < 0.01, "{flood:?}");
    }

    #[test]
    fn the_hottest_key_bounds_the_budget_whatever_the_partitions() {
        // One key carries 20% of 10,000/s: its partition fills at 2,000/s and
        // holds 14.6 s, though 11 partitions would hold 30 s for an even spread.
        let skewed = size_topic(
            TopicLoad {
                hottest_key_share: 0.2,
                ..even(10_000)
            },
            30.0,
            8,
        );
        assert_eq!(skewed.partitions, 11);
        assert!(!skewed.holds_budget);
        assert!((skewed.lag_budget_s - 14.56).abs() < 0.01, "{skewed:?}");
    }
}
