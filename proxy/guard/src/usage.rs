//! What an answer used, read from what the model says: the `usage` of a
//! JSON answer (`prompt_tokens`/`completion_tokens`, or the Responses API's
//! `input_tokens`/`output_tokens`, and `total_tokens`), the logprobs and
//! embeddings it returns, and, in a stream, each event as it passes (one
//! token per content delta until a usage arrives).

use serde_json::Value;

use super::limits::Ask;
use super::request::ModelRequest;

/// What an answer used, as far as it has been seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Prompt (input) tokens, when the answer carried usage.
    pub prompt: Option<u64>,
    /// Completion (output) tokens, when the answer carried usage.
    pub completion: Option<u64>,
    /// `usage.total_tokens`, when the answer carried it.
    pub total: Option<u64>,
    /// Completion tokens counted from the content (one per delta in streams).
    pub counted: u64,
    /// Tokens returned with logprobs.
    pub logprob_tokens: u64,
    /// Embedding vectors returned.
    pub vectors: Option<u64>,
    /// Whether a `usage` object was seen.
    pub usage_seen: bool,
}

/// The embeddings of an OpenAI-style embeddings answer (`data[].embedding`,
/// an array of numbers or, with `encoding_format: base64`, the base64 of
/// little-endian f32 values, which is what the OpenAI SDKs ask for by
/// default), for the detector's answer coverage. An embedding that cannot
/// be read is left out; the answer's size is already bounded by the route.
pub fn embeddings(doc: &Value) -> Vec<Vec<f32>> {
    use base64::Engine as _;
    let Some(data) = doc.get("data").and_then(Value::as_array) else {
        return Vec::new();
    };
    data.iter()
        .filter_map(|d| match d.get("embedding")? {
            Value::Array(xs) => xs.iter().map(|x| x.as_f64().map(|x| x as f32)).collect(),
            Value::String(b64) => {
                let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
                (bytes.len() % 4 == 0).then(|| {
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                })
            }
            _ => None,
        })
        .collect()
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
                // A total larger than its parts (tokens the parts do not name) counts.
                prompt
                    .saturating_add(completion)
                    .max(self.total.unwrap_or(0))
            },
            logprob_tokens: self.logprob_tokens,
            logit_bias: req.ask.logit_bias,
            vectors: self.vectors.unwrap_or(req.ask.vectors),
        }
    }

    /// Reads a `usage` object of either API's shape.
    fn add_usage(&mut self, u: &Value) -> bool {
        if !u.is_object() {
            return false;
        }
        self.usage_seen = true;
        let field = |k: &str| u.get(k).and_then(Value::as_u64).map(|v| v.min(MAX_USAGE));
        self.prompt = field("prompt_tokens")
            .or_else(|| field("input_tokens"))
            .or(self.prompt);
        self.completion = field("completion_tokens")
            .or_else(|| field("output_tokens"))
            .or(self.completion);
        self.total = field("total_tokens").or(self.total);
        true
    }

    /// Reads `usage`, logprobs and embeddings from a JSON answer (or one
    /// chat/completions stream chunk); true when it carried usage.
    pub fn add_document(&mut self, doc: &Value) -> bool {
        let usage_seen = doc.get("usage").is_some_and(|u| self.add_usage(u));
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
                    self.add_logprobs(n);
                }
            }
        }
        // A Responses API answer: logprobs on each output text part.
        if let Some(output) = doc.get("output").and_then(Value::as_array) {
            for item in output {
                for part in item
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let n = part
                        .get("logprobs")
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len);
                    self.add_logprobs(n);
                }
            }
        }
        if let Some(data) = doc.get("data").and_then(Value::as_array) {
            self.vectors = Some(data.len() as u64);
        }
        usage_seen
    }

    /// Reads one event of a Responses API stream; true when it carried
    /// usage. The usage comes with the terminal event (`response.completed`,
    /// `response.incomplete`, `response.failed`) in its `response`; until
    /// then each non-empty `*.delta` counts one token, with its logprobs.
    /// (The `*.done` events and the final response repeat what the deltas
    /// carried: not counted again.)
    pub fn add_response_event(&mut self, doc: &Value) -> bool {
        let usage = doc
            .get("response")
            .and_then(|r| r.get("usage"))
            .is_some_and(|u| self.add_usage(u));
        let kind = doc.get("type").and_then(Value::as_str).unwrap_or("");
        if kind.ends_with(".delta") {
            let some = match doc.get("delta") {
                None | Some(Value::Null) => false,
                Some(Value::String(s)) => !s.is_empty(),
                Some(_) => true,
            };
            if some {
                self.counted = self.counted.saturating_add(1);
            }
            let n = doc
                .get("logprobs")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            self.add_logprobs(n);
        }
        usage
    }

    fn add_logprobs(&mut self, n: usize) {
        self.logprob_tokens = self.logprob_tokens.saturating_add(n as u64);
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn reserved() -> Reserved {
        Reserved {
            ask: Ask {
                tokens: 100,
                logprob_tokens: 10,
                ..Ask::default()
            },
            prompt_reserve: 50,
            completion_reserve: 50,
        }
    }

    #[test]
    fn embeddings_are_read_as_numbers_or_as_base64_little_endian_f32() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(
            [0.5f32, -1.25]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        // The shape of OpenAI's embeddings reference, both encodings.
        let doc = json!({"object": "list", "data": [
            {"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292]},
            {"object": "embedding", "index": 1, "embedding": b64},
            {"object": "embedding", "index": 2, "embedding": "not base64!"},
            {"object": "embedding", "index": 3, "embedding": [1, "x"]}
        ], "model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}});
        assert_eq!(
            embeddings(&doc),
            vec![vec![0.002_306_425_5, -0.009_327_292], vec![0.5, -1.25]]
        );
        assert!(embeddings(&json!({"choices": []})).is_empty());
    }

    #[test]
    fn a_json_answer_settles_from_its_usage() {
        let doc = json!({"choices":[{"message":{"content":"hi"},"logprobs":{"content":[{},{}]}}],"usage":{"prompt_tokens":7,"completion_tokens":2}});
        let mut t = Tally::default();
        assert!(t.add_document(&doc));
        let r = reserved();
        assert_eq!(t.used(&r).tokens, 9);
        assert_eq!(t.used(&r).logprob_tokens, 2);
        // No usage: the prompt counts at its bound, the completion as counted.
        let mut t = Tally::default();
        t.add_document(&json!({"choices":[{"delta":{"content":"x"}}]}));
        assert_eq!(t.used(&r).tokens, 51);
    }

    #[test]
    fn a_responses_answer_settles_from_input_and_output_tokens() {
        let doc = json!({"object": "response", "status": "completed", "output": [
            {"type": "reasoning", "summary": []},
            {"type": "message", "content": [{"type": "output_text", "text": "hi", "logprobs": [{}, {}, {}]}]}
        ], "usage": {"input_tokens": 12, "output_tokens": 3, "total_tokens": 15, "output_tokens_details": {"reasoning_tokens": 1}}});
        let mut t = Tally::default();
        assert!(t.add_document(&doc));
        let used = t.used(&reserved());
        assert_eq!((used.tokens, used.logprob_tokens), (15, 3));
        // A total above its parts is what is charged.
        let mut t = Tally::default();
        t.add_document(
            &json!({"usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 40}}),
        );
        assert_eq!(t.used(&reserved()).tokens, 40);
    }

    #[test]
    fn a_responses_stream_counts_deltas_until_the_terminal_usage() {
        let mut t = Tally::default();
        for e in [
            json!({"type": "response.created", "response": {"usage": null}}),
            json!({"type": "response.output_text.delta", "delta": "a", "logprobs": [{}]}),
            json!({"type": "response.output_text.delta", "delta": ""}),
            json!({"type": "response.function_call_arguments.delta", "delta": "{"}),
            json!({"type": "response.output_text.done", "text": "a", "logprobs": [{}]}),
        ] {
            assert!(!t.add_response_event(&e));
        }
        assert_eq!((t.counted, t.logprob_tokens), (2, 1));
        assert_eq!(t.used(&reserved()).tokens, 52);
        let end = json!({"type": "response.incomplete", "response": {"output": [{"content": [{"logprobs": [{}]}]}], "usage": {"input_tokens": 9, "output_tokens": 2, "total_tokens": 11}}});
        assert!(t.add_response_event(&end));
        let used = t.used(&reserved());
        assert_eq!((used.tokens, used.logprob_tokens), (11, 1));
    }
}
