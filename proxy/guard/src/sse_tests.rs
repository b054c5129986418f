//! The parser against the standard's rules, under every split.

use super::*;

/// Everything the parser makes of `chunks`: the events dispatched, the
/// bytes handed out (in order), and what the end of the stream leaves.
fn parse(chunks: &[&[u8]]) -> (Vec<Event>, Vec<u8>, Option<Event>) {
    let mut p = Parser::new(1 << 20);
    let (mut events, mut raw) = (Vec::new(), Vec::new());
    for c in chunks {
        p.push(c);
        while let Some(b) = p.next_block().unwrap() {
            raw.extend_from_slice(&b.raw);
            events.extend(b.event);
        }
    }
    let end = p.finish();
    raw.extend_from_slice(&end.raw);
    (events, raw, end.event)
}

fn events(stream: &[u8]) -> Vec<Event> {
    parse(&[stream]).0
}

fn data(d: &str) -> Event {
    Event {
        data: d.into(),
        ..Event::default()
    }
}

#[test]
fn every_line_ending_style_means_the_same() {
    let want = vec![data("a\nb"), data("c")];
    for stream in [
        &b"data: a\ndata: b\n\ndata: c\n\n"[..],
        b"data: a\r\ndata: b\r\n\r\ndata: c\r\n\r\n",
        b"data: a\rdata: b\r\rdata: c\r\r",
        b"data: a\r\ndata: b\r\rdata: c\n\r\n",
    ] {
        assert_eq!(
            events(stream),
            want,
            "{:?}",
            String::from_utf8_lossy(stream)
        );
    }
}

#[test]
fn a_cr_then_an_lf_in_the_next_chunk_is_one_line_ending() {
    let (ev, ..) = parse(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
    assert_eq!(ev, vec![data("a\nb")]);
    // A CR alone at the end of a chunk ends its line all the same.
    let (ev, ..) = parse(&[b"data: a\r", b"\r", b"data: b\r\r"]);
    assert_eq!(ev, vec![data("a"), data("b")]);
}

#[test]
fn fields_follow_the_standard() {
    let stream = b": a comment\nevent: response.completed\ndata:x\ndata:  y\ndata\nid: 7\nretry: 10\nunknown: z\n\ndata: next\n\n";
    let ev = events(stream);
    assert_eq!(
        ev,
        vec![
            Event {
                event: "response.completed".into(),
                // One space dropped after the colon, no more; `data` alone is an empty line.
                data: "x\n y\n".into(),
                id: "7".into(),
            },
            // The type is per event; the last id stays.
            Event {
                event: String::new(),
                data: "next".into(),
                id: "7".into(),
            },
        ]
    );
    // Without data nothing is dispatched, and the type does not carry over.
    assert_eq!(
        events(b"event: ping\n\n: keep-alive\n\ndata: y\n\n"),
        vec![data("y")]
    );
    // `data:` with an empty value dispatches an empty event.
    assert_eq!(events(b"data:\n\n"), vec![data("")]);
    // An id with a NUL is ignored.
    assert_eq!(events(b"id: a\0b\ndata: x\n\n")[0].id, "");
}

#[test]
fn a_bom_is_skipped_only_at_the_start() {
    assert_eq!(events(b"\xEF\xBB\xBFdata: a\n\n"), vec![data("a")]);
    let (ev, ..) = parse(&[b"\xEF", b"\xBB", b"\xBFdata: a\n\n"]);
    assert_eq!(ev, vec![data("a")]);
    // Later, it is part of a field name (an unknown field).
    assert_eq!(
        events(b"data: a\n\n\xEF\xBB\xBFdata: b\n\n"),
        vec![data("a")]
    );
}

#[test]
fn blocks_are_the_bytes_as_they_came() {
    let mut p = Parser::new(1024);
    p.push(b": hi\n\ndata: a\r\n\r\ndata: b");
    let b1 = p.next_block().unwrap().unwrap();
    assert_eq!((&b1.raw[..], b1.event), (&b": hi\n\n"[..], None));
    let b2 = p.next_block().unwrap().unwrap();
    assert_eq!(&b2.raw[..], b"data: a\r\n\r\n");
    assert_eq!(b2.event, Some(data("a")));
    assert_eq!(p.next_block().unwrap(), None);
    assert_eq!(p.pending(), 7);
    // What the end leaves is counted as a client that dispatches at the end would.
    let end = p.finish();
    assert_eq!(
        (&end.raw[..], end.event),
        (&b"data: b"[..], Some(data("b")))
    );
}

/// A stream with every feature: a BOM, comments, every line ending (and a
/// CRLF that can be split), event types, ids, multi-line data, and a last
/// event without its blank line.
const SAMPLE: &[u8] = b"\xEF\xBB\xBF: open\r\nevent: response.created\r\ndata: {\"a\":1}\r\n\r\nid: 1\ndata: x\ndata:y\n\ndata: cr\rdata: only\r\r:c\n\nevent: e\rdata\r\n\r\ndata: {\"type\":\"response.completed\"}\n\ndata: tail";

#[test]
fn a_split_at_every_byte_parses_the_same() {
    let whole = parse(&[SAMPLE]);
    assert_eq!(whole.0.len(), 5, "{:?}", whole.0);
    assert_eq!(whole.1, SAMPLE);
    assert_eq!(
        whole.2,
        Some(Event {
            data: "tail".into(),
            id: "1".into(),
            ..Event::default()
        })
    );
    for i in 0..=SAMPLE.len() {
        let (a, b) = SAMPLE.split_at(i);
        assert_eq!(parse(&[a, b]), whole, "split at {i}");
        for j in i..=SAMPLE.len() {
            let (b, c) = b.split_at(j - i);
            assert_eq!(parse(&[a, b, c]), whole, "split at {i} and {j}");
        }
    }
    let bytes: Vec<&[u8]> = SAMPLE.chunks(1).collect();
    assert_eq!(parse(&bytes), whole);
}

#[test]
fn work_stays_linear_when_a_large_stream_comes_one_byte_at_a_time() {
    // One event of 512 KiB over 64 lines, then 4,000 small ones.
    let mut stream = Vec::new();
    for _ in 0..64 {
        stream.extend_from_slice(b"data: ");
        stream.extend(std::iter::repeat_n(b'x', 8192));
        stream.push(b'\n');
    }
    stream.push(b'\n');
    for i in 0..4000 {
        stream.extend_from_slice(format!("event: delta\r\ndata: {{\"i\":{i}}}\r\n\r\n").as_bytes());
    }
    let mut p = Parser::new(1 << 20);
    let mut n = 0;
    for b in &stream {
        p.push(std::slice::from_ref(b));
        while let Some(block) = p.next_block().unwrap() {
            n += usize::from(block.event.is_some());
        }
    }
    assert_eq!(n, 4001);
    // Each byte is scanned once and looked at once more in its field.
    let len = stream.len() as u64;
    assert!(
        p.work() <= 2 * len,
        "{} units of work for {len} bytes",
        p.work()
    );
}

#[test]
fn a_block_larger_than_the_bound_is_an_error() {
    let mut p = Parser::new(64);
    p.push(&[b'x'; 65]);
    assert_eq!(p.next_block(), Err(TooLarge(64)));
    let mut p = Parser::new(64);
    p.push(&[b'x'; 64]);
    assert_eq!(p.next_block(), Ok(None));
}
