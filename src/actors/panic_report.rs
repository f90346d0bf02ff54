//! Turns a stage's panic into a lane rebuild.
//!
//! A panic in a handler unwinds out of the actor's task; the arbiter thread
//! survives (the task harness catches it) but the stage is gone, and its
//! lane would stall. Each stage holds a [`PanicReport`]: while the task
//! unwinds, the stage is dropped, and the report tells the supervisor, which
//! rebuilds the lane from the last committed offsets like any other failure.

use actix::Recipient;

use crate::messages::{LaneError, LaneFailed, LaneId, Stage};

pub struct PanicReport {
    pub lane: LaneId,
    pub stage: Stage,
    pub supervisor: Recipient<LaneFailed>,
}

impl Drop for PanicReport {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.supervisor.do_send(LaneFailed {
                lane: self.lane,
                stage: self.stage,
                error: LaneError::Panicked,
            });
        }
    }
}
