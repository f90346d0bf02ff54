//! `k2 query "SELECT ..."`: the SQL endpoint from a terminal. Against a
//! running K2 (its `/v1/query`, live rows included) when one answers at
//! `http.listen` or `--server`; otherwise straight against the catalog, the
//! committed tables only. Prints a table and a line saying what it read.

use std::path::Path;

use anyhow::Context as _;
use arrow_array::RecordBatch;

use super::QueryEngine;
use super::output::ARROW_STREAM;
use crate::config::K2Config;
use crate::storage::catalog::open_existing_catalog;
use crate::storage::tables::TableIdents;

/// What a query returned and where it came from.
pub struct CliAnswer {
    pub batches: Vec<RecordBatch>,
    pub rows: usize,
    pub truncated: bool,
    pub snapshot_id: Option<i64>,
    pub live_rows: usize,
    /// The K2 that answered; None: the catalog, directly.
    pub server: Option<String>,
}

/// `server`: a K2's base URL; None: the one `http.listen` names. `direct`:
/// skip the server and read the catalog.
pub async fn query(
    config: &K2Config,
    base_dir: &Path,
    sql: &str,
    server: Option<&str>,
    direct: bool,
) -> anyhow::Result<CliAnswer> {
    if !direct {
        let url = server.map_or_else(|| base_url(&config.http.listen), str::to_string);
        match over_http(&url, sql).await {
            Ok(answer) => return Ok(answer),
            Err(HttpFailure::Unreachable(err)) => {
                eprintln!(
                    "k2 query: no K2 answers at {url} ({err}); reading the catalog directly (committed rows only)"
                );
            }
            Err(HttpFailure::Refused(message)) => anyhow::bail!("{message}"),
        }
    }
    let catalog = open_existing_catalog(&config.catalog, base_dir).await?;
    let engine = QueryEngine::new(
        catalog,
        TableIdents::new(&config.catalog.namespace),
        &config.kafka.topic,
        None,
        None,
        config.query.clone(),
    )
    .await?;
    let answer = engine.sql(sql).await?;
    Ok(CliAnswer {
        batches: answer.batches,
        rows: answer.rows,
        truncated: answer.truncated,
        snapshot_id: answer.snapshot_id,
        live_rows: answer.live_rows,
        server: None,
    })
}

/// `http://host:port` of a listen address; a wildcard host means this machine.
fn base_url(listen: &str) -> String {
    let local = listen
        .replace("0.0.0.0:", "127.0.0.1:")
        .replace("[::]:", "[::1]:");
    format!("http://{local}")
}

enum HttpFailure {
    /// Nothing listens there: fall back to the catalog.
    Unreachable(String),
    /// K2 answered with an error: report it.
    Refused(String),
}

async fn over_http(base: &str, sql: &str) -> Result<CliAnswer, HttpFailure> {
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{base}/v1/query"))
        .header(reqwest::header::ACCEPT, ARROW_STREAM)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(serde_json::json!({ "sql": sql }).to_string())
        .send()
        .await
        .map_err(|e| HttpFailure::Unreachable(e.to_string()))?;
    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (truncated, snapshot, live) = (
        header("x-k2-truncated"),
        header("x-k2-snapshot-id"),
        header("x-k2-live-rows"),
    );
    let body = response
        .bytes()
        .await
        .map_err(|e| HttpFailure::Refused(format!("failed to read K2's answer: {e}")))?;
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(HttpFailure::Refused(format!(
            "K2 at {base} refused the query (HTTP {status}): {message}"
        )));
    }
    let reader = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None)
        .map_err(|e| HttpFailure::Refused(format!("K2's answer is not an Arrow stream: {e}")))?;
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| HttpFailure::Refused(format!("K2's answer is not an Arrow stream: {e}")))?;
    Ok(CliAnswer {
        rows: batches.iter().map(RecordBatch::num_rows).sum(),
        batches,
        truncated: truncated.as_deref() == Some("true"),
        snapshot_id: snapshot.and_then(|s| s.parse().ok()),
        live_rows: live.and_then(|s| s.parse().ok()).unwrap_or(0),
        server: Some(base.to_string()),
    })
}

/// The rows as a table, then a line on what was read.
pub fn render(answer: &CliAnswer) -> anyhow::Result<String> {
    let table =
        arrow_cast::pretty::pretty_format_batches(&answer.batches).context("failed to format the rows")?;
    let source = match &answer.server {
        Some(server) => format!("K2 at {server}, {} live rows in the cut", answer.live_rows),
        None => "the catalog, committed rows only".to_string(),
    };
    let snapshot = answer
        .snapshot_id
        .map_or_else(|| "no snapshot yet".to_string(), |s| format!("snapshot {s}"));
    let cut = if answer.truncated {
        " (cut at query.max_rows)"
    } else {
        ""
    };
    Ok(format!(
        "{table}\n{} rows{cut} from {source}, trades at {snapshot}",
        answer.rows
    ))
}

#[cfg(test)]
mod tests {
    use super::base_url;

    #[test]
    fn a_wildcard_listen_address_is_reached_on_this_machine() {
        assert_eq!(base_url("0.0.0.0:8080"), "http://127.0.0.1:8080");
        assert_eq!(base_url("127.0.0.1:9000"), "http://127.0.0.1:9000");
    }
}
