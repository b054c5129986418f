//! Request and answer bodies as each format's documentation shows them.

use serde_json::{Value, json};

use warden_config::model::{JsonFormat, PredictFormat};

use super::*;
use crate::outputs::{Outputs, limit};

fn read_ok(format: &PredictFormat, body: Value) -> (Shape, Vec<Vec<f64>>) {
    read(format, &body).unwrap_or_else(|e| panic!("{body}: {}", e.0))
}

fn refused(format: &PredictFormat, body: Value) -> String {
    match read(format, &body) {
        Ok(r) => panic!("{body} was read as {r:?}"),
        Err(e) => e.0,
    }
}

fn custom(input: &str, output: &str, fields: &[&str]) -> PredictFormat {
    PredictFormat::Json(JsonFormat {
        input: input.into(),
        output: output.into(),
        fields: fields.iter().map(|f| f.to_string()).collect(),
    })
}

#[test]
fn kserve_v1_and_tf_serving_rows() {
    // KServe v1 (the sklearn iris example) and TF Serving's row format.
    let body = json!({"instances": [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]});
    for f in [
        PredictFormat::Auto,
        PredictFormat::KserveV1,
        PredictFormat::TfServing,
    ] {
        let (shape, rows) = read_ok(&f, body.clone());
        assert_eq!(shape, Shape::Rows);
        assert_eq!(
            rows,
            vec![vec![6.8, 2.8, 4.8, 1.4], vec![6.0, 3.4, 4.5, 1.6]]
        );
    }
    // TF Serving: scalars are rows of one; named inputs flatten in name order.
    let (_, rows) = read_ok(
        &PredictFormat::TfServing,
        json!({"instances": [1.0, 2.0, 5.0]}),
    );
    assert_eq!(rows, vec![vec![1.0], vec![2.0], vec![5.0]]);
    let body = json!({"signature_name": "serving_default", "instances": [
        {"signal": [1, 2, 3, 4, 5], "sensor": [[1, 2], [3, 4]]},
        {"sensor": [[4, 5], [6, 8]], "signal": [3, 4, 1, 2, 5]}
    ]});
    let (_, rows) = read_ok(&PredictFormat::Auto, body);
    assert_eq!(rows[0], vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(rows[1], vec![4.0, 5.0, 6.0, 8.0, 3.0, 4.0, 1.0, 2.0, 5.0]);
    // A 2x2 image is one row of four.
    let (_, rows) = read_ok(
        &PredictFormat::Auto,
        json!({"instances": [[[0, 1], [1, 0]]]}),
    );
    assert_eq!(rows, vec![vec![0.0, 1.0, 1.0, 0.0]]);
}

#[test]
fn tf_serving_columns() {
    let body = json!({"inputs": {"signal": [[1, 2, 3], [3, 4, 1]], "sensor": [[9], [8]]}});
    let (shape, rows) = read_ok(&PredictFormat::Auto, body);
    assert_eq!(shape, Shape::Columns);
    assert_eq!(
        rows,
        vec![vec![9.0, 1.0, 2.0, 3.0], vec![8.0, 3.0, 4.0, 1.0]]
    );
    let (_, rows) = read_ok(
        &PredictFormat::TfServing,
        json!({"inputs": [[1, 2], [3, 4]]}),
    );
    assert_eq!(rows, vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
    assert!(
        refused(
            &PredictFormat::Auto,
            json!({"inputs": {"a": [[1]], "b": [[1], [2]]}})
        )
        .contains("same batch size")
    );
}

#[test]
fn open_inference_tensors() {
    // KServe v2 (the sklearn iris example), data nested or flat.
    for data in [
        json!([[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]),
        json!([6.8, 2.8, 4.8, 1.4, 6.0, 3.4, 4.5, 1.6]),
    ] {
        let body = json!({"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP32", "data": data}]});
        for f in [PredictFormat::Auto, PredictFormat::OpenInference] {
            let (shape, rows) = read_ok(&f, body.clone());
            assert_eq!(shape, Shape::Tensors);
            assert_eq!(
                rows,
                vec![vec![6.8, 2.8, 4.8, 1.4], vec![6.0, 3.4, 4.5, 1.6]]
            );
        }
    }
    // Triton: an id, several inputs joined in name order, named outputs.
    let body = json!({
        "id": "42",
        "inputs": [
            {"name": "input1", "shape": [2, 1], "datatype": "BOOL", "data": [true, false]},
            {"name": "input0", "shape": [2, 2], "datatype": "UINT32", "data": [1, 2, 3, 4]}
        ],
        "outputs": [{"name": "output0"}]
    });
    let (_, rows) = read_ok(&PredictFormat::OpenInference, body);
    assert_eq!(rows, vec![vec![1.0, 2.0, 1.0], vec![3.0, 4.0, 0.0]]);
    // A rank-1 tensor is one row.
    let (_, rows) = read_ok(
        &PredictFormat::OpenInference,
        json!({"inputs": [{"name": "x", "shape": [3], "datatype": "FP64", "data": [1, 2, 3]}]}),
    );
    assert_eq!(rows, vec![vec![1.0, 2.0, 3.0]]);
}

#[test]
fn open_inference_extensions_that_change_the_answer_are_refused() {
    let t = |extra: Value| {
        let mut b =
            json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let f = PredictFormat::OpenInference;
    // Triton's classification extension answers scores inside strings.
    refused(
        &f,
        t(json!({"outputs": [{"name": "y", "parameters": {"classification": 3}}]})),
    );
    refused(&f, t(json!({"parameters": {"binary_data_output": true}})));
    // Parameters that ask for nothing are fine.
    read_ok(
        &f,
        t(json!({"parameters": {}, "outputs": [{"name": "y", "parameters": null}]})),
    );
    // Bytes, a shape that disagrees with the data, a binary input.
    refused(
        &f,
        json!({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}),
    );
    refused(
        &f,
        json!({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}]}),
    );
    refused(
        &f,
        json!({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]}),
    );
    refused(
        &f,
        json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}),
    );
    refused(
        &f,
        json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2], "extra": 1}]}),
    );
}

#[test]
fn custom_json_at_pointers() {
    // BentoML-style: a named argument holding a batch.
    let f = custom("/input_data", "", &[]);
    let (shape, rows) = read_ok(&f, json!({"input_data": [[5.9, 3, 5.1, 1.8]]}));
    assert_eq!(shape, Shape::Pointer);
    assert_eq!(rows, vec![vec![5.9, 3.0, 5.1, 1.8]]);
    assert!(
        refused(&f, json!({"input_data": [[1]], "return_proba": true})).contains("return_proba")
    );
    // MLflow's split data frame, one field allowed besides.
    let f = custom("/dataframe_split/data", "/predictions", &["params"]);
    let (_, rows) = read_ok(
        &f,
        json!({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3, 4]]}, "params": {}}),
    );
    assert_eq!(rows, vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
    // The whole body one vector.
    let (_, rows) = read_ok(&custom("", "", &[]), json!([0.5, 1.5]));
    assert_eq!(rows, vec![vec![0.5, 1.5]]);
    // An escaped pointer names its field unescaped.
    let (_, rows) = read_ok(&custom("/a~1b", "", &[]), json!({"a/b": [1]}));
    assert_eq!(rows, vec![vec![1.0]]);
    refused(&custom("/x", "", &[]), json!({"y": [1]}));
    refused(&custom("/x", "", &[]), json!({"x": 1}));
}

#[test]
fn unknown_shapes_fail_closed() {
    for body in [
        json!([[1, 2]]),
        json!({"instances": [], "signature_name": "s"}),
        json!({"instances": [["a"]]}),
        json!({"instances": [[1]], "inputs": [[1]]}),
        json!({"instances": [[1]], "parameters": {"k": 1}}),
        json!({"instances": [{"tag": "foo", "signal": [1]}]}),
        json!({"data": [[1, 2]]}),
        json!({"instances": [[[[[[[[[[[1]]]]]]]]]]]}),
    ] {
        refused(&PredictFormat::Auto, body);
    }
    // An explicit format reads only its own shape.
    refused(&PredictFormat::KserveV1, json!({"inputs": [[1]]}));
    refused(&PredictFormat::OpenInference, json!({"instances": [[1]]}));
}

fn limited(answer: Value, shape: Shape, pointer: &str, o: Outputs) -> Option<Value> {
    let mut a = answer;
    limit(&mut a, shape, pointer, o).map(|_| a)
}

#[test]
fn answers_are_limited_in_the_shape_of_their_request() {
    let l = Outputs::Label;
    let d = Outputs::Decimals(1);
    // KServe v1 / TF rows, with TF's named outputs per row.
    let rows = json!({"predictions": [[0.12, 0.88], {"probs": [0.7, 0.3], "classes": 0}]});
    assert_eq!(
        limited(rows.clone(), Shape::Rows, "", l).unwrap(),
        json!({"predictions": [1, {"probs": 0, "classes": 0}]})
    );
    assert_eq!(
        limited(rows, Shape::Rows, "", d).unwrap(),
        json!({"predictions": [[0.1, 0.9], {"probs": [0.7, 0.3], "classes": 0}]})
    );
    // TF columns, unnamed and named.
    assert_eq!(
        limited(json!({"outputs": [[0.2, 0.8]]}), Shape::Columns, "", l).unwrap(),
        json!({"outputs": [1]})
    );
    assert_eq!(
        limited(
            json!({"outputs": {"scores": [[0.26, 0.74]]}}),
            Shape::Columns,
            "",
            d
        )
        .unwrap(),
        json!({"outputs": {"scores": [[0.3, 0.7]]}})
    );
    // Open Inference: floats become one INT64 label per row; ints stay.
    let oip = json!({"model_name": "m", "id": "42", "outputs": [
        {"name": "probs", "shape": [2, 3], "datatype": "FP32", "data": [0.1, 0.7, 0.2, 0.5, 0.2, 0.3]},
        {"name": "predict", "shape": [2], "datatype": "INT64", "data": [1, 0]}
    ]});
    assert_eq!(
        limited(oip.clone(), Shape::Tensors, "", l).unwrap()["outputs"],
        json!([
            {"name": "probs", "shape": [2], "datatype": "INT64", "data": [1, 0]},
            {"name": "predict", "shape": [2], "datatype": "INT64", "data": [1, 0]}
        ])
    );
    assert_eq!(
        limited(oip, Shape::Tensors, "", Outputs::Decimals(0)).unwrap()["outputs"][0]["data"],
        json!([0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    );
    // Custom pointers: one row, or a batch.
    assert_eq!(
        limited(
            json!({"result": {"p": [0.3, 0.7]}}),
            Shape::Pointer,
            "/result/p",
            l
        )
        .unwrap(),
        json!({"result": {"p": [1]}})
    );
    assert_eq!(
        limited(json!([[0.3, 0.7], [0.9, 0.1]]), Shape::Pointer, "", l).unwrap(),
        json!([1, 0])
    );
}

#[test]
fn answers_without_scores_where_the_format_puts_them_cannot_be_limited() {
    let l = Outputs::Label;
    assert!(limited(json!({"outputs": [[0.1]]}), Shape::Rows, "", l).is_none());
    assert!(limited(json!({"predictions": [[0.1]]}), Shape::Tensors, "", l).is_none());
    assert!(limited(json!({"x": [0.1]}), Shape::Pointer, "/y", l).is_none());
    // Scores in strings (Triton's classification extension).
    let bytes = json!({"outputs": [{"name": "c", "shape": [1], "datatype": "BYTES", "data": ["0.9:3:cat"]}]});
    assert!(limited(bytes.clone(), Shape::Tensors, "", l).is_none());
    assert!(limited(bytes, Shape::Tensors, "", Outputs::Decimals(1)).is_none());
    // Full answers pass whatever they hold.
    assert_eq!(
        limit(&mut json!("anything"), Shape::Rows, "", Outputs::Full),
        Some(false)
    );
}
