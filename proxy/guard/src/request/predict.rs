//! Reading a predict request: the feature vectors it submits, whatever the
//! model server's JSON shape, and the shape its answer must come back in.
//!
//! - KServe v1 and TF Serving's row format: `{"instances": [row, ...]}`,
//!   answered `{"predictions": [...]}`;
//! - TF Serving's columnar format: `{"inputs": [row, ...]}` or
//!   `{"inputs": {"name": [row, ...], ...}}`, answered `{"outputs": ...}`;
//! - the Open Inference Protocol (KServe v2, Triton, Seldon MLServer):
//!   `{"inputs": [{"name", "shape", "datatype", "data"}, ...]}`, answered
//!   with `outputs` tensors of the same form;
//! - any JSON API: the rows at a JSON pointer the operator names, the
//!   answer's at another.
//!
//! A row is one feature vector: a number, an array (nested arrays are
//! flattened in order: an image's pixels), or TF Serving's object of named
//! inputs (flattened in name order). Anything else, and every field a
//! format does not define, is refused (400): a server extension may change
//! what an answer reveals (Triton's `classification` and binary outputs,
//! for example), and a body warden cannot read is a body it cannot meter.

use serde_json::{Map, Value};

use warden_config::model::{JsonFormat, PredictFormat};

use super::{BadRequest, bad};

/// Most rows in one predict request.
pub const MAX_ROWS: usize = 1024;
/// Most feature values in one row.
pub const MAX_FEATURES: usize = 65_536;

/// The family a request came in, which its answer must come back in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `instances` -> `predictions`.
    Rows,
    /// `inputs` -> `outputs` (TF Serving's columnar format).
    Columns,
    /// Open Inference Protocol tensors.
    Tensors,
    /// The route's own JSON pointers.
    Pointer,
}

/// Top-level fields each family accepts.
const ROW_FIELDS: &[&str] = &["instances", "signature_name"];
const COLUMN_FIELDS: &[&str] = &["inputs", "signature_name"];
const TENSOR_FIELDS: &[&str] = &["id", "inputs", "outputs", "parameters"];
const TENSOR_INPUT_FIELDS: &[&str] = &["name", "shape", "datatype", "data", "parameters"];

/// Reads the rows of `body` under `format`.
pub fn read(format: &PredictFormat, body: &Value) -> Result<(Shape, Vec<Vec<f64>>), BadRequest> {
    let shape = match format {
        PredictFormat::Json(j) => return Ok((Shape::Pointer, read_pointer(j, body)?)),
        PredictFormat::KserveV1 => Shape::Rows,
        PredictFormat::OpenInference => Shape::Tensors,
        PredictFormat::TfServing | PredictFormat::Auto => {
            match (body.get("instances"), body.get("inputs")) {
                (Some(_), None) => Shape::Rows,
                (None, Some(Value::Array(a)))
                    if *format == PredictFormat::Auto
                        && a.first().is_some_and(|t| t.get("datatype").is_some()) =>
                {
                    Shape::Tensors
                }
                (None, Some(_)) => Shape::Columns,
                _ => {
                    return Err(bad(
                        "a predict body needs instances (rows) or inputs (columns or tensors), not both",
                    ));
                }
            }
        }
    };
    let Some(doc) = body.as_object() else {
        return Err(bad("the body must be a JSON object"));
    };
    let (fields, what) = match shape {
        Shape::Rows => (ROW_FIELDS, "instances"),
        Shape::Columns => (COLUMN_FIELDS, "inputs"),
        _ => (TENSOR_FIELDS, "inputs"),
    };
    only(doc, fields)?;
    let Some(value) = doc.get(what) else {
        return Err(bad(format!("a predict body needs {what}")));
    };
    let rows = match shape {
        Shape::Rows => rows(value)?,
        Shape::Columns => columns(value)?,
        _ => tensors(doc, value)?,
    };
    Ok((shape, rows))
}

/// Refuses any field not in `fields`.
fn only(doc: &Map<String, Value>, fields: &[&str]) -> Result<(), BadRequest> {
    match doc.keys().find(|k| !fields.contains(&k.as_str())) {
        Some(key) => Err(bad(format!(
            "field {key:?} is not accepted on this route (only the standard fields of its predict format are)"
        ))),
        None => Ok(()),
    }
}

/// A batch: an array of rows.
fn rows(value: &Value) -> Result<Vec<Vec<f64>>, BadRequest> {
    let Some(batch) = value
        .as_array()
        .filter(|b| !b.is_empty() && b.len() <= MAX_ROWS)
    else {
        return Err(bad(format!("a batch must hold 1 to {MAX_ROWS} rows")));
    };
    batch.iter().map(row).collect()
}

/// One row flattened: a number, nested arrays of numbers, or an object of
/// named inputs (in name order).
fn row(value: &Value) -> Result<Vec<f64>, BadRequest> {
    let mut out = Vec::new();
    flatten(value, &mut out, 0)?;
    if out.is_empty() {
        return Err(bad("a row must hold at least one number"));
    }
    Ok(out)
}

fn flatten(value: &Value, out: &mut Vec<f64>, depth: usize) -> Result<(), BadRequest> {
    if depth > 8 {
        return Err(bad("feature arrays nest at most 8 deep"));
    }
    match value {
        Value::Number(n) => {
            if out.len() == MAX_FEATURES {
                return Err(bad(format!("a row holds at most {MAX_FEATURES} values")));
            }
            out.push(
                n.as_f64()
                    .ok_or_else(|| bad("feature values must be numbers"))?,
            );
        }
        Value::Bool(b) => out.push(f64::from(u8::from(*b))),
        Value::Array(a) => {
            for v in a {
                flatten(v, out, depth + 1)?;
            }
        }
        // Named inputs, in name order: not the caller's.
        Value::Object(m) if depth == 0 => {
            for v in by_name(m) {
                flatten(v, out, depth + 1)?;
            }
        }
        _ => return Err(bad("feature values must be numbers")),
    }
    Ok(())
}

/// TF Serving's columnar `inputs`: one batch, or named batches of equal length.
fn columns(value: &Value) -> Result<Vec<Vec<f64>>, BadRequest> {
    let Some(named) = value.as_object() else {
        return rows(value);
    };
    let batches = by_name(named)
        .into_iter()
        .map(rows)
        .collect::<Result<Vec<_>, _>>()?;
    let out = join(batches, "named inputs")?;
    if out.is_empty() {
        return Err(bad("inputs must name at least one input"));
    }
    Ok(out)
}

/// Open Inference Protocol tensors: each `[N, ...]` tensor gives N rows
/// (a rank-1 tensor, one), and the rows of several tensors (in name order)
/// are joined.
fn tensors(doc: &Map<String, Value>, inputs: &Value) -> Result<Vec<Vec<f64>>, BadRequest> {
    if !doc.get("parameters").is_none_or(empty_object) {
        return Err(bad(
            "request parameters are not accepted on this route (they change how a server answers)",
        ));
    }
    if let Some(outputs) = doc.get("outputs") {
        let named_only = outputs.as_array().is_some_and(|a| {
            a.iter().all(|o| {
                o.as_object().is_some_and(|o| {
                    o.get("name").is_some_and(Value::is_string)
                        && o.iter()
                            .all(|(k, v)| k == "name" || (k == "parameters" && empty_object(v)))
                })
            })
        });
        if !named_only {
            return Err(bad(
                "requested outputs may only name tensors (output parameters such as classification are not accepted)",
            ));
        }
    }
    let Some(list) = inputs.as_array().filter(|l| !l.is_empty() && l.len() <= 64) else {
        return Err(bad("inputs must be an array of 1 to 64 tensors"));
    };
    let mut named: Vec<(&str, Vec<Vec<f64>>)> = Vec::with_capacity(list.len());
    for t in list {
        let Some(t) = t.as_object() else {
            return Err(bad("each input must be a tensor object"));
        };
        only_tensor(t)?;
        let name = t.get("name").and_then(Value::as_str).unwrap_or("");
        named.push((name, tensor_rows(t)?));
    }
    named.sort_by(|a, b| a.0.cmp(b.0));
    join(
        named.into_iter().map(|(_, rows)| rows).collect(),
        "input tensors",
    )
}

/// Several inputs' batches, row by row: row i is every input's row i, joined.
fn join(batches: Vec<Vec<Vec<f64>>>, what: &str) -> Result<Vec<Vec<f64>>, BadRequest> {
    let mut batches = batches.into_iter();
    let mut out = batches.next().unwrap_or_default();
    for b in batches {
        if b.len() != out.len() {
            return Err(bad(format!("{what} must have the same batch size")));
        }
        for (row, more) in out.iter_mut().zip(b) {
            row.extend(more);
            if row.len() > MAX_FEATURES {
                return Err(bad(format!("a row holds at most {MAX_FEATURES} values")));
            }
        }
    }
    Ok(out)
}

/// An object's values in the order of their names.
fn by_name(m: &Map<String, Value>) -> Vec<&Value> {
    let mut named: Vec<(&String, &Value)> = m.iter().collect();
    named.sort_unstable_by(|a, b| a.0.cmp(b.0));
    named.into_iter().map(|(_, v)| v).collect()
}

/// `null` or `{}`: parameters that ask for nothing.
fn empty_object(v: &Value) -> bool {
    v.is_null() || v.as_object().is_some_and(Map::is_empty)
}

fn only_tensor(t: &Map<String, Value>) -> Result<(), BadRequest> {
    if let Some(k) = t
        .keys()
        .find(|k| !TENSOR_INPUT_FIELDS.contains(&k.as_str()))
    {
        return Err(bad(format!("tensor field {k:?} is not accepted")));
    }
    if !t.get("parameters").is_none_or(empty_object) {
        // Triton's binary_data_size and the like: the data is not in the JSON.
        return Err(bad("tensor parameters are not accepted on this route"));
    }
    Ok(())
}

/// A numeric tensor's rows, its data checked against its shape.
fn tensor_rows(t: &Map<String, Value>) -> Result<Vec<Vec<f64>>, BadRequest> {
    let numeric = t.get("datatype").and_then(Value::as_str).is_some_and(|d| {
        matches!(
            d,
            "BOOL"
                | "UINT8"
                | "UINT16"
                | "UINT32"
                | "UINT64"
                | "INT8"
                | "INT16"
                | "INT32"
                | "INT64"
                | "FP16"
                | "BF16"
                | "FP32"
                | "FP64"
        )
    });
    if !numeric {
        return Err(bad(
            "each input tensor needs a numeric datatype (BYTES tensors cannot be metered)",
        ));
    }
    let Some(shape) = t.get("shape").and_then(Value::as_array).and_then(|s| {
        s.iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
    }) else {
        return Err(bad(
            "each input tensor needs a shape of non-negative integers",
        ));
    };
    let (n, width) = match shape.as_slice() {
        [] => (1, 1),
        [w] => (1, *w),
        [n, rest @ ..] => (
            *n,
            rest.iter()
                .try_fold(1usize, |a, d| a.checked_mul(*d))
                .unwrap_or(usize::MAX),
        ),
    };
    if n == 0 || n > MAX_ROWS || width == 0 || width > MAX_FEATURES {
        return Err(bad(format!(
            "a tensor must hold 1 to {MAX_ROWS} rows of 1 to {MAX_FEATURES} values"
        )));
    }
    // The shape is the caller's word: only the data it sent is allocated for.
    let mut flat = Vec::with_capacity((n * width).min(4096));
    flatten_data(
        t.get("data").unwrap_or(&Value::Null),
        &mut flat,
        n * width,
        0,
    )?;
    if flat.len() != n * width {
        return Err(bad(format!(
            "tensor data holds {} values, its shape {} x {}",
            flat.len(),
            n,
            width
        )));
    }
    Ok(flat.chunks(width).map(<[f64]>::to_vec).collect())
}

fn flatten_data(v: &Value, out: &mut Vec<f64>, cap: usize, depth: usize) -> Result<(), BadRequest> {
    match v {
        Value::Array(a) if depth <= 8 => {
            for x in a {
                flatten_data(x, out, cap, depth + 1)?;
            }
            Ok(())
        }
        Value::Number(n) if out.len() < cap => {
            out.push(
                n.as_f64()
                    .ok_or_else(|| bad("tensor data must be numbers"))?,
            );
            Ok(())
        }
        Value::Bool(b) if out.len() < cap => {
            out.push(f64::from(u8::from(*b)));
            Ok(())
        }
        Value::Number(_) | Value::Bool(_) => {
            Err(bad("tensor data holds more values than its shape"))
        }
        _ => Err(bad("tensor data must be an array of numbers")),
    }
}

/// The route's own format: the rows at `input` (one row, or an array of
/// rows), and only the fields it names besides the input's own.
fn read_pointer(j: &JsonFormat, body: &Value) -> Result<Vec<Vec<f64>>, BadRequest> {
    if let Some(doc) = body.as_object() {
        let top = top_field(&j.input);
        if let Some(k) = doc
            .keys()
            .find(|k| top.as_deref() != Some(k.as_str()) && !j.fields.contains(k))
        {
            return Err(bad(format!("field {k:?} is not accepted on this route")));
        }
    }
    let Some(value) = body.pointer(&j.input) else {
        return Err(bad(format!(
            "the body has no feature vector at {:?}",
            j.input
        )));
    };
    match value.as_array() {
        Some(a) if a.iter().all(|v| v.is_number() || v.is_boolean()) => Ok(vec![row(value)?]),
        Some(_) => rows(value),
        None => Err(bad(format!("the value at {:?} must be an array", j.input))),
    }
}

/// The first field a JSON pointer names (`/data/x` -> `data`), unescaped.
fn top_field(pointer: &str) -> Option<String> {
    let first = pointer.strip_prefix('/')?.split('/').next()?;
    Some(first.replace("~1", "/").replace("~0", "~"))
}

#[cfg(test)]
#[path = "predict_tests.rs"]
mod tests;
