//! Limiting what a predict answer reveals.
//!
//! Detection alone is not protection: with full probabilities a few dozen
//! natural queries already copy a small classifier well (Tramèr et al. 2016
//! solve a logistic regression exactly from d+1 answers per class). Rounding
//! the probabilities, or answering only the top class, takes most of that
//! information away while keeping the answer useful: the policy applies it
//! from the `degrade` step on, or to everyone.

use serde_json::{Number, Value};

use crate::request::predict::Shape;

/// How much of a predict answer a caller may see: the config's own type.
pub use warden_config::model::OutputDetail as Outputs;

/// Rewrites a predict answer in place, in the [`Shape`] its request came
/// in (`output` is the route's JSON pointer for [`Shape::Pointer`]):
/// probabilities rounded to `Decimals(n)` places, or each row replaced by
/// the index of its top class (`Label`). Anything else in the document is
/// left alone. `Some(changed)`, or `None` when the answer has no scores
/// where its format puts them (the caller fails closed).
///
/// A prediction that is a single number (a binary score or a regression) is
/// rounded under `Decimals` and left alone under `Label`, where its meaning
/// is unknown; integers are never touched. An Open Inference tensor of
/// floats becomes, under `Label`, an `INT64` tensor of one index per row;
/// a `BYTES` tensor cannot be limited (Triton's classification extension
/// writes scores into strings).
pub fn limit(answer: &mut Value, shape: Shape, output: &str, outputs: Outputs) -> Option<bool> {
    if outputs == Outputs::Full {
        return Some(false);
    }
    match shape {
        Shape::Rows => batch(answer.get_mut("predictions")?.as_array_mut()?, outputs),
        Shape::Columns => match answer.get_mut("outputs")? {
            Value::Array(rows) => batch(rows, outputs),
            Value::Object(named) => named
                .values_mut()
                .try_fold(false, |c, v| Some(batch(v.as_array_mut()?, outputs)? | c)),
            _ => None,
        },
        Shape::Tensors => answer
            .get_mut("outputs")?
            .as_array_mut()?
            .iter_mut()
            .try_fold(false, |c, t| Some(tensor(t, outputs)? | c)),
        Shape::Pointer => {
            let at = answer.pointer_mut(output)?.as_array_mut()?;
            if at.iter().all(Value::is_number) {
                Some(limit_row(at, outputs))
            } else {
                batch(at, outputs)
            }
        }
    }
}

/// The rows of a batch: each a score, an array of them, or (TF Serving)
/// an object of named outputs.
fn batch(rows: &mut [Value], outputs: Outputs) -> Option<bool> {
    let mut changed = false;
    for p in rows.iter_mut() {
        changed |= match p {
            Value::Number(_) => match outputs {
                Outputs::Decimals(n) => round_all(p, n),
                _ => false,
            },
            Value::Array(_) => match outputs {
                Outputs::Decimals(n) => round_all(p, n),
                _ => match top_class(p) {
                    Some(i) => {
                        *p = Value::Number(Number::from(i));
                        true
                    }
                    None => false,
                },
            },
            Value::Object(named) => {
                let mut c = false;
                for v in named.values_mut() {
                    c |= batch(std::slice::from_mut(v), outputs)?;
                }
                c
            }
            _ => false,
        };
    }
    Some(changed)
}

/// One row given as the array itself (a custom API's single answer).
fn limit_row(row: &mut Vec<Value>, outputs: Outputs) -> bool {
    match outputs {
        Outputs::Full => false,
        Outputs::Decimals(n) => row.iter_mut().fold(false, |c, v| round_all(v, n) | c),
        Outputs::Label => {
            let flat: Option<Vec<f64>> = row.iter().map(Value::as_f64).collect();
            match flat.filter(|f| !f.is_empty()) {
                Some(f) => {
                    *row = vec![Value::Number(Number::from(argmax(&f)))];
                    true
                }
                None => false,
            }
        }
    }
}

/// One Open Inference output tensor.
fn tensor(t: &mut Value, outputs: Outputs) -> Option<bool> {
    let datatype = t.get("datatype")?.as_str()?;
    if !matches!(datatype, "FP16" | "BF16" | "FP32" | "FP64") {
        // Integers and booleans are labels already; bytes cannot be read.
        return (datatype != "BYTES").then_some(false);
    }
    let shape: Vec<usize> = t
        .get("shape")?
        .as_array()?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<_>>()?;
    match outputs {
        Outputs::Full => Some(false),
        Outputs::Decimals(n) => Some(round_all(t.get_mut("data")?, n)),
        Outputs::Label => {
            let mut flat = Vec::new();
            numbers(t.get("data")?, &mut flat)?;
            let rows = if shape.len() >= 2 { shape[0] } else { 1 };
            if rows == 0 || flat.is_empty() || flat.len() % rows != 0 {
                return None;
            }
            let labels: Vec<Value> = flat
                .chunks(flat.len() / rows)
                .map(|r| Value::from(argmax(r) as u64))
                .collect();
            let t = t.as_object_mut()?;
            t.insert("shape".into(), Value::from(vec![rows as u64]));
            t.insert("datatype".into(), Value::from("INT64"));
            t.insert("data".into(), Value::Array(labels));
            Some(true)
        }
    }
}

/// Every float in `v` (arrays and objects looked into) rounded.
fn round_all(v: &mut Value, decimals: u8) -> bool {
    match v {
        Value::Array(a) => a.iter_mut().fold(false, |c, x| round_all(x, decimals) | c),
        Value::Object(m) => m
            .values_mut()
            .fold(false, |c, x| round_all(x, decimals) | c),
        _ => round_value(v, decimals),
    }
}

/// The numbers of nested arrays, in order; `None` if anything else is there.
fn numbers(v: &Value, out: &mut Vec<f64>) -> Option<()> {
    match v {
        Value::Array(a) => a.iter().try_for_each(|x| numbers(x, out)),
        _ => {
            out.push(v.as_f64()?);
            Some(())
        }
    }
}

fn argmax(row: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in row.iter().enumerate() {
        if *x > row[best] {
            best = i;
        }
    }
    best
}

/// Rounds a float in place; `true` when its value changed.
fn round_value(v: &mut Value, decimals: u8) -> bool {
    let Value::Number(n) = v else {
        return false;
    };
    if n.is_i64() || n.is_u64() {
        return false;
    }
    let Some(x) = n.as_f64() else {
        return false;
    };
    let scale = 10f64.powi(i32::from(decimals.min(15)));
    let r = (x * scale).round() / scale;
    if r == x {
        return false;
    }
    match Number::from_f64(r) {
        Some(num) => {
            *v = Value::Number(num);
            true
        }
        None => false,
    }
}

/// Index of the largest number in `row` (nested arrays flattened; the
/// first on ties); `None` when it is empty or holds anything but numbers.
fn top_class(row: &Value) -> Option<usize> {
    let mut flat = Vec::new();
    numbers(row, &mut flat)?;
    (!flat.is_empty()).then(|| argmax(&flat))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A KServe v1 answer limited; whether it changed (`false` when it cannot be).
    fn rows(a: &mut Value, o: Outputs) -> bool {
        limit(a, Shape::Rows, "", o).unwrap_or(false)
    }

    #[test]
    fn full_changes_nothing() {
        let mut a = json!({"predictions": [[0.123456, 0.876544]]});
        assert!(!rows(&mut a, Outputs::Full));
        assert_eq!(a, json!({"predictions": [[0.123456, 0.876544]]}));
    }

    #[test]
    fn decimals_round_probabilities() {
        let mut a = json!({"predictions": [[0.123456, 0.876544], [0.5, 0.5]], "model": "m"});
        assert!(rows(&mut a, Outputs::Decimals(2)));
        assert_eq!(
            a,
            json!({"predictions": [[0.12, 0.88], [0.5, 0.5]], "model": "m"})
        );
        // Already coarse: nothing changes.
        assert!(!rows(&mut a, Outputs::Decimals(2)));
    }

    #[test]
    fn label_keeps_only_the_top_class() {
        let mut a = json!({"predictions": [[0.1, 0.7, 0.2], [0.4, 0.4, 0.2]]});
        assert!(rows(&mut a, Outputs::Label));
        assert_eq!(a, json!({"predictions": [1, 0]}));
    }

    #[test]
    fn other_documents_are_left_alone() {
        for doc in [
            json!({"outputs": [[0.1234, 0.8766]]}),
            json!({"predictions": "nope"}),
            json!([0.1234]),
            json!({"predictions": [["a", "b"], []]}),
            json!({"predictions": [3, 4]}),
        ] {
            let mut a = doc.clone();
            assert!(!rows(&mut a, Outputs::Decimals(1)), "{doc}");
            assert!(!rows(&mut a, Outputs::Label), "{doc}");
            assert_eq!(a, doc);
        }
    }

    #[test]
    fn scalar_predictions_are_rounded_but_not_labelled() {
        let mut a = json!({"predictions": [0.98765]});
        assert!(!rows(&mut a, Outputs::Label));
        assert!(rows(&mut a, Outputs::Decimals(1)));
        assert_eq!(a, json!({"predictions": [1.0]}));
    }
}
