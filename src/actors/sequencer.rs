//! Tracks per-(exchange, symbol) sequence numbers of a lane and counts gaps.
//! Records pass through unchanged; the tracker's verdicts are metrics.

use actix::prelude::*;

use crate::messages::{ChunkSink, Flush, TradeChunk};
use crate::metrics as m;
use crate::sequence::{SequenceOutcome, SequenceTracker};

#[derive(Debug, Default)]
pub struct SequencerCounters {
    pub num_gaps: u64,
    pub num_missing: u64,
    pub num_old: u64,
}

impl SequencerCounters {
    fn record_chunk(&mut self, gaps: u64, missing: u64, old: u64) {
        self.num_gaps += gaps;
        self.num_missing += missing;
        self.num_old += old;
        if gaps > 0 {
            metrics::counter!(m::SEQUENCE_GAPS).increment(gaps);
        }
    }
}

pub struct Sequencer {
    tracker: SequenceTracker,
    downstream: ChunkSink,
    mailbox_capacity: usize,
    pub counters: SequencerCounters,
}

impl Sequencer {
    pub fn new(downstream: ChunkSink, mailbox_capacity: usize) -> Self {
        Self {
            tracker: SequenceTracker::default(),
            downstream,
            mailbox_capacity,
            counters: SequencerCounters::default(),
        }
    }
}

impl Actor for Sequencer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
    }
}

impl Handler<TradeChunk> for Sequencer {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, chunk: TradeChunk, _: &mut Context<Self>) -> Self::Result {
        let (mut gaps, mut missing, mut old) = (0, 0, 0);
        for trade in &chunk.trades {
            match self
                .tracker
                .observe(&trade.exchange, &trade.symbol, trade.sequence)
            {
                SequenceOutcome::InOrder => {}
                SequenceOutcome::Gap { missing: n, .. } => {
                    gaps += 1;
                    missing += n as u64;
                }
                SequenceOutcome::Old => old += 1,
            }
        }
        self.counters.record_chunk(gaps, missing, old);
        let next = self.downstream.chunks.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let _ = next.send(chunk).await;
            }
            .into_actor(self),
        ))
    }
}

impl Handler<Flush> for Sequencer {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, flush: Flush, _: &mut Context<Self>) -> Self::Result {
        let next = self.downstream.flush.clone();
        Box::pin(async move {
            let _ = next.send(flush).await;
        })
    }
}
