//! A first-in first-out log kept in fixed-size chunks.
//!
//! A lane's stages log every record of an epoch until its commit (the
//! sequencer's and the ordered-id dedup's [`crate::state::EpochState`], the
//! dedup's ids without order). In a `VecDeque` such a log grows by doubling:
//! each step allocates twice the entries, copies them and frees the old
//! buffer, so a log touches about twice its size in fresh pages, and the
//! kernel zeroing them was a visible share of `k2 run`'s CPU (docs/perf.md,
//! round eight). Here entries go into chunks of [`LOG_CHUNK`] that are sized
//! once and never move; a chunk the front has emptied goes back to the
//! allocator, which hands it to the next chunk at the back.

use std::collections::VecDeque;

/// Entries per chunk: small enough (≤ 64 KiB for K2's entries) that the
/// allocator serves chunks from its heap and reuses them rather than mapping
/// fresh pages for each.
pub const LOG_CHUNK: usize = 1_024;

pub struct ChunkedLog<T> {
    /// Never an empty chunk: the front one is dropped when emptied. Every
    /// chunk but the first and the last is full.
    chunks: VecDeque<VecDeque<T>>,
}

impl<T> Default for ChunkedLog<T> {
    fn default() -> Self {
        Self {
            chunks: VecDeque::new(),
        }
    }
}

impl<T> ChunkedLog<T> {
    pub fn push_back(&mut self, entry: T) {
        match self.chunks.back_mut() {
            Some(chunk) if chunk.len() < LOG_CHUNK => chunk.push_back(entry),
            _ => {
                let mut chunk = VecDeque::with_capacity(LOG_CHUNK);
                chunk.push_back(entry);
                self.chunks.push_back(chunk);
            }
        }
    }

    pub fn front(&self) -> Option<&T> {
        self.chunks.front().and_then(VecDeque::front)
    }

    pub fn pop_front(&mut self) -> Option<T> {
        let chunk = self.chunks.front_mut()?;
        let entry = chunk.pop_front();
        if chunk.is_empty() {
            self.chunks.pop_front();
        }
        entry
    }

    /// Takes entries from the front for as long as `keep_taking` holds.
    pub fn pop_front_while(&mut self, mut keep_taking: impl FnMut(&T) -> bool) -> impl Iterator<Item = T> {
        std::iter::from_fn(move || {
            if keep_taking(self.front()?) {
                self.pop_front()
            } else {
                None
            }
        })
    }

    /// The entry `index` places from the front.
    pub fn get(&self, index: usize) -> Option<&T> {
        let first = self.chunks.front()?;
        if index < first.len() {
            return first.get(index);
        }
        let rest = index - first.len();
        self.chunks.get(1 + rest / LOG_CHUNK)?.get(rest % LOG_CHUNK)
    }

    pub fn len(&self) -> usize {
        match (self.chunks.front(), self.chunks.back()) {
            (Some(first), Some(last)) if self.chunks.len() > 1 => {
                first.len() + (self.chunks.len() - 2) * LOG_CHUNK + last.len()
            }
            (Some(only), _) => only.len(),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_leave_in_the_order_they_came_across_chunks() {
        let mut log = ChunkedLog::default();
        let n = LOG_CHUNK * 2 + 7;
        for i in 0..n {
            log.push_back(i);
        }
        assert_eq!(log.len(), n);
        assert_eq!(log.chunks.len(), 3);
        assert_eq!(
            log.iter().copied().collect::<Vec<_>>(),
            (0..n).collect::<Vec<_>>()
        );
        let taken: Vec<_> = log.pop_front_while(|&i| i < LOG_CHUNK + 3).collect();
        assert_eq!(taken, (0..LOG_CHUNK + 3).collect::<Vec<_>>());
        assert_eq!(log.len(), n - LOG_CHUNK - 3);
        assert_eq!(log.chunks.len(), 2, "the emptied chunk is gone");
        assert_eq!(log.front(), Some(&(LOG_CHUNK + 3)));
        for index in [0, LOG_CHUNK - 4, LOG_CHUNK - 3, LOG_CHUNK + 3] {
            assert_eq!(
                log.get(index),
                Some(&(LOG_CHUNK + 3 + index)),
                "entry {index} from the front"
            );
        }
        assert_eq!(log.get(n - LOG_CHUNK - 3), None, "one past the back");
        log.push_back(n);
        assert_eq!(
            log.iter().copied().collect::<Vec<_>>(),
            (LOG_CHUNK + 3..=n).collect::<Vec<_>>()
        );
        while log.pop_front().is_some() {}
        assert!(log.is_empty());
        assert_eq!(log.chunks.len(), 0);
        assert_eq!(log.pop_front(), None);
        assert_eq!(log.pop_front_while(|_| true).count(), 0);
    }

    #[test]
    fn a_chunk_never_grows() {
        let mut log = ChunkedLog::default();
        log.push_back(0);
        assert_eq!(log.len(), 1);
        let capacity = log.chunks[0].capacity();
        assert!(capacity >= LOG_CHUNK);
        for i in 1..LOG_CHUNK * 3 {
            log.push_back(i);
        }
        assert_eq!(log.chunks.len(), 3);
        assert_eq!(log.len(), LOG_CHUNK * 3);
        assert!(
            log.chunks
                .iter()
                .all(|chunk| chunk.len() == LOG_CHUNK && chunk.capacity() == capacity)
        );
    }
}
