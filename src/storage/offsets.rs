//! Kafka offsets recorded in Iceberg snapshot summaries: the source of truth
//! for where every partition resumes.
//!
//! Each commit stores, under `k2.offsets.<topic>`, a JSON map from partition to
//! the next offset to read and the writer that advanced it. A commit may only
//! advance a partition from exactly where the table says it stands
//! (contiguity): a writer whose data starts anywhere else is stale (a zombie
//! after a rebalance, or a lane that lost a race) and is fenced. This is what
//! makes every accepted offset land in the table exactly once.

use std::collections::BTreeMap;

use iceberg::table::Table;
use serde::{Deserialize, Serialize};

/// Summary key prefix; the full key is `k2.offsets.<topic>`.
pub const OFFSETS_KEY_PREFIX: &str = "k2.offsets.";

pub fn summary_key(topic: &str) -> String {
    format!("{OFFSETS_KEY_PREFIX}{topic}")
}

/// What the table records for one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionOffset {
    /// The next Kafka offset to read: everything below it is in the table.
    pub next_offset: i64,
    /// The K2 instance that last advanced this partition.
    pub writer: String,
    /// Side tables only: the rows a lane reported on its last, empty range
    /// at `next_offset` as it stopped (its tail) are in the table. Their
    /// offsets lie below `next_offset`, so only this tells a retried tail
    /// from a new one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tail: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OffsetsError {
    #[error("snapshot summary key `{key}` is not a valid offsets map: {reason}")]
    Malformed { key: String, reason: String },
    #[error(
        "partition {partition}: table is at offset {table_next:?}, this writer's data starts at {first_offset}"
    )]
    Fenced {
        partition: i32,
        table_next: Option<i64>,
        first_offset: i64,
    },
}

/// Offsets of one topic as recorded in one snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicOffsets {
    partitions: BTreeMap<i32, PartitionOffset>,
}

impl TopicOffsets {
    /// Reads the offsets of `topic` from the table's current snapshot (empty
    /// for a table without snapshots or without the key).
    pub fn from_table(table: &Table, topic: &str) -> Result<Self, OffsetsError> {
        let key = summary_key(topic);
        let Some(snapshot) = table.metadata().current_snapshot() else {
            return Ok(Self::default());
        };
        match snapshot.summary().additional_properties.get(&key) {
            None => Ok(Self::default()),
            Some(json) => Self::from_json(&key, json),
        }
    }

    pub fn from_json(key: &str, json: &str) -> Result<Self, OffsetsError> {
        let partitions = serde_json::from_str(json).map_err(|err| OffsetsError::Malformed {
            key: key.to_string(),
            reason: err.to_string(),
        })?;
        Ok(Self { partitions })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.partitions).expect("offsets serialize to JSON")
    }

    pub fn next_offset(&self, partition: i32) -> Option<i64> {
        self.partitions.get(&partition).map(|p| p.next_offset)
    }

    pub fn iter(&self) -> impl Iterator<Item = (i32, &PartitionOffset)> {
        self.partitions.iter().map(|(p, o)| (*p, o))
    }

    pub fn is_empty(&self) -> bool {
        self.partitions.is_empty()
    }

    /// Advances `partition` over `[first_offset, next_offset)`. Refused unless
    /// the table stands exactly at `first_offset`, or has never seen the
    /// partition (its first commit may start anywhere: earliest retained
    /// offset, or latest).
    pub fn advance(
        &mut self,
        partition: i32,
        first_offset: i64,
        next_offset: i64,
        writer: &str,
    ) -> Result<(), OffsetsError> {
        let table_next = self.next_offset(partition);
        if table_next.is_some_and(|n| n != first_offset) || next_offset < first_offset {
            return Err(OffsetsError::Fenced {
                partition,
                table_next,
                first_offset,
            });
        }
        self.partitions.insert(
            partition,
            PartitionOffset {
                next_offset,
                writer: writer.to_string(),
                tail: false,
            },
        );
        Ok(())
    }

    /// Sets `partition` to `next_offset` regardless of where it stood. Only for
    /// side tables whose rows are filtered by offset on replay.
    pub fn set(&mut self, partition: i32, next_offset: i64, writer: &str) {
        self.partitions.insert(
            partition,
            PartitionOffset {
                next_offset,
                writer: writer.to_string(),
                tail: false,
            },
        );
    }

    /// Records that `partition`'s tail at `next_offset` is in the table
    /// (side tables only; see [`PartitionOffset::tail`]).
    pub fn set_tail(&mut self, partition: i32, next_offset: i64, writer: &str) {
        self.partitions.insert(
            partition,
            PartitionOffset {
                next_offset,
                writer: writer.to_string(),
                tail: true,
            },
        );
    }

    /// Whether the table holds `partition`'s tail at `next_offset`.
    pub fn has_tail(&self, partition: i32, next_offset: i64) -> bool {
        self.partitions
            .get(&partition)
            .is_some_and(|p| p.tail && p.next_offset == next_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_commit_of_a_partition_may_start_anywhere() {
        let mut offsets = TopicOffsets::default();
        offsets.advance(3, 500, 900, "a").unwrap();
        assert_eq!(offsets.next_offset(3), Some(900));
        assert_eq!(offsets.next_offset(4), None);
    }

    #[test]
    fn contiguous_advance_is_accepted_and_gap_or_overlap_is_fenced() {
        let mut offsets = TopicOffsets::default();
        offsets.advance(0, 0, 100, "a").unwrap();
        offsets.advance(0, 100, 250, "a").unwrap();
        assert_eq!(offsets.next_offset(0), Some(250));
        // Overlap: a zombie replaying data the table already holds.
        assert_eq!(
            offsets.advance(0, 200, 300, "b"),
            Err(OffsetsError::Fenced {
                partition: 0,
                table_next: Some(250),
                first_offset: 200
            })
        );
        // Gap: data between 250 and 260 would be lost.
        assert!(offsets.advance(0, 260, 300, "b").is_err());
        assert_eq!(offsets.next_offset(0), Some(250));
    }

    #[test]
    fn offsets_round_trip_through_summary_json() {
        let mut offsets = TopicOffsets::default();
        offsets.advance(0, 0, 10, "host-1").unwrap();
        offsets.advance(7, 5, 42, "host-2").unwrap();
        let json = offsets.to_json();
        assert_eq!(
            json,
            r#"{"0":{"next_offset":10,"writer":"host-1"},"7":{"next_offset":42,"writer":"host-2"}}"#
        );
        assert_eq!(TopicOffsets::from_json("k", &json).unwrap(), offsets);
    }

    #[test]
    fn malformed_summary_is_a_clear_error() {
        let err = TopicOffsets::from_json("k2.offsets.t", "{\"0\": 5}").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("snapshot summary key `k2.offsets.t` is not a valid offsets map")
        );
    }
    #[test]
    fn a_tail_mark_is_written_only_when_set_and_old_summaries_read_without_it() {
        let old = TopicOffsets::from_json("k", r#"{"0":{"next_offset":10,"writer":"w"}}"#).unwrap();
        assert!(!old.has_tail(0, 10));
        assert_eq!(old.to_json(), r#"{"0":{"next_offset":10,"writer":"w"}}"#);
        let mut offsets = old.clone();
        offsets.set_tail(0, 10, "w");
        assert!(offsets.has_tail(0, 10) && !offsets.has_tail(0, 11) && !offsets.has_tail(1, 10));
        assert_eq!(
            offsets.to_json(),
            r#"{"0":{"next_offset":10,"writer":"w","tail":true}}"#
        );
        offsets.set(0, 12, "w");
        assert!(!offsets.has_tail(0, 12));
    }
}
