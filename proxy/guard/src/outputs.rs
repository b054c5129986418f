//! Limiting what a predict answer reveals.
//!
//! Detection alone is not protection: with full probabilities a few dozen
//! natural queries already copy a small classifier well (Tramèr et al. 2016
//! solve a logistic regression exactly from d+1 answers per class). Rounding
//! the probabilities, or answering only the top class, takes most of that
//! information away while keeping the answer useful: the policy applies it
//! from the `degrade` step on, or to everyone.

use serde_json::{Number, Value};

/// How much of a predict answer a caller may see: the config's own type.
pub use warden_config::model::OutputDetail as Outputs;

/// Rewrites a KServe-v1-style predict answer `{"predictions": [[p0,p1,...], ...]}`
/// in place: probabilities rounded to `Decimals(n)` places, or replaced by
/// the index of the top class (`Label`). Anything else in the document is
/// left alone. Returns whether anything changed.
///
/// A prediction that is a single number (a binary score or a regression) is
/// rounded under `Decimals` and left alone under `Label`, where its meaning
/// is unknown; integers are never touched.
pub fn limit(answer: &mut Value, outputs: Outputs) -> bool {
    if outputs == Outputs::Full {
        return false;
    }
    let Some(Value::Array(predictions)) = answer.get_mut("predictions") else {
        return false;
    };
    let mut changed = false;
    for p in predictions.iter_mut() {
        changed |= match (outputs, &mut *p) {
            (Outputs::Decimals(n), Value::Array(row)) => {
                let mut c = false;
                for v in row.iter_mut() {
                    c |= round_value(v, n);
                }
                c
            }
            (Outputs::Decimals(n), v @ Value::Number(_)) => round_value(v, n),
            (Outputs::Label, Value::Array(row)) => match top_class(row) {
                Some(i) => {
                    *p = Value::Number(Number::from(i));
                    true
                }
                None => false,
            },
            _ => false,
        };
    }
    changed
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

/// Index of the largest number in `row` (the first on ties); `None` when
/// the row is empty or holds anything but numbers.
fn top_class(row: &[Value]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, v) in row.iter().enumerate() {
        let x = v.as_f64()?;
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn full_changes_nothing() {
        let mut a = json!({"predictions": [[0.123456, 0.876544]]});
        assert!(!limit(&mut a, Outputs::Full));
        assert_eq!(a, json!({"predictions": [[0.123456, 0.876544]]}));
    }

    #[test]
    fn decimals_round_probabilities() {
        let mut a = json!({"predictions": [[0.123456, 0.876544], [0.5, 0.5]], "model": "m"});
        assert!(limit(&mut a, Outputs::Decimals(2)));
        assert_eq!(
            a,
            json!({"predictions": [[0.12, 0.88], [0.5, 0.5]], "model": "m"})
        );
        // Already coarse: nothing changes.
        assert!(!limit(&mut a, Outputs::Decimals(2)));
    }

    #[test]
    fn label_keeps_only_the_top_class() {
        let mut a = json!({"predictions": [[0.1, 0.7, 0.2], [0.4, 0.4, 0.2]]});
        assert!(limit(&mut a, Outputs::Label));
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
            assert!(!limit(&mut a, Outputs::Decimals(1)), "{doc}");
            assert!(!limit(&mut a, Outputs::Label), "{doc}");
            assert_eq!(a, doc);
        }
    }

    #[test]
    fn scalar_predictions_are_rounded_but_not_labelled() {
        let mut a = json!({"predictions": [0.98765]});
        assert!(!limit(&mut a, Outputs::Label));
        assert!(limit(&mut a, Outputs::Decimals(1)));
        assert_eq!(a, json!({"predictions": [1.0]}));
    }
}
