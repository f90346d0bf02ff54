//! The lane's load-shedding stage. It sits where shedding by priority acts
//! (after dedup, before the batcher) and counts what passes per chunk. The
//! pipeline runs at the NORMAL degradation level, at which nothing is shed:
//! every record is forwarded.

use actix::prelude::*;

use crate::messages::{ChunkSink, Flush, TradeChunk};

#[derive(Debug, Default)]
pub struct LoadShedderCounters {
    pub num_passed: u64,
}

pub struct LoadShedder {
    downstream: ChunkSink,
    mailbox_capacity: usize,
    pub counters: LoadShedderCounters,
}

impl LoadShedder {
    pub fn new(downstream: ChunkSink, mailbox_capacity: usize) -> Self {
        Self {
            downstream,
            mailbox_capacity,
            counters: LoadShedderCounters::default(),
        }
    }
}

impl Actor for LoadShedder {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
    }
}

impl Handler<TradeChunk> for LoadShedder {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, chunk: TradeChunk, _: &mut Context<Self>) -> Self::Result {
        self.counters.num_passed += chunk.trades.len() as u64;
        let next = self.downstream.chunks.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let _ = next.send(chunk).await;
            }
            .into_actor(self),
        ))
    }
}

impl Handler<Flush> for LoadShedder {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, flush: Flush, _: &mut Context<Self>) -> Self::Result {
        let next = self.downstream.flush.clone();
        Box::pin(async move {
            let _ = next.send(flush).await;
        })
    }
}
