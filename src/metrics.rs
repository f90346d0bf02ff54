//! Every metric K2 emits: names, descriptions and the Prometheus recorder.
//!
//! Names follow `k2_<noun>_<unit>`, `_total` only on counters; labels are
//! low-cardinality. Stages emit per chunk, not per record.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const RECORDS_CONSUMED: &str = "k2_records_consumed_total";
pub const DEAD_LETTERS: &str = "k2_dead_letters_total";
pub const SEQUENCE_GAPS: &str = "k2_sequence_gaps_total";
pub const SEQUENCE_MISSING: &str = "k2_sequence_missing_records_total";
pub const SEQUENCE_RESETS: &str = "k2_sequence_resets_total";
pub const DUPLICATES_DROPPED: &str = "k2_duplicates_dropped_total";
pub const PROBABLE_DUPLICATES: &str = "k2_probable_duplicates_total";
pub const STATE_LOADS: &str = "k2_state_loads_total";
pub const RECORDS_SHED: &str = "k2_shed_records_total";
pub const DATA_FILES_WRITTEN: &str = "k2_data_files_written_total";
pub const DATA_FILE_BYTES: &str = "k2_data_file_bytes_total";
pub const BATCHER_BUFFERED_BYTES: &str = "k2_batcher_buffered_bytes";
pub const COMMITS: &str = "k2_commits_total";
pub const COMMIT_DURATION: &str = "k2_commit_duration_seconds";
pub const COMMIT_PENDING_BYTES: &str = "k2_commit_pending_bytes";
pub const TRADES_COMMITTED: &str = "k2_trades_committed_total";
pub const REFERENCE_COMMITTED: &str = "k2_reference_records_committed_total";
pub const COMMIT_FENCED: &str = "k2_commit_fenced_total";
pub const RETENTION_LOST_RECORDS: &str = "k2_kafka_retention_lost_records_total";
pub const LANE_RESTARTS: &str = "k2_lane_restarts_total";
pub const LANES_ACTIVE: &str = "k2_lanes_active";
pub const CONSUMER_LAG: &str = "k2_consumer_lag_records";
pub const LANES_FAILED: &str = "k2_lanes_failed";
pub const PARTITIONS_PAUSED: &str = "k2_partitions_paused";
pub const DEGRADATION_LEVEL: &str = "k2_degradation_level";
pub const DEGRADATION_TRANSITIONS: &str = "k2_degradation_transitions_total";
pub const DEGRADATION_SIGNAL: &str = "k2_degradation_signal";
pub const CIRCUIT_BREAKER_STATE: &str = "k2_circuit_breaker_state";
pub const BACKFILL_RECORDS: &str = "k2_backfill_records_total";
pub const COMMIT_VERIFY_DURATION: &str = "k2_commit_verify_duration_seconds";
pub const TABLE_MANIFESTS: &str = "k2_table_manifests";
pub const TABLE_DATA_FILES: &str = "k2_table_data_files";
pub const TABLE_METADATA_BYTES: &str = "k2_table_metadata_bytes";
pub const MAINTENANCE_RUNS: &str = "k2_maintenance_runs_total";
pub const MAINTENANCE_DURATION: &str = "k2_maintenance_duration_seconds";
pub const MAINTENANCE_FILES_DELETED: &str = "k2_maintenance_files_deleted_total";
pub const MAINTENANCE_FILES_COMPACTED: &str = "k2_maintenance_files_compacted_total";
pub const MAINTENANCE_LAST_COMPACTION: &str = "k2_maintenance_last_compaction_timestamp_seconds";
pub const STALE_PARTITIONS: &str = "k2_commit_stale_partitions_total";
pub const LANE_STARTS_SUPERSEDED: &str = "k2_lane_starts_superseded_total";
pub const STATE_PROMOTIONS: &str = "k2_state_promotions_total";
pub const ASSIGNMENT_FAILURES: &str = "k2_assignment_failures_total";
pub const OFFSET_GAPS: &str = "k2_offset_gaps_total";
pub const WINDOW_IDS_FORGOTTEN: &str = "k2_dedup_window_ids_forgotten_total";
pub const RETENTION_HEADROOM_RATIO: &str = "k2_retention_headroom_ratio";
pub const RETENTION_HEADROOM_SECONDS: &str = "k2_retention_headroom_seconds";
pub const EARLY_SHED_RECORDS: &str = "k2_early_shed_records_total";
pub const PARTITION_RESTARTS: &str = "k2_partition_restarts_total";
pub const FIRST_RECORD_CONSUMED: &str = "k2_first_record_consumed_timestamp_seconds";
pub const LAST_RECORD_CONSUMED: &str = "k2_last_record_consumed_timestamp_seconds";
pub const LAST_COMMIT: &str = "k2_last_commit_timestamp_seconds";
pub const FAULTS_INJECTED: &str = "k2_faults_injected_total";
pub const FAULTS_ACTIVE: &str = "k2_faults_active";
pub const QUERIES: &str = "k2_queries_total";
pub const QUERY_DURATION: &str = "k2_query_duration_seconds";
pub const QUERY_RECENT_BYTES: &str = "k2_query_recent_bytes";

/// Installs the global Prometheus recorder once and returns its handle.
/// Later calls (several pipelines in one test process) share it.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
                .expect("static bucket list is valid")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        QUERIES,
        Unit::Count,
        "Hybrid queries answered, by endpoint (trades, recent, ohlcv, sql) and outcome (ok, truncated, bad_request, timeout, memory, unavailable, failed)"
    );
    describe_histogram!(
        QUERY_DURATION,
        Unit::Seconds,
        "Time from a hybrid query's cut to its last row, by endpoint"
    );
    describe_gauge!(
        QUERY_RECENT_BYTES,
        Unit::Bytes,
        "Bytes of lately committed files K2 holds in memory for queries (query.max_recent_bytes)"
    );
    describe_gauge!(
        TABLE_MANIFESTS,
        Unit::Count,
        "Manifests in the current snapshot of each K2 table (every scan reads them all), by table"
    );
    describe_gauge!(
        TABLE_DATA_FILES,
        Unit::Count,
        "Live data files of each K2 table, by table"
    );
    describe_gauge!(
        TABLE_METADATA_BYTES,
        Unit::Bytes,
        "Bytes under each K2 table's metadata directory, by table"
    );
    describe_counter!(
        MAINTENANCE_RUNS,
        Unit::Count,
        "Table maintenance passes, by outcome (done, paused, error)"
    );
    describe_histogram!(
        MAINTENANCE_DURATION,
        Unit::Seconds,
        "Duration of a table maintenance pass over every K2 table"
    );
    describe_counter!(
        MAINTENANCE_FILES_DELETED,
        Unit::Count,
        "Files deleted by table maintenance, by kind (data, manifest, manifest_list, metadata, orphan)"
    );
    describe_counter!(
        MAINTENANCE_FILES_COMPACTED,
        Unit::Count,
        "Small data files rewritten into larger ones by table maintenance"
    );
    describe_gauge!(
        MAINTENANCE_LAST_COMPACTION,
        Unit::Seconds,
        "Unix time of the last replace snapshot table maintenance committed (a compaction or a manifest merge)"
    );
    describe_counter!(
        PROBABLE_DUPLICATES,
        Unit::Count,
        "Trades only the long-window Bloom filter had seen, by policy (keep or drop); all recorded in k2.probable_duplicates"
    );
    describe_counter!(
        STATE_LOADS,
        Unit::Count,
        "Lane stage state loads at lane start, by stage and outcome (found, none)"
    );
    describe_counter!(
        RECORDS_CONSUMED,
        Unit::Count,
        "Kafka records read by partition consumers"
    );
    describe_counter!(
        DEAD_LETTERS,
        Unit::Count,
        "Records sent to k2.dead_letters, by reason kind"
    );
    describe_counter!(
        SEQUENCE_GAPS,
        Unit::Count,
        "Gaps in per-symbol sequence numbers still open when their reorder window closed, by exchange"
    );
    describe_counter!(
        SEQUENCE_MISSING,
        Unit::Count,
        "Sequence numbers missing in reported gaps, by exchange"
    );
    describe_counter!(
        SEQUENCE_RESETS,
        Unit::Count,
        "Per-symbol sequence restarts (session changes), by exchange"
    );
    describe_counter!(
        DUPLICATES_DROPPED,
        Unit::Count,
        "Records dropped as exact duplicates"
    );
    describe_counter!(
        RECORDS_SHED,
        Unit::Count,
        "Records left out by the load shedder, by priority and level; every one is in k2.shed_ledger"
    );
    describe_gauge!(
        LANES_FAILED,
        Unit::Count,
        "Lanes marked failed after too many restarts (the process is not ready)"
    );
    describe_gauge!(
        PARTITIONS_PAUSED,
        Unit::Count,
        "Partitions whose consumption is paused because commits are failing"
    );
    describe_gauge!(
        DEGRADATION_LEVEL,
        Unit::Count,
        "Degradation level in force: 0 NORMAL, 1 SOFT, 2 GRACEFUL, 3 AGGRESSIVE, 4 CIRCUIT_BREAK"
    );
    describe_counter!(
        DEGRADATION_TRANSITIONS,
        Unit::Count,
        "Degradation level changes, by from and to"
    );
    describe_gauge!(
        DEGRADATION_SIGNAL,
        Unit::Count,
        "Latest value of each degradation signal, by signal"
    );
    describe_gauge!(
        CIRCUIT_BREAKER_STATE,
        Unit::Count,
        "Circuit breaker state by breaker (catalog, storage): 0 closed, 1 half open, 2 open"
    );
    describe_counter!(
        BACKFILL_RECORDS,
        Unit::Count,
        "Records handled by k2 backfill, by outcome (committed, present, dead_letter, expired)"
    );
    describe_counter!(
        DATA_FILES_WRITTEN,
        Unit::Count,
        "Parquet data files written by batchers"
    );
    describe_counter!(
        DATA_FILE_BYTES,
        Unit::Bytes,
        "Bytes of Parquet data files written"
    );
    describe_gauge!(
        BATCHER_BUFFERED_BYTES,
        Unit::Bytes,
        "Bytes buffered in batchers, per partition"
    );
    describe_counter!(COMMITS, Unit::Count, "Iceberg commits, by table and outcome");
    describe_histogram!(
        COMMIT_DURATION,
        Unit::Seconds,
        "Iceberg commit latency: from the start of a commit (state staging included) until the catalog shows it"
    );
    describe_gauge!(
        COMMIT_PENDING_BYTES,
        Unit::Bytes,
        "Bytes of data files written but not committed"
    );
    describe_counter!(TRADES_COMMITTED, Unit::Count, "Trades made durable in Iceberg");
    describe_counter!(
        REFERENCE_COMMITTED,
        Unit::Count,
        "Reference-data updates made durable in market.reference"
    );
    describe_counter!(
        COMMIT_FENCED,
        Unit::Count,
        "Partitions refused at commit because the table moved past them"
    );
    describe_counter!(
        RETENTION_LOST_RECORDS,
        Unit::Count,
        "Records Kafka deleted before K2 read them"
    );
    describe_counter!(
        LANE_RESTARTS,
        Unit::Count,
        "Lanes rebuilt after a failure, by stage"
    );
    describe_gauge!(LANES_ACTIVE, Unit::Count, "Lanes currently running");
    describe_gauge!(
        CONSUMER_LAG,
        Unit::Count,
        "Records not durable in Iceberg yet: high watermark minus the table's offset (or the lane's start), per partition"
    );
    describe_histogram!(
        COMMIT_VERIFY_DURATION,
        Unit::Seconds,
        "Reading a table back after a commit to see that the catalog made it"
    );
    describe_counter!(
        STALE_PARTITIONS,
        Unit::Count,
        "Partitions whose files were refused as stale for longer than a commit interval (an error)"
    );
    describe_counter!(
        LANE_STARTS_SUPERSEDED,
        Unit::Count,
        "Lane starts that a rebalance or a newer rebuild replaced before they acted"
    );
    describe_counter!(
        STATE_PROMOTIONS,
        Unit::Count,
        "Stage-state scopes put in force after a commit, by outcome (ok, refused, error)"
    );
    describe_counter!(
        ASSIGNMENT_FAILURES,
        Unit::Count,
        "Assigned partitions that could not be positioned or given a queue (the group is rejoined)"
    );
    describe_counter!(
        OFFSET_GAPS,
        Unit::Count,
        "Offsets Kafka skipped for a reason other than retention, accepted (kafka.offset_gaps = accept)"
    );
    describe_gauge!(
        RETENTION_HEADROOM_RATIO,
        Unit::Count,
        "Records retention deletes before it reaches the next record to read, over what the log retains (1 = caught up), per partition"
    );
    describe_gauge!(
        RETENTION_HEADROOM_SECONDS,
        Unit::Seconds,
        "Seconds until retention reaches the next record to read at the current rates (+Inf: not closing in), per partition"
    );
    describe_counter!(
        EARLY_SHED_RECORDS,
        Unit::Count,
        "Records shed by their Kafka key before decoding, by priority (also counted in k2_shed_records_total)"
    );
    describe_counter!(
        FAULTS_INJECTED,
        Unit::Count,
        "Faults injected (POST /v1/faults, drills, tests), by kind"
    );
    describe_gauge!(
        FAULTS_ACTIVE,
        Unit::Count,
        "Injected faults in force (not yet cleared, expired or spent)"
    );
    describe_counter!(
        PARTITION_RESTARTS,
        Unit::Count,
        "Partitions restarted alone at their log start after retention overtook them"
    );
    describe_gauge!(
        FIRST_RECORD_CONSUMED,
        Unit::Seconds,
        "Unix time at which this process first passed consumed records down a lane (k2 bench: the end of the join)"
    );
    describe_gauge!(
        LAST_COMMIT,
        Unit::Seconds,
        "Unix time at which this process's last successful commit was verified (k2 bench: when the last record became durable)"
    );
    describe_gauge!(
        LAST_RECORD_CONSUMED,
        Unit::Seconds,
        "Unix time at which this process last passed consumed records down a lane"
    );
    describe_counter!(
        WINDOW_IDS_FORGOTTEN,
        Unit::Count,
        "Ids dropped from the dedup window because the table stood behind what this process committed"
    );
}
