//! Query answers as JSON (the default), CSV or an Arrow IPC stream, chosen
//! by the request's `Accept` header. JSON carries decimals as strings with
//! all their places, so no client reads a price through a float.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Decimal128Type, TimestampMicrosecondType};
use arrow_array::{Array, ArrayRef, Decimal128Array, RecordBatch, TimestampMicrosecondArray};
use arrow_json::writer::{Encoder, EncoderFactory, EncoderOptions, NullableEncoder};
use arrow_schema::{ArrowError, DataType, FieldRef, TimeUnit};

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
        let mut writer = arrow_json::WriterBuilder::new()
            .with_encoder_factory(Arc::new(ExactText))
            .build::<_, arrow_json::writer::JsonArray>(&mut *out);
        for batch in batches {
            writer.write(batch)?;
        }
        writer.finish()?;
    }
    if out.len() == start {
        out.extend_from_slice(b"[]");
    }
    Ok(())
}

/// Arrow's JSON writer, told how K2 writes two kinds of column: decimals as
/// strings with all their places (Arrow writes them as numbers, which a
/// client reads through a float), and UTC timestamps as RFC 3339 text, the
/// same text as Arrow's default (`2026-12-06T20:00:00.123456Z`) without the
/// string it allocates for every value. Everything else is Arrow's own.
#[derive(Debug)]
struct ExactText;

impl EncoderFactory for ExactText {
    fn make_default_encoder<'a>(
        &self,
        _field: &'a FieldRef,
        array: &'a dyn Array,
        _options: &'a EncoderOptions,
    ) -> Result<Option<NullableEncoder<'a>>, ArrowError> {
        let nulls = array.nulls().cloned();
        let encoder: Box<dyn Encoder + 'a> = match array.data_type() {
            DataType::Decimal128(precision, scale) if *scale >= 0 => Box::new(DecimalText {
                array: array.as_primitive::<Decimal128Type>(),
                precision: usize::from(*precision),
                scale: scale.unsigned_abs() as usize,
            }),
            DataType::Decimal32(..)
            | DataType::Decimal64(..)
            | DataType::Decimal128(..)
            | DataType::Decimal256(..) => {
                // Other widths and negative scales (SQL only) go through
                // Arrow's cast to text.
                let text = arrow_cast::cast(array, &DataType::Utf8)?;
                return Ok(Some(NullableEncoder::new(Box::new(OwnedText(text)), nulls)));
            }
            DataType::Timestamp(TimeUnit::Microsecond, Some(tz)) if is_utc(tz) => {
                let array = array.as_primitive::<TimestampMicrosecondType>();
                // Years 0 to 9999 have four digits; anything else is left to
                // Arrow's formatter.
                let in_range = |us: &i64| (MIN_FOUR_DIGIT_YEAR_US..=MAX_FOUR_DIGIT_YEAR_US).contains(us);
                if !array.values().iter().all(in_range) {
                    return Ok(None);
                }
                Box::new(UtcMicrosText(array))
            }
            _ => return Ok(None),
        };
        Ok(Some(NullableEncoder::new(encoder, nulls)))
    }
}

/// 0000-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z in microseconds.
const MIN_FOUR_DIGIT_YEAR_US: i64 = -62_167_219_200_000_000;
const MAX_FOUR_DIGIT_YEAR_US: i64 = 253_402_300_799_999_999;

fn is_utc(tz: &str) -> bool {
    matches!(tz, "+00:00" | "UTC" | "Z")
}

/// A Decimal128 as a JSON string with all its places: what Arrow's cast to
/// text gives (`format_decimal_str`: the unscaled digits, at most
/// `precision` of them, with the point `scale` places from the right).
struct DecimalText<'a> {
    array: &'a Decimal128Array,
    precision: usize,
    scale: usize,
}

impl Encoder for DecimalText<'_> {
    fn encode(&mut self, idx: usize, out: &mut Vec<u8>) {
        let value = self.array.value(idx);
        let mut digits_buffer = itoa::Buffer::new();
        let digits = digits_buffer.format(value.unsigned_abs()).as_bytes();
        let digits = &digits[..digits.len().min(self.precision)];
        out.push(b'"');
        if value < 0 {
            out.push(b'-');
        }
        if self.scale == 0 {
            out.extend_from_slice(digits);
        } else if digits.len() > self.scale {
            let (whole, places) = digits.split_at(digits.len() - self.scale);
            out.extend_from_slice(whole);
            out.push(b'.');
            out.extend_from_slice(places);
        } else {
            out.extend_from_slice(b"0.");
            out.resize(out.len() + self.scale - digits.len(), b'0');
            out.extend_from_slice(digits);
        }
        out.push(b'"');
    }
}

/// A column already cast to text.
struct OwnedText(ArrayRef);

impl Encoder for OwnedText {
    fn encode(&mut self, idx: usize, out: &mut Vec<u8>) {
        let text = self.0.as_string::<i32>().value(idx);
        serde_json::to_writer(&mut *out, text).expect("writing to a Vec cannot fail");
    }
}

/// A UTC timestamp of years 0 to 9999 as RFC 3339 text the way chrono's
/// `to_rfc3339_opts(SecondsFormat::AutoSi, true)` writes it (Arrow's default
/// for timestamps with a time zone): no fraction on a whole second, else 3
/// or 6 places, and `Z`.
struct UtcMicrosText<'a>(&'a TimestampMicrosecondArray);

impl Encoder for UtcMicrosText<'_> {
    fn encode(&mut self, idx: usize, out: &mut Vec<u8>) {
        let us = self.0.value(idx);
        let (days, micros_of_day) = (us.div_euclid(86_400_000_000), us.rem_euclid(86_400_000_000));
        let (year, month, day) = civil_from_days(days);
        let seconds = micros_of_day / 1_000_000;
        let fraction = micros_of_day % 1_000_000;
        out.push(b'"');
        push_digits(out, year, 4);
        out.push(b'-');
        push_digits(out, month, 2);
        out.push(b'-');
        push_digits(out, day, 2);
        out.push(b'T');
        push_digits(out, seconds / 3_600, 2);
        out.push(b':');
        push_digits(out, seconds / 60 % 60, 2);
        out.push(b':');
        push_digits(out, seconds % 60, 2);
        if fraction != 0 {
            out.push(b'.');
            if fraction % 1_000 == 0 {
                push_digits(out, fraction / 1_000, 3);
            } else {
                push_digits(out, fraction, 6);
            }
        }
        out.extend_from_slice(b"Z\"");
    }
}

/// `value` (not negative) in exactly `width` decimal digits, zero-padded.
fn push_digits(out: &mut Vec<u8>, value: i64, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    let mut rest = value;
    for slot in out[start..].iter_mut().rev() {
        *slot = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
}

/// The proleptic Gregorian (year, month, day) of a day counted from
/// 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_schema::{Field, Schema, SchemaRef};

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
        let price = arrow_array::Decimal128Array::from(vec![
            12_345_678_901_234_567i128,
            4_250_000_000,
            1,
            -150_000_000,
        ])
        .with_precision_and_scale(18, 8)
        .unwrap();
        let batch = RecordBatch::try_from_iter([("price", Arc::new(price) as ArrayRef)]).unwrap();
        let rows = json_rows(&[batch]).unwrap();
        assert_eq!(
            rows,
            serde_json::json!([
                { "price": "123456789.01234567" },
                { "price": "42.50000000" },
                { "price": "0.00000001" },
                { "price": "-1.50000000" },
            ])
        );
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

    /// What K2 wrote before its own encoders: decimals cast to text, then
    /// Arrow's JSON writer with its defaults.
    fn reference_json(batch: &RecordBatch) -> String {
        let schema = batch.schema();
        let (fields, columns): (Vec<Field>, Vec<ArrayRef>) = schema
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(field, column)| match field.data_type() {
                DataType::Decimal128(..) => (
                    Field::new(field.name(), DataType::Utf8, field.is_nullable()),
                    arrow_cast::cast(column, &DataType::Utf8).unwrap(),
                ),
                _ => (field.as_ref().clone(), column.clone()),
            })
            .unzip();
        let text = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
        let mut out = Vec::new();
        let mut writer = arrow_json::ArrayWriter::new(&mut out);
        writer.write(&text).unwrap();
        writer.finish().unwrap();
        drop(writer);
        String::from_utf8(out).unwrap()
    }

    fn k2_json(batch: &RecordBatch) -> String {
        let mut out = Vec::new();
        write_json_rows(std::slice::from_ref(batch), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn decimals_are_written_as_arrow_casts_them_to_text() {
        let values = [
            0i128,
            1,
            -1,
            7,
            -99_999_999,
            100_000_000,
            12_345_678_901_234_567,
            -12_345_678_901_234_567,
            999_999_999_999_999_999,
        ];
        for (precision, scale) in [(18u8, 8i8), (18, 0), (18, 2), (38, 18), (38, 8), (18, 18)] {
            let column = arrow_array::Decimal128Array::from(values.to_vec())
                .with_precision_and_scale(precision, scale)
                .unwrap();
            let nullable = arrow_array::Decimal128Array::from(vec![Some(5i128), None, Some(-5)])
                .with_precision_and_scale(precision, scale)
                .unwrap();
            for column in [column, nullable] {
                let batch = RecordBatch::try_from_iter([("price", Arc::new(column) as ArrayRef)]).unwrap();
                assert_eq!(
                    k2_json(&batch),
                    reference_json(&batch),
                    "Decimal({precision}, {scale})"
                );
            }
        }
    }

    #[test]
    fn utc_timestamps_are_written_as_chrono_writes_rfc_3339() {
        let day = 86_400_000_000i64;
        let mut micros = vec![
            0,
            1,
            -1,
            1_000,
            1_000_000,
            -1_000_000,
            1_790_000_000_123_456,
            1_790_000_000_120_000,
            1_790_000_000_000_000,
            MIN_FOUR_DIGIT_YEAR_US,
            MAX_FOUR_DIGIT_YEAR_US,
            951_782_400_000_000,    // 2000-02-29
            -2_203_977_600_000_000, // 1900-03-01
            1_709_164_800_000_001,  // 2024-02-29
        ];
        // A day and a bit apart across four centuries either side of 1970.
        micros.extend(
            (-146_097i64..146_097)
                .step_by(37)
                .map(|d| d * day + d.rem_euclid(1_000) * 1_237_001),
        );
        let expected: Vec<String> = micros
            .iter()
            .map(|us| {
                chrono::DateTime::from_timestamp_micros(*us)
                    .unwrap()
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
            })
            .collect();
        for tz in ["+00:00", "UTC"] {
            let column = TimestampMicrosecondArray::from(micros.clone()).with_timezone(tz);
            let batch = RecordBatch::try_from_iter([("t", Arc::new(column) as ArrayRef)]).unwrap();
            let rows: Vec<serde_json::Value> = serde_json::from_str(&k2_json(&batch)).unwrap();
            let written: Vec<&str> = rows.iter().map(|row| row["t"].as_str().unwrap()).collect();
            assert_eq!(written, expected, "time zone {tz}");
        }
        // Arrow's default, exactly, for a time zone K2 does not write itself
        // and for years that do not have four digits.
        for (tz, us) in [
            ("+00:00", MAX_FOUR_DIGIT_YEAR_US + 1),
            ("+00:00", MIN_FOUR_DIGIT_YEAR_US - 1),
            ("+02:00", 0),
        ] {
            let column = TimestampMicrosecondArray::from(vec![Some(us), None]).with_timezone(tz);
            let batch = RecordBatch::try_from_iter([("t", Arc::new(column) as ArrayRef)]).unwrap();
            assert_eq!(k2_json(&batch), reference_json(&batch), "{tz} {us}");
        }
    }

    #[test]
    fn trade_rows_are_written_exactly_as_before_k2_wrote_them_itself() {
        let schema = Arc::new(
            iceberg::arrow::schema_to_arrow_schema(&crate::storage::tables::trades_schema()).unwrap(),
        );
        let mut builder = crate::storage::writer::TradeBatchBuilder::with_capacity(3);
        for (n, price) in [1i128, 6_543_210_000_000, 12_345_678_912_345_678]
            .into_iter()
            .enumerate()
        {
            builder.push(&crate::model::Trade {
                exchange: "BINANCE".into(),
                symbol: "BTC\"USDT".into(),
                sequence: n as i64,
                trade_id: format!("T-{n}").into(),
                price,
                quantity: 50_000_000 - n as i128,
                side: crate::model::Side::Buy,
                event_time_us: 1_790_000_000_123_456 + n as i64 * 999,
                ingest_time_us: 1_790_000_000_200_000,
                partition: 3,
                offset: 40 + n as i64,
            });
        }
        let batch = builder.finish(&schema).unwrap();
        assert_eq!(k2_json(&batch), reference_json(&batch));
    }
}
