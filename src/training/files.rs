//! Labelled payments from files: BankSim CSV and Parquet, one file or every
//! `*.csv` and `*.parquet` under a local directory or an S3 prefix.
//!
//! Why one module for both places: the rules are the same (which names count,
//! in which order they are read, what a row must hold); only listing and
//! fetching differ. S3 uses the model store's client (`model::s3_client`),
//! so data and models take the same AWS settings. Parquet goes through the
//! `parquet` crate's row API (no arrow: far less to compile), with columns
//! named like the BankSim CSV header; see `read_parquet`.

use std::io::BufReader;
use std::path::{Path, PathBuf};

use aws_sdk_s3::error::DisplayErrorContext;
use parquet::file::reader::{ChunkReader, FileReader, SerializedFileReader};
use parquet::record::Field;

use super::{Result, TrainingError};
use crate::model::S3Url;
use crate::payment::{banksim_column_optional, BankSimReader, BANKSIM_COLUMNS, BANKSIM_EPOCH_MS, BANKSIM_ZIP, STEP_MS};
use crate::Payment;

/// How a file's rows are laid out, by its name's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// BankSim CSV (`.csv`).
    Csv,
    /// Apache Parquet (`.parquet`), columns named like the BankSim header.
    Parquet,
}

impl FileFormat {
    /// The format of a file named `name`; `None` for any other extension.
    pub fn of(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".csv") {
            Some(Self::Csv)
        } else if lower.ends_with(".parquet") {
            Some(Self::Parquet)
        } else {
            None
        }
    }
}

/// One file to read.
#[derive(Debug, Clone)]
struct DataFile {
    /// Where it is, for errors: a path or `s3://bucket/key`.
    location: String,
    /// Prefix of the payment ids of its rows (the files carry no ids).
    id_prefix: String,
    format: FileFormat,
    place: Place,
}

#[derive(Debug, Clone)]
enum Place {
    Local(PathBuf),
    S3 { bucket: String, key: String },
}

fn data_err(location: &str, message: impl Into<String>) -> TrainingError {
    TrainingError::Data { location: location.to_string(), message: message.into() }
}

/// Every labelled payment of the files at `location`: a local file or
/// directory, `s3://bucket/key.csv|.parquet` (one object) or
/// `s3://bucket/prefix/` (every `*.csv` and `*.parquet` object under it).
/// Files are read in name order; a row without a label is an error.
pub(super) async fn load(location: &str, on_row: &dyn Fn()) -> Result<Vec<Payment>> {
    let client = match S3Url::parse(location) {
        Some(_) => Some(crate::model::s3_client().await),
        None => None,
    };
    let files = list(location, client.as_ref()).await?;
    let mut payments = Vec::new();
    for file in &files {
        let before = payments.len();
        match &file.place {
            Place::Local(path) => {
                let open =
                    std::fs::File::open(path).map_err(|e| data_err(&file.location, format!("cannot open it: {e}")))?;
                match file.format {
                    FileFormat::Csv => read_csv(BufReader::with_capacity(1 << 20, open), file, &mut payments, on_row)?,
                    FileFormat::Parquet => read_parquet(open, file, &mut payments, on_row)?,
                }
            }
            Place::S3 { bucket, key } => {
                let client = client.as_ref().expect("an S3 client for S3 locations");
                let object = client.get_object().bucket(bucket).key(key).send().await.map_err(|e| {
                    data_err(
                        &file.location,
                        format!(
                            "cannot read it from S3: {} (check AWS_ENDPOINT_URL and the AWS credentials)",
                            DisplayErrorContext(e)
                        ),
                    )
                })?;
                let data = object
                    .body
                    .collect()
                    .await
                    .map_err(|e| data_err(&file.location, format!("reading from S3: {e}")))?
                    .into_bytes();
                match file.format {
                    FileFormat::Csv => read_csv(std::io::Cursor::new(data), file, &mut payments, on_row)?,
                    FileFormat::Parquet => read_parquet(data, file, &mut payments, on_row)?,
                }
            }
        }
        tracing::info!(file = %file.location, rows = payments.len() - before, "read training data");
    }
    Ok(payments)
}

/// The files at `location`, in name order.
async fn list(location: &str, client: Option<&aws_sdk_s3::Client>) -> Result<Vec<DataFile>> {
    if let Some(parsed) = S3Url::parse(location) {
        let S3Url { bucket, key } = parsed.map_err(|e| data_err(location, e.to_string()))?;
        let client = client.expect("an S3 client for S3 locations");
        if let Some(format) = FileFormat::of(&key) {
            let location = format!("s3://{bucket}/{key}");
            return Ok(vec![DataFile { location, id_prefix: "bs".into(), format, place: Place::S3 { bucket, key } }]);
        }
        let prefix = if key.is_empty() { String::new() } else { format!("{key}/") };
        let mut files = Vec::new();
        let mut pages = client.list_objects_v2().bucket(&bucket).prefix(&prefix).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| {
                data_err(
                    location,
                    format!(
                        "cannot list it: {} (check AWS_ENDPOINT_URL and the AWS credentials)",
                        DisplayErrorContext(e)
                    ),
                )
            })?;
            for object in page.contents() {
                let Some(name) = object.key() else { continue };
                let Some(format) = FileFormat::of(name) else { continue };
                files.push(DataFile {
                    location: format!("s3://{bucket}/{name}"),
                    id_prefix: name.strip_prefix(&prefix).unwrap_or(name).to_string(),
                    format,
                    place: Place::S3 { bucket: bucket.clone(), key: name.to_string() },
                });
            }
        }
        return finish(location, files);
    }
    let path = Path::new(location);
    let meta = std::fs::metadata(path).map_err(|e| data_err(location, format!("cannot open it: {e}")))?;
    if !meta.is_dir() {
        // A single file is CSV unless it says Parquet, as before directories were read.
        let format = FileFormat::of(location).unwrap_or(FileFormat::Csv);
        let place = Place::Local(path.to_path_buf());
        return Ok(vec![DataFile { location: location.into(), id_prefix: "bs".into(), format, place }]);
    }
    let mut files = Vec::new();
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| data_err(&dir.display().to_string(), e.to_string()))?;
        for entry in entries {
            let entry = entry.map_err(|e| data_err(&dir.display().to_string(), e.to_string()))?;
            let file = entry.path();
            if file.is_dir() {
                dirs.push(file);
                continue;
            }
            let Some(format) = FileFormat::of(&file.to_string_lossy()) else { continue };
            let relative = file.strip_prefix(path).unwrap_or(&file).to_string_lossy().into_owned();
            files.push(DataFile {
                location: file.display().to_string(),
                id_prefix: relative,
                format,
                place: Place::Local(file),
            });
        }
    }
    finish(location, files)
}

fn finish(location: &str, mut files: Vec<DataFile>) -> Result<Vec<DataFile>> {
    if files.is_empty() {
        return Err(data_err(location, "holds no *.csv or *.parquet files"));
    }
    files.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(files)
}

fn unlabelled(file: &DataFile, payment: &Payment, column: &str) -> TrainingError {
    data_err(&file.location, format!("payment {} has no fraud label (column `{column}`)", payment.payment_id))
}

fn read_csv(input: impl std::io::BufRead, file: &DataFile, out: &mut Vec<Payment>, on_row: &dyn Fn()) -> Result<()> {
    let csv_err = |error| TrainingError::Csv { location: file.location.clone(), error };
    let reader = BankSimReader::with_id_prefix(input, &file.id_prefix).map_err(csv_err)?;
    for row in reader {
        let payment = row.map_err(csv_err)?;
        if payment.fraud.is_none() {
            return Err(unlabelled(file, &payment, "fraud"));
        }
        out.push(payment);
        on_row();
    }
    Ok(())
}

/// Reads a Parquet file whose top-level columns are named like the BankSim
/// CSV header: `step` (integer), `customer`, `age`, `gender`, `merchant`,
/// `category` (strings; integers are taken as their decimal text, so an
/// integer `age` works), `amount` (floating point or integer), `fraud`
/// (boolean, or integer 0/1), and optionally `zipcodeOri` and `zipMerchant`
/// (BankSim's constant zip code where absent). Other columns are ignored.
fn read_parquet<R: ChunkReader + 'static>(
    input: R,
    file: &DataFile,
    out: &mut Vec<Payment>,
    on_row: &dyn Fn(),
) -> Result<()> {
    let parquet_err = |e: parquet::errors::ParquetError| {
        data_err(&file.location, format!("not a readable Parquet file: {e} (compressions read: none, snappy, zstd)"))
    };
    let reader = SerializedFileReader::new(input).map_err(parquet_err)?;
    let names: Vec<String> =
        reader.metadata().file_metadata().schema().get_fields().iter().map(|f| f.name().to_string()).collect();
    let find = |name: &str| names.iter().position(|n| n == name);
    let mut index = [None; 9];
    for (slot, name) in index.iter_mut().zip(BANKSIM_COLUMNS) {
        *slot = find(name);
        if slot.is_none() && !banksim_column_optional(name) {
            return Err(data_err(
                &file.location,
                format!("Parquet file has no column `{name}` (it has {names:?}; the columns are named like the BankSim CSV header)"),
            ));
        }
    }
    let fraud = find("fraud")
        .ok_or_else(|| data_err(&file.location, format!("Parquet file has no column `fraud` (it has {names:?})")))?;
    for (row_number, row) in reader.get_row_iter(None).map_err(parquet_err)?.enumerate() {
        let columns = row.map_err(parquet_err)?.into_columns();
        let bad = |column: &str, field: &Field, expected: &str| {
            data_err(&file.location, format!("row {row_number}, column `{column}`: {field:?} is not {expected}"))
        };
        let field = |i: usize| index[i].map(|c| &columns[c].1);
        let text = |i: usize| -> Result<String> {
            match field(i) {
                None => Ok(BANKSIM_ZIP.to_string()),
                Some(f) => field_text(f).ok_or_else(|| bad(BANKSIM_COLUMNS[i], f, "a string")),
            }
        };
        let step_field = field(0).expect("step is required");
        let step = field_integer(step_field)
            .and_then(|s| i32::try_from(s).ok())
            .ok_or_else(|| bad("step", step_field, "an integer step"))?;
        let amount_field = field(8).expect("amount is required");
        let amount = field_number(amount_field).ok_or_else(|| bad("amount", amount_field, "a number"))?;
        let fraud_field = &columns[fraud].1;
        let label = match fraud_field {
            Field::Null => None,
            f => Some(field_bool(f).ok_or_else(|| bad("fraud", f, "a boolean or 0/1"))?),
        };
        let payment = Payment {
            payment_id: format!("{}-{row_number}", file.id_prefix),
            event_time: BANKSIM_EPOCH_MS + i64::from(step) * STEP_MS,
            step,
            customer: text(1)?,
            age: text(2)?,
            gender: text(3)?,
            zipcode_ori: text(4)?,
            merchant: text(5)?,
            zip_merchant: text(6)?,
            category: text(7)?,
            amount,
            fraud: label,
        };
        if payment.fraud.is_none() {
            return Err(unlabelled(file, &payment, "fraud"));
        }
        out.push(payment);
        on_row();
    }
    Ok(())
}

fn field_integer(field: &Field) -> Option<i64> {
    Some(match field {
        Field::Byte(v) => i64::from(*v),
        Field::Short(v) => i64::from(*v),
        Field::Int(v) => i64::from(*v),
        Field::Long(v) => *v,
        Field::UByte(v) => i64::from(*v),
        Field::UShort(v) => i64::from(*v),
        Field::UInt(v) => i64::from(*v),
        Field::ULong(v) => i64::try_from(*v).ok()?,
        _ => return None,
    })
}

fn field_number(field: &Field) -> Option<f64> {
    match field {
        Field::Float(v) => Some(f64::from(*v)),
        Field::Double(v) => Some(*v),
        other => field_integer(other).map(|v| v as f64),
    }
}

fn field_text(field: &Field) -> Option<String> {
    match field {
        Field::Str(s) => Some(s.trim().to_string()),
        Field::Bytes(b) => std::str::from_utf8(b.data()).ok().map(|s| s.trim().to_string()),
        other => field_integer(other).map(|v| v.to_string()),
    }
}

fn field_bool(field: &Field) -> Option<bool> {
    match field {
        Field::Bool(b) => Some(*b),
        Field::Str(s) => match s.trim() {
            "0" | "false" => Some(false),
            "1" | "true" => Some(true),
            _ => None,
        },
        other => match field_integer(other)? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_come_from_the_extension() {
        assert_eq!(FileFormat::of("a/b/part-0.parquet"), Some(FileFormat::Parquet));
        assert_eq!(FileFormat::of("day1.CSV"), Some(FileFormat::Csv));
        assert_eq!(FileFormat::of("notes.txt"), None);
        assert_eq!(FileFormat::of("data.csv.gz"), None);
    }

    #[test]
    fn parquet_fields_convert_as_documented() {
        assert_eq!(field_text(&Field::Int(4)), Some("4".into()));
        assert_eq!(field_text(&Field::Str(" C1 ".into())), Some("C1".into()));
        assert_eq!(field_number(&Field::Float(2.5)), Some(2.5));
        assert_eq!(field_number(&Field::Long(3)), Some(3.0));
        assert_eq!(field_bool(&Field::Long(1)), Some(true));
        assert_eq!(field_bool(&Field::Int(2)), None);
        assert_eq!(field_bool(&Field::Str("false".into())), Some(false));
        assert_eq!(field_integer(&Field::Double(1.0)), None);
    }
}
