//! A server-sent-event stream counted as it passes to the caller: each
//! event is parsed once ([`sse`](super::sse), linear in the stream's
//! bytes) and counted ([`Tally`]): the usage chunk of a chat/completions
//! stream, or the usage in a Responses API stream's terminal event, and
//! until then one token per content delta.
//!
//! A stream that goes past what was reserved for it is cut cleanly: the
//! event that would exceed it is withheld and a final error event in the
//! API's own shape ends the stream (chat/completions: `event: error` with
//! an `error` object, then `data: [DONE]`; Responses: an `error` event,
//! `{"type":"error","code":...,"sequence_number":...}`).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use serde_json::Value;

use super::limits::Ask;
use super::request::{Call, ModelRequest};
use super::sse::{Block, Event, Parser};
use super::ticket::Ticket;
use super::usage::{Reserved, Tally};
/// Errors the metered stream can carry (the response body's error type).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest single event we parse; a larger one ends the stream (cut, and
/// charged at its full reservation).
const MAX_EVENT_BYTES: usize = 1 << 20;

/// The code both cut events carry.
const CUT_CODE: &str = "stream_budget_exhausted";
const CUT_MESSAGE: &str =
    "the stream reached the tokens reserved for it; it was ended by the proxy";

/// The final event of a cut chat/completions stream.
const CHAT_CUT_EVENT: &str = "event: error\ndata: {\"error\":{\"type\":\"quota_exceeded\",\"code\":\"stream_budget_exhausted\",\"message\":\"the stream reached the tokens reserved for it; it was ended by the proxy\"}}\n\ndata: [DONE]\n\n";

/// The counting part of a metered stream: bytes in, the bytes to deliver
/// out, and what they used.
#[derive(Debug)]
pub struct Counter {
    parser: Parser,
    /// What the stream used so far.
    pub tally: Tally,
    reserved: Reserved,
    /// A Responses API stream (else chat/completions or completions).
    responses: bool,
    /// Drop the usage-only chunk warden asked for on the caller's behalf.
    swallow_usage: bool,
    /// The last `sequence_number` delivered in a Responses stream.
    sequence: u64,
}

enum Verdict {
    Pass,
    Drop,
    Cut,
}

impl Counter {
    /// A counter for the answer to `req`, which reserved `reserved`.
    pub fn new(req: &ModelRequest, reserved: Reserved) -> Self {
        Self {
            parser: Parser::new(MAX_EVENT_BYTES),
            tally: Tally::default(),
            reserved,
            responses: req.call == Call::Responses,
            swallow_usage: req.stream && !req.caller_wants_usage && req.call != Call::Predict,
            sequence: 0,
        }
    }

    /// Counts `chunk`, appending what may be delivered to `out`; true when
    /// the stream is cut here (the cut event is in `out`; nothing more may
    /// be delivered).
    pub fn feed(&mut self, chunk: &[u8], out: &mut BytesMut) -> bool {
        self.parser.push(chunk);
        loop {
            match self.parser.next_block() {
                Ok(Some(block)) => {
                    if self.deliver(block, out) {
                        return true;
                    }
                }
                Ok(None) => return false,
                // An event too large to count is not delivered either: fail closed.
                Err(_) => {
                    self.cut(out);
                    return true;
                }
            }
        }
    }

    /// The end of the stream: counts and delivers what is left (an event
    /// without its blank line still counts); true when that cut it.
    pub fn end(&mut self, out: &mut BytesMut) -> bool {
        let rest = self.parser.finish();
        !rest.raw.is_empty() && self.deliver(rest, out)
    }

    fn deliver(&mut self, block: Block, out: &mut BytesMut) -> bool {
        match block.event.map_or(Verdict::Pass, |e| self.inspect(&e)) {
            Verdict::Pass => out.extend_from_slice(&block.raw),
            Verdict::Drop => {}
            Verdict::Cut => {
                self.cut(out);
                return true;
            }
        }
        false
    }

    fn inspect(&mut self, event: &Event) -> Verdict {
        if event.data.trim_ascii() == "[DONE]" {
            return Verdict::Pass;
        }
        let Ok(doc) = serde_json::from_str::<Value>(&event.data) else {
            return Verdict::Pass;
        };
        let (before, sequence) = (self.tally, self.sequence);
        let usage = if self.responses {
            if let Some(n) = doc.get("sequence_number").and_then(Value::as_u64) {
                self.sequence = self.sequence.max(n);
            }
            self.tally.add_response_event(&doc)
        } else {
            self.tally.add_document(&doc)
        };
        let limit = self.reserved.completion_reserve;
        if self.tally.counted > limit || self.tally.completion.unwrap_or(0) > limit {
            // Over what was reserved: this event is not delivered, nor charged.
            (self.tally, self.sequence) = (before, sequence);
            return Verdict::Cut;
        }
        let no_choices = doc
            .get("choices")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty);
        if usage && no_choices && self.swallow_usage && !self.responses {
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    }

    /// Appends the API's error event that ends a cut stream.
    fn cut(&self, out: &mut BytesMut) {
        if !self.responses {
            out.extend_from_slice(CHAT_CUT_EVENT.as_bytes());
            return;
        }
        let error = serde_json::json!({
            "type": "error",
            "code": CUT_CODE,
            "message": CUT_MESSAGE,
            "param": null,
            "sequence_number": self.sequence.saturating_add(1),
        });
        out.extend_from_slice(format!("event: error\ndata: {error}\n\n").as_bytes());
    }
}

/// A streamed answer (the app's body `B`) being counted on its way to the caller.
pub struct Metered<B> {
    inner: B,
    counter: Counter,
    done: bool,
    ticket: Option<Ticket>,
    /// The gate's hold: its concurrency slot is held until the stream ends.
    gate: Option<Ticket>,
}

impl<B> Metered<B> {
    /// Counts `inner` against `ticket`; `gate` is released when it ends.
    pub fn new(
        inner: B,
        req: &ModelRequest,
        reserved: Reserved,
        ticket: Ticket,
        gate: Ticket,
    ) -> Self {
        Self {
            inner,
            counter: Counter::new(req, reserved),
            done: false,
            ticket: Some(ticket),
            gate: Some(gate),
        }
    }

    fn finish(&mut self, cut: bool) {
        let c = &mut self.counter;
        if cut {
            // What was delivered is not known to the token (deltas may carry
            // several): a cut stream is charged its whole reservation.
            c.tally.completion = Some(c.reserved.completion_reserve);
        }
        if let Some(t) = self.ticket.take() {
            t.finish(c.tally.used(&c.reserved), cut);
        }
        if let Some(g) = self.gate.take() {
            g.finish(Ask::default(), false);
        }
    }
}

impl<B> HttpBody for Metered<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
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
            let mut out = BytesMut::new();
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => {
                    this.done = true;
                    let cut = this.counter.end(&mut out);
                    this.finish(cut);
                    if out.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
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
                    if this.counter.feed(&data, &mut out) {
                        this.done = true;
                        this.finish(true);
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

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        if !self.done {
            // The caller went away mid-stream: the model may have generated
            // more than was delivered, so the whole reservation is charged.
            let c = &mut self.counter;
            c.tally.completion = Some(c.reserved.completion_reserve);
        }
        self.finish(false);
    }
}

#[cfg(test)]
#[path = "meter_tests.rs"]
mod tests;
