//! Streams through the counter: what is delivered and what is counted.

use serde_json::json;
use warden_config::model::ModelApi;

use super::*;

fn request(path: &str, body: Value) -> (ModelRequest, Reserved) {
    let r = ModelRequest::parse(ModelApi::Openai, path, body.to_string().as_bytes(), 64).unwrap();
    let reserved = Reserved::of(&r);
    (r, reserved)
}

fn chat(max_tokens: u64) -> (ModelRequest, Reserved) {
    request(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "stream": true, "max_tokens": max_tokens}),
    )
}

fn responses(max_output_tokens: u64) -> (ModelRequest, Reserved) {
    request(
        "/v1/responses",
        json!({"input": "hi", "stream": true, "max_output_tokens": max_output_tokens}),
    )
}

/// Feeds `chunks`; returns what was delivered, whether it was cut, and the tally.
fn run(req: &(ModelRequest, Reserved), chunks: &[&[u8]]) -> (String, bool, Tally) {
    let mut c = Counter::new(&req.0, req.1);
    let mut out = BytesMut::new();
    let mut cut = false;
    for chunk in chunks {
        if c.feed(chunk, &mut out) {
            cut = true;
            break;
        }
    }
    if !cut {
        cut = c.end(&mut out);
    }
    (String::from_utf8_lossy(&out).into_owned(), cut, c.tally)
}

fn chat_stream(deltas: usize, end: &str) -> String {
    let mut s = String::new();
    for i in 0..deltas {
        s.push_str(&format!(
            "data: {}{end}{end}",
            json!({"choices": [{"index": 0, "delta": {"content": format!("t{i}")}}]})
        ));
    }
    s.push_str(&format!(
        "data: {}{end}{end}data: [DONE]{end}{end}",
        json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": deltas, "total_tokens": 7 + deltas}})
    ));
    s
}

fn response_stream(deltas: u64) -> String {
    let mut events = vec![
        json!({"type": "response.created", "sequence_number": 0, "response": {"status": "in_progress", "usage": null}}),
    ];
    for i in 0..deltas {
        events.push(json!({"type": "response.output_text.delta", "sequence_number": i + 1, "item_id": "m", "output_index": 0, "content_index": 0, "delta": format!("t{i}")}));
    }
    events.push(json!({"type": "response.completed", "sequence_number": deltas + 1, "response": {"status": "completed", "usage": {"input_tokens": 9, "output_tokens": deltas, "total_tokens": 9 + deltas}}}));
    events
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
        .collect()
}

#[test]
fn a_chat_stream_is_counted_the_same_however_it_is_split() {
    let req = chat(10);
    let stream = chat_stream(4, "\n");
    let whole = run(&req, &[stream.as_bytes()]);
    // The usage chunk warden asked for is kept from the caller.
    assert!(!whole.0.contains("usage") && whole.0.ends_with("data: [DONE]\n\n"));
    assert!(!whole.1);
    assert_eq!(whole.2.used(&req.1).tokens, 11);
    let b = stream.as_bytes();
    for i in 0..=b.len() {
        assert_eq!(run(&req, &[&b[..i], &b[i..]]), whole, "split at {i}");
    }
    let bytes: Vec<&[u8]> = b.chunks(1).collect();
    assert_eq!(run(&req, &bytes), whole);
}

#[test]
fn every_line_ending_style_is_counted_alike() {
    let req = chat(10);
    let tally = run(&req, &[chat_stream(3, "\n").as_bytes()]).2;
    for end in ["\r\n", "\r"] {
        let (out, cut, t) = run(&req, &[chat_stream(3, end).as_bytes()]);
        assert_eq!((cut, t), (false, tally), "{end:?}");
        assert_eq!(out.matches("\"delta\"").count(), 3);
        assert!(!out.contains("usage"));
    }
}

#[test]
fn a_chat_stream_past_its_reservation_is_cut_with_an_error_then_done() {
    let req = chat(2);
    let (out, cut, t) = run(&req, &[chat_stream(5, "\n").as_bytes()]);
    assert!(cut);
    assert_eq!(out.matches("\"delta\"").count(), 2);
    assert!(out.ends_with(CHAT_CUT_EVENT), "{out}");
    assert_eq!(t.counted, 2);
}

#[test]
fn a_responses_stream_is_metered_from_its_completed_event() {
    let req = responses(10);
    let stream = response_stream(4);
    let (out, cut, t) = run(&req, &[stream.as_bytes()]);
    // Everything is delivered as it came.
    assert_eq!((out.as_str(), cut), (stream.as_str(), false));
    let used = t.used(&req.1);
    assert_eq!(used.tokens, 9 + 4);
    let b = stream.as_bytes();
    for i in (0..=b.len()).step_by(7) {
        assert_eq!(run(&req, &[&b[..i], &b[i..]]).2, t, "split at {i}");
    }
}

#[test]
fn a_responses_stream_past_its_reservation_ends_with_the_apis_error_event() {
    let req = responses(3);
    let (out, cut, t) = run(&req, &[response_stream(6).as_bytes()]);
    assert!(cut);
    assert_eq!(out.matches("response.output_text.delta").count(), 2 * 3);
    assert!(!out.contains("response.completed") && !out.contains("[DONE]"));
    let last = out.trim_end().rsplit("\n\n").next().unwrap();
    let data = last.strip_prefix("event: error\ndata: ").expect(last);
    let e: Value = serde_json::from_str(data).unwrap();
    assert_eq!(e["type"], "error");
    assert_eq!(e["code"], CUT_CODE);
    // Numbered after the last event delivered.
    assert_eq!(e["sequence_number"], 4);
    assert_eq!(t.counted, 3);
    // A terminal usage above the reservation is withheld too.
    let mut s = response_stream(0);
    s = s.replace("\"output_tokens\":0", "\"output_tokens\":50");
    let (out, cut, _) = run(&req, &[s.as_bytes()]);
    assert!(cut && !out.contains("response.completed"), "{out}");
}

#[test]
fn an_event_without_its_blank_line_at_the_end_still_counts() {
    let req = chat(1);
    let s = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}";
    let (out, cut, t) = run(&req, &[s.as_bytes()]);
    assert!(cut && out.ends_with(CHAT_CUT_EVENT));
    assert_eq!(t.counted, 1);
}

#[test]
fn an_event_too_large_to_count_cuts_the_stream() {
    let req = chat(10);
    let big = vec![b'x'; MAX_EVENT_BYTES + 1];
    let (out, cut, _) = run(&req, &[b"data: ", &big]);
    assert!(cut);
    assert_eq!(out, CHAT_CUT_EVENT);
}
