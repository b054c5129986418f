//! An incremental server-sent-events parser, as the WHATWG HTML standard
//! ("Server-sent events", the event stream interpretation) says, for a
//! proxy: the bytes pass through unchanged, cut into blocks (everything up
//! to and including the blank line that ends an event), each with the event
//! it dispatches, so that a block can be delivered or withheld whole.
//!
//! - Lines end in CRLF, LF or CR; a CR at the end of one chunk and an LF at
//!   the start of the next are one line ending.
//! - A UTF-8 byte order mark at the very start is skipped.
//! - `field:value` (one space after the colon dropped), `field` alone (an
//!   empty value), `:comment` ignored; `data` lines join with LF, `event`
//!   names the type, `id` (without NUL) sets the last event id, `retry` and
//!   unknown fields are ignored.
//! - A blank line dispatches: nothing when no `data` line came, otherwise
//!   the data without its last LF.
//!
//! Every byte is looked at once, however the stream is split: the parser
//! resumes where it stopped, so work is O(bytes) in total. A block is
//! bounded (`max_block` bytes); a longer one is an error.

use bytes::{Bytes, BytesMut};

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// The `event` field: empty for the default type (`message`).
    pub event: String,
    /// The `data` lines joined by LF.
    pub data: String,
    /// The last event id at dispatch.
    pub id: String,
}

/// A piece of the stream: its bytes as they came, and the event it
/// dispatched (None for comments, blank lines, events without data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The bytes, to forward as they are.
    pub raw: Bytes,
    /// What a client dispatches at its end.
    pub event: Option<Event>,
}

/// A block grew past the parser's bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an event of more than {0} bytes")]
pub struct TooLarge(pub usize);

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// See the module documentation.
#[derive(Debug)]
pub struct Parser {
    /// The current block's bytes (not handed out yet).
    buf: BytesMut,
    /// Bytes of `buf` already parsed.
    scan: usize,
    /// Where the line being parsed starts in `buf`.
    line: usize,
    /// The last byte parsed was a CR: an LF next ends nothing.
    after_cr: bool,
    /// Past the start of the stream (the BOM is decided).
    started: bool,
    data: Vec<u8>,
    event: Vec<u8>,
    id: Vec<u8>,
    max_block: usize,
    work: u64,
}

impl Parser {
    /// A parser for a new stream whose blocks are at most `max_block` bytes.
    pub fn new(max_block: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            scan: 0,
            line: 0,
            after_cr: false,
            started: false,
            data: Vec::new(),
            event: Vec::new(),
            id: Vec::new(),
            max_block,
            work: 0,
        }
    }

    /// Appends the next bytes of the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes looked at so far: by the line scanner, and again in each
    /// line's fields (what linearity is measured in).
    pub fn work(&self) -> u64 {
        self.work
    }

    /// Bytes received and not handed out yet.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete block, if the bytes pushed so far end one.
    pub fn next_block(&mut self) -> Result<Option<Block>, TooLarge> {
        if !self.started {
            let n = self.buf.len().min(BOM.len());
            if self.buf[..n] != BOM[..n] {
                self.started = true;
            } else if n == BOM.len() {
                self.started = true;
                self.scan = n;
                self.line = n;
            } else {
                return Ok(None);
            }
        }
        while self.scan < self.buf.len() {
            if self.after_cr {
                self.after_cr = false;
                if self.buf[self.scan] == b'\n' {
                    // The second half of a CRLF split across chunks.
                    self.work += 1;
                    self.scan += 1;
                    self.line = self.scan;
                    continue;
                }
            }
            let rest = &self.buf[self.scan..];
            let Some(at) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') else {
                self.work += rest.len() as u64;
                self.scan = self.buf.len();
                break;
            };
            self.work += at as u64 + 1;
            let end = self.scan + at;
            let mut next = end + 1;
            if self.buf[end] == b'\r' {
                match self.buf.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            let (start, dispatch) = (self.line, end == self.line);
            self.scan = next;
            self.line = next;
            if dispatch {
                let event = self.dispatch();
                let raw = self.buf.split_to(next).freeze();
                self.scan = 0;
                self.line = 0;
                return Ok(Some(Block { raw, event }));
            }
            self.field(start, end);
        }
        if self.buf.len() > self.max_block {
            return Err(TooLarge(self.max_block));
        }
        Ok(None)
    }

    /// The end of the stream: whatever was not handed out, with the event
    /// it would dispatch if the stream had ended it (a client that
    /// dispatches at the end may still act on it, so it is counted).
    pub fn finish(&mut self) -> Block {
        if self.line < self.buf.len() && !self.after_cr {
            let (start, end) = (self.line, self.buf.len());
            self.field(start, end);
        }
        let event = self.dispatch();
        self.scan = 0;
        self.line = 0;
        Block {
            raw: self.buf.split().freeze(),
            event,
        }
    }

    /// Processes the line `buf[start..end]` (not blank).
    fn field(&mut self, start: usize, end: usize) {
        let line = &self.buf[start..end];
        self.work += line.len() as u64;
        if line[0] == b':' {
            return;
        }
        let (name, value) = match line.iter().position(|b| *b == b':') {
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match name {
            b"data" => {
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            b"id" if !value.contains(&0) => {
                self.id.clear();
                self.id.extend_from_slice(value);
            }
            _ => {}
        }
    }

    /// The event a blank line dispatches; resets the data and type buffers.
    fn dispatch(&mut self) -> Option<Event> {
        let event = String::from_utf8_lossy(&self.event).into_owned();
        self.event.clear();
        if self.data.is_empty() {
            return None;
        }
        self.data.pop();
        let data = String::from_utf8_lossy(&self.data).into_owned();
        self.data.clear();
        Some(Event {
            event,
            data,
            id: String::from_utf8_lossy(&self.id).into_owned(),
        })
    }
}

#[cfg(test)]
#[path = "sse_tests.rs"]
mod tests;
