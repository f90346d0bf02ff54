//! Query answers as JSON (the default), CSV or an Arrow IPC stream, chosen
//! by the request's `Accept` header. JSON carries decimals as strings with
//! all their places, so no client reads a price through a float.

use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef};

use super::QueryAnswer;

pub const CSV: &str = "text/csv";
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";
pub const JSON: &str = "application/json";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Arrow,
}

impl Format {
    /// The first media type of `Accept` that K2 serves; JSON when none is
    /// given or it allows anything. Err names what was asked for.
    pub fn from_accept(accept: Option<&str>) -> Result<Self, String> {
        let Some(accept) = accept.map(str::trim).filter(|a| !a.is_empty()) else {
            return Ok(Self::Json);
        };
        for media in accept.split(',') {
            let media = media.split(';').next().unwrap_or_default().trim();
            match media {
                JSON | "application/*" | "*/*" => return Ok(Self::Json),
                CSV | "text/*" => return Ok(Self::Csv),
                ARROW_STREAM => return Ok(Self::Arrow),
                _ => {}
            }
        }
        Err(format!(
            "cannot answer in {accept:?}: ask for {JSON}, {CSV} or {ARROW_STREAM}"
        ))
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => JSON,
            Self::Csv => CSV,
            Self::Arrow => ARROW_STREAM,
        }
    }
}

/// The answer's rows in `format`. JSON is an object with the rows and the
/// cut they come from; CSV and Arrow carry the rows only (the HTTP layer
/// puts the rest in headers).
pub fn encode(answer: &QueryAnswer, format: Format) -> Result<Vec<u8>, ArrowError> {
    match format {
        Format::Json => {
            let head = serde_json::json!({
                "snapshot_id": answer.snapshot_id,
                "live_rows": answer.live_rows,
                "row_count": answer.rows,
                "truncated": answer.truncated,
                "columns": answer.schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>(),
            });
            // The rows go in as Arrow's JSON writer wrote them, not parsed
            // into values and written again.
            let mut out = serde_json::to_vec(&head).map_err(|e| ArrowError::JsonError(e.to_string()))?;
            out.pop(); // the object's closing brace
            out.extend_from_slice(b",\"rows\":");
            write_json_rows(&answer.batches, &mut out)?;
            out.push(b'}');
            Ok(out)
        }
        Format::Csv => {
            let mut out = Vec::new();
            let mut writer = arrow_csv::WriterBuilder::new().with_header(true).build(&mut out);
            if answer.batches.is_empty() {
                writer.write(&RecordBatch::new_empty(answer.schema.clone()))?;
            }
            for batch in &answer.batches {
                writer.write(batch)?;
            }
            drop(writer);
            Ok(out)
        }
        Format::Arrow => {
            let mut out = Vec::new();
            let mut writer = arrow_ipc::writer::StreamWriter::try_new(&mut out, &answer.schema)?;
            for batch in &answer.batches {
                writer.write(batch)?;
            }
            writer.finish()?;
            drop(writer);
            Ok(out)
        }
    }
}

/// The rows as JSON objects, decimals as strings.
pub fn json_rows(batches: &[RecordBatch]) -> Result<serde_json::Value, ArrowError> {
    let mut out = Vec::new();
    write_json_rows(batches, &mut out)?;
    serde_json::from_slice(&out).map_err(|e| ArrowError::JsonError(e.to_string()))
}

/// Appends the rows to `out` as a JSON array of objects, decimals as strings.
fn write_json_rows(batches: &[RecordBatch], out: &mut Vec<u8>) -> Result<(), ArrowError> {
    let start = out.len();
    {
        let mut writer = arrow_json::ArrayWriter::new(&mut *out);
        for batch in batches {
            writer.write(&decimals_as_text(batch)?)?;
        }
        writer.finish()?;
    }
    if out.len() == start {
        out.extend_from_slice(b"[]");
    }
    Ok(())
}

fn decimals_as_text(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    if !schema.fields().iter().any(|f| is_decimal(f.data_type())) {
        return Ok(batch.clone());
    }
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        if is_decimal(field.data_type()) {
            fields.push(Field::new(field.name(), DataType::Utf8, field.is_nullable()));
            columns.push(arrow_cast::cast(column, &DataType::Utf8)?);
        } else {
            fields.push(field.as_ref().clone());
            columns.push(column.clone());
        }
    }
    let schema: SchemaRef = Arc::new(Schema::new(fields));
    RecordBatch::try_new(schema, columns)
}

fn is_decimal(data_type: &DataType) -> bool {
    matches!(data_type, DataType::Decimal128(..) | DataType::Decimal256(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_picks_the_first_served_type_and_refuses_the_rest() {
        assert_eq!(Format::from_accept(None), Ok(Format::Json));
        assert_eq!(Format::from_accept(Some("*/*")), Ok(Format::Json));
        assert_eq!(
            Format::from_accept(Some("text/csv; charset=utf-8")),
            Ok(Format::Csv)
        );
        assert_eq!(
            Format::from_accept(Some("application/xml, application/vnd.apache.arrow.stream")),
            Ok(Format::Arrow)
        );
        let refused = Format::from_accept(Some("application/xml")).unwrap_err();
        assert!(refused.contains("application/xml"), "{refused}");
    }

    #[test]
    fn json_keeps_decimals_exact_as_text() {
        let price = arrow_array::Decimal128Array::from(vec![12_345_678_901_234_567i128])
            .with_precision_and_scale(18, 8)
            .unwrap();
        let batch = RecordBatch::try_from_iter([("price", Arc::new(price) as ArrayRef)]).unwrap();
        let rows = json_rows(&[batch]).unwrap();
        assert_eq!(rows, serde_json::json!([{ "price": "123456789.01234567" }]));
    }

    #[test]
    fn a_json_answer_is_one_object_with_its_rows_or_an_empty_array() {
        let schema: SchemaRef = Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new(
            "n",
            DataType::Int64,
            false,
        )]));
        let answer = |batches: Vec<RecordBatch>| QueryAnswer {
            schema: schema.clone(),
            rows: batches.iter().map(RecordBatch::num_rows).sum(),
            batches,
            truncated: false,
            snapshot_id: Some(7),
            live_rows: 1,
            timings: Default::default(),
        };
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(arrow_array::Int64Array::from(vec![1, 2]))],
        )
        .unwrap();
        let body: serde_json::Value =
            serde_json::from_slice(&encode(&answer(vec![batch]), Format::Json).unwrap()).unwrap();
        assert_eq!(body["rows"], serde_json::json!([{ "n": 1 }, { "n": 2 }]));
        assert_eq!(
            (body["row_count"].as_u64(), body["snapshot_id"].as_i64()),
            (Some(2), Some(7))
        );
        let empty: serde_json::Value =
            serde_json::from_slice(&encode(&answer(Vec::new()), Format::Json).unwrap()).unwrap();
        assert_eq!(empty["rows"], serde_json::json!([]));
        assert_eq!(empty["columns"], serde_json::json!(["n"]));
    }
}
