//! Injected faults: typed, reversible switches that make a real failure
//! path run on purpose (tests, demos, drills). Nothing here fakes data; a
//! fault makes a real component fail the way an outage would.
//!
//! - `catalog_down`: every Iceberg commit and offset load fails before reaching the catalog,
//!   as if the catalog were unreachable.
//! - `panic_stage`: the named stage of the lane for a partition panics on
//!   its next chunk (once).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Faults {
    catalog_down: AtomicBool,
    /// Fast path: set while a panic is armed.
    panic_armed: AtomicBool,
    panic: Mutex<Option<(String, i32)>>,
}

impl Faults {
    pub fn set_catalog_down(&self, down: bool) {
        self.catalog_down.store(down, Relaxed);
    }

    pub fn catalog_down(&self) -> bool {
        self.catalog_down.load(Relaxed)
    }

    /// Makes `stage` of `partition`'s lane panic on its next chunk.
    pub fn arm_panic(&self, stage: &str, partition: i32) {
        *self.panic.lock().expect("faults lock") = Some((stage.to_string(), partition));
        self.panic_armed.store(true, Relaxed);
    }

    /// Called by stages per chunk: panics if this stage and partition are armed.
    pub fn check_panic(&self, stage: &str, partition: i32) {
        if !self.panic_armed.load(Relaxed) {
            return;
        }
        let mut armed = self.panic.lock().expect("faults lock");
        if armed.as_ref().is_some_and(|(s, p)| s == stage && *p == partition) {
            *armed = None;
            self.panic_armed.store(false, Relaxed);
            drop(armed);
            panic!("injected fault: {stage} of partition {partition} panics");
        }
    }
}
