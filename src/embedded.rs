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

/// A running embedded broker; stops when dropped.
pub struct EmbeddedBroker {
    bootstrap: String,
    commands: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

enum Command {
    Stop,
}

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
                let _stop: Result<Command, _> = command_rx.recv();
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
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
