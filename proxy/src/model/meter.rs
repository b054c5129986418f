//! Counting what an answer used: the `usage` of a JSON answer, or a
//! server-sent-event stream counted as it passes (its usage chunk when the
//! app sends one, otherwise one token per content delta). A stream that
//! goes past what was reserved for it is cut cleanly: the event that would
//! exceed it is withheld and a final error event ends the stream.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use serde_json::Value;

use super::limits::Ask;
use super::request::{Call, ModelRequest};
use super::ticket::Ticket;
use crate::respond::BoxError;

/// Largest single event we parse; a larger one ends the stream (cut, and
/// charged at its full reservation).
const MAX_EVENT_BYTES: usize = 1 << 20;

/// What an answer used, as far as it has been seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// `usage.prompt_tokens`, when the answer carried usage.
    pub prompt: Option<u64>,
    /// `usage.completion_tokens`, when the answer carried usage.
    pub completion: Option<u64>,
    /// Completion tokens counted from the content (one per delta in streams).
    pub counted: u64,
    /// Tokens returned with logprobs.
    pub logprob_tokens: u64,
    /// Embedding vectors returned.
    pub vectors: Option<u64>,
    /// Whether a `usage` object was seen.
    pub usage_seen: bool,
}

/// Usage figures are the app's: clamped so that no sum overflows.
const MAX_USAGE: u64 = 1 << 40;

impl Tally {
    /// What the request used, from what was seen; unknown parts count at
    /// their reservation.
    pub fn used(&self, req: &Reserved) -> Ask {
        let prompt = self.prompt.unwrap_or(req.prompt_reserve);
        let completion = match self.completion {
            Some(c) => c,
            None if req.completion_reserve == 0 => 0,
            // Usage without completion tokens (another API's shape): the reservation stands.
            None if self.usage_seen => req.completion_reserve,
            None => self.counted,
        };
        Ask {
            // Nothing reserved in tokens (a predict call): nothing charged in tokens.
            tokens: if req.ask.tokens == 0 {
                0
            } else {
                prompt.saturating_add(completion)
            },
            logprob_tokens: self.logprob_tokens,
            logit_bias: req.ask.logit_bias,
            vectors: self.vectors.unwrap_or(req.ask.vectors),
        }
    }

    /// Reads `usage`, logprobs and embeddings from a JSON answer (or one stream chunk).
    pub fn add_document(&mut self, doc: &Value) -> bool {
        let mut usage_seen = false;
        if let Some(u) = doc.get("usage").filter(|u| u.is_object()) {
            usage_seen = true;
            self.usage_seen = true;
            let field = |k: &str| u.get(k).and_then(Value::as_u64).map(|v| v.min(MAX_USAGE));
            self.prompt = field("prompt_tokens").or(self.prompt);
            self.completion = field("completion_tokens").or(self.completion);
        }
        if let Some(choices) = doc.get("choices").and_then(Value::as_array) {
            for c in choices {
                let content = c.get("delta").unwrap_or(c);
                let has = |k: &str| match content.get(k) {
                    Some(Value::String(s)) => !s.is_empty(),
                    Some(Value::Array(a)) => !a.is_empty(),
                    _ => false,
                };
                if has("content") || has("text") || has("tool_calls") || has("reasoning_content") {
                    self.counted = self.counted.saturating_add(1);
                }
                if let Some(lp) = c.get("logprobs") {
                    let n = lp
                        .get("content")
                        .or_else(|| lp.get("tokens"))
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len);
                    self.logprob_tokens = self.logprob_tokens.saturating_add(n as u64);
                }
            }
        }
        if let Some(data) = doc.get("data").and_then(Value::as_array) {
            self.vectors = Some(data.len() as u64);
        }
        usage_seen
    }
}

/// The parts of a request its answer is settled against.
#[derive(Debug, Clone, Copy)]
pub struct Reserved {
    /// What admission reserved.
    pub ask: Ask,
    /// The prompt's share of `ask.tokens`.
    pub prompt_reserve: u64,
    /// The completion tokens the stream may carry before it is cut.
    pub completion_reserve: u64,
}

impl Reserved {
    /// From a parsed request.
    pub fn of(req: &ModelRequest) -> Self {
        Self {
            ask: req.ask(),
            prompt_reserve: req.prompt_reserve,
            completion_reserve: req.completion_reserve,
        }
    }
}

/// A streamed answer being counted on its way to the caller.
pub struct Metered {
    inner: Incoming,
    pending: BytesMut,
    tally: Tally,
    reserved: Reserved,
    /// Drop the usage-only chunk warden asked for on the caller's behalf.
    swallow_usage: bool,
    done: bool,
    ticket: Option<Ticket>,
    /// The gate's hold: its concurrency slot is held until the stream ends.
    gate: Option<Ticket>,
}

impl Metered {
    /// Counts `inner` against `ticket`; `gate` is released when it ends.
    pub fn new(
        inner: Incoming,
        req: &ModelRequest,
        reserved: Reserved,
        ticket: Ticket,
        gate: Ticket,
    ) -> Self {
        Self {
            inner,
            pending: BytesMut::new(),
            tally: Tally::default(),
            reserved,
            swallow_usage: req.stream && !req.caller_wants_usage && req.call != Call::Predict,
            done: false,
            ticket: Some(ticket),
            gate: Some(gate),
        }
    }

    fn finish(&mut self, cut: bool) {
        if cut {
            // What was delivered is not known to the token (deltas may carry
            // several): a cut stream is charged its whole reservation.
            self.tally.completion = Some(self.reserved.completion_reserve);
        }
        if let Some(t) = self.ticket.take() {
            t.finish(self.tally.used(&self.reserved), cut);
        }
        if let Some(g) = self.gate.take() {
            g.finish(Ask::default(), false);
        }
    }

    /// Moves every complete event from `pending` to `out`; true when the
    /// stream must be cut here.
    fn drain_events(&mut self, out: &mut BytesMut) -> bool {
        while let Some((end, sep)) = event_end(&self.pending) {
            let event = self.pending.split_to(end + sep).freeze();
            match self.inspect(&event[..end]) {
                Verdict::Pass => out.extend_from_slice(&event),
                Verdict::Drop => {}
                Verdict::Cut => return true,
            }
        }
        false
    }

    fn inspect(&mut self, event: &[u8]) -> Verdict {
        let Some(data) = event_data(event) else {
            return Verdict::Pass;
        };
        if data.trim_ascii() == b"[DONE]" {
            return Verdict::Pass;
        }
        let Ok(doc) = serde_json::from_slice::<Value>(&data) else {
            return Verdict::Pass;
        };
        let before = self.tally;
        let usage = self.tally.add_document(&doc);
        if self.tally.counted > self.reserved.completion_reserve
            || self.tally.completion.unwrap_or(0) > self.reserved.completion_reserve
        {
            // Over what was reserved: this event is not delivered, nor charged.
            self.tally = before;
            return Verdict::Cut;
        }
        let no_choices = doc
            .get("choices")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty);
        if usage && no_choices && self.swallow_usage {
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    }
}

enum Verdict {
    Pass,
    Drop,
    Cut,
}

/// The final event of a cut stream.
const CUT_EVENT: &[u8] = b"event: error\ndata: {\"error\":{\"type\":\"quota_exceeded\",\"code\":\"stream_budget_exhausted\",\"message\":\"the stream reached the tokens reserved for it; it was ended by the proxy\"}}\n\ndata: [DONE]\n\n";

/// Where the first event in `buf` ends: (index of the blank line, its length).
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' && buf[i + 1] == b'\n' {
            return Some((i, 2));
        }
        if buf[i] == b'\r'
            && buf[i + 1] == b'\n'
            && buf.get(i + 2) == Some(&b'\r')
            && buf.get(i + 3) == Some(&b'\n')
        {
            return Some((i, 4));
        }
        i += 1;
    }
    None
}

/// The event's `data` lines joined by newlines (None when it has none).
fn event_data(event: &[u8]) -> Option<Vec<u8>> {
    let mut data: Option<Vec<u8>> = None;
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data:") {
            let rest = rest.strip_prefix(b" ").unwrap_or(rest);
            let d = data.get_or_insert_with(Vec::new);
            if !d.is_empty() {
                d.push(b'\n');
            }
            d.extend_from_slice(rest);
        }
    }
    data
}

impl HttpBody for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => {
                    this.done = true;
                    this.finish(false);
                    if this.pending.is_empty() {
                        return Poll::Ready(None);
                    }
                    let rest = this.pending.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                Some(Err(e)) => {
                    this.done = true;
                    this.finish(false);
                    return Poll::Ready(Some(Err(e.into())));
                }
                Some(Ok(frame)) => {
                    let data = match frame.into_data() {
                        Ok(d) => d,
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    };
                    this.pending.extend_from_slice(&data);
                    let mut out = BytesMut::new();
                    // An event too large to count is not delivered either: fail closed.
                    if this.drain_events(&mut out) || this.pending.len() > MAX_EVENT_BYTES {
                        out.extend_from_slice(CUT_EVENT);
                        this.done = true;
                        this.pending.clear();
                        this.finish(true);
                        return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        if !self.done {
            // The caller went away mid-stream: the model may have generated
            // more than was delivered, so the whole reservation is charged.
            self.tally.completion = Some(self.reserved.completion_reserve);
        }
        self.finish(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_split_on_blank_lines_of_either_kind() {
        assert_eq!(event_end(b"data: a\n\ndata: b"), Some((7, 2)));
        assert_eq!(event_end(b"data: a\r\n\r\n"), Some((7, 4)));
        assert_eq!(event_end(b"data: a\n"), None);
        assert_eq!(
            event_data(b"event: x\ndata: {\"a\":\ndata: 1}"),
            Some(b"{\"a\":\n1}".to_vec())
        );
        assert_eq!(event_data(b": comment"), None);
    }

    #[test]
    fn a_json_answer_settles_from_its_usage() {
        let doc: Value = serde_json::from_str(
            r#"{"choices":[{"message":{"content":"hi"},"logprobs":{"content":[{},{}]}}],"usage":{"prompt_tokens":7,"completion_tokens":2}}"#,
        )
        .unwrap();
        let mut t = Tally::default();
        assert!(t.add_document(&doc));
        let r = Reserved {
            ask: Ask {
                tokens: 100,
                logprob_tokens: 10,
                ..Ask::default()
            },
            prompt_reserve: 50,
            completion_reserve: 50,
        };
        assert_eq!(t.used(&r).tokens, 9);
        assert_eq!(t.used(&r).logprob_tokens, 2);
        // No usage: the prompt counts at its bound, the completion as counted.
        let mut t = Tally::default();
        t.add_document(&serde_json::json!({"choices":[{"delta":{"content":"x"}}]}));
        assert_eq!(t.used(&r).tokens, 51);
    }
}
