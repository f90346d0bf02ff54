//! When Kafka deletes records before K2 read them (retention outran the lag),
//! K2 must report the lost offset range loudly and account for it, never
//! skip it in silence. The mock broker keeps only ~5 MiB per partition, which
//! makes the situation easy to create: commit some, stop, produce far more
//! than the partition keeps, start again.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{TOPIC, committed_rows, wait_for};
use k2::loadgen::{GeneratorParams, Spread, preload};
use k2::storage::catalog::open_catalog;
use k2::storage::reader::{scan_dead_letters, scan_trade_keys};
use k2::storage::tables::TableIdents;

const BEFORE: i64 = 20_000;
const AFTER: i64 = 120_000;

async fn produce(bootstrap: String, count: i64, seed: u64) {
    let generator = GeneratorParams {
        seed,
        malformed_ratio: 0.0,
        ..GeneratorParams::default()
    };
    tokio::task::spawn_blocking(move || preload(&bootstrap, TOPIC, count as u64, generator, Spread::ByKey))
        .await
        .unwrap()
        .unwrap();
}

#[actix_rt::test]
async fn offsets_deleted_by_retention_are_reported_as_a_lost_range() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(1);
    let config = common::config(dir.path(), "k2-retention");

    produce(broker.bootstrap_servers().to_string(), BEFORE, 21).await;
    let first = common::start(&config, &broker, dir.path(), "first").await;
    wait_for(
        Duration::from_secs(120),
        "the first records committed",
        || async { committed_rows(&first).await >= BEFORE as u64 },
    )
    .await;
    first.shutdown().await.unwrap();

    // ~17 MiB into one partition while nobody reads: the oldest are deleted.
    produce(broker.bootstrap_servers().to_string(), AFTER, 22).await;
    let second = common::start(&config, &broker, dir.path(), "second").await;
    let total = BEFORE + AFTER;
    wait_for(
        Duration::from_secs(180),
        "the partition caught up to the end",
        || async {
            let status = second.status().await.unwrap();
            status.committer.committed_offsets.get(&0) == Some(&total)
        },
    )
    .await;
    let status = second.status().await.unwrap();
    second.shutdown().await.unwrap();

    let lost = status.lanes[0].lost_records as i64;
    assert!(
        lost > 0,
        "retention must have deleted records the pipeline had not read"
    );
    assert!(
        lost < AFTER,
        "the mock keeps the newest records ({lost} reported lost)"
    );

    let catalog = open_catalog(&config.catalog, dir.path()).await.unwrap();
    let idents = TableIdents::new(&config.catalog.namespace);
    let trades = scan_trade_keys(&catalog.load_table(&idents.trades).await.unwrap())
        .await
        .unwrap();
    let offsets: BTreeSet<i64> = trades.positions.iter().map(|(_, o)| *o).collect();
    assert_eq!(
        offsets.len(),
        trades.positions.len(),
        "an offset was committed twice"
    );
    let expected: BTreeSet<i64> = (0..BEFORE).chain(BEFORE + lost..total).collect();
    assert_eq!(
        offsets, expected,
        "the table holds everything except the lost range, exactly once"
    );

    let dead = scan_dead_letters(&catalog.load_table(&idents.dead_letters).await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        dead.len(),
        1,
        "one dead letter accounts for the lost range: {dead:?}"
    );
    assert_eq!(dead[0].offset, BEFORE);
    let range = format!("[{BEFORE}, {})", BEFORE + lost);
    assert!(
        dead[0].reason.starts_with("retention") && dead[0].reason.contains(&range),
        "the dead letter names the lost range {range}: {}",
        dead[0].reason
    );
}
