//! Reading a model API request body: what it may cost (the ask reserved at
//! admission), what it reveals to the extraction detector, and the
//! rewrites warden makes before the app sees it (a `max_tokens` when none
//! is named, usage in streams, information stripped at the degrade step).

use serde_json::{Map, Value};

use warden_config::model::{ModelApi, PredictFormat};

use super::limits::Ask;

pub mod predict;
mod responses;

/// Why a body cannot be admitted (400, with this text as the detail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

/// Most choices (`n`, `best_of`) one request may ask for.
const MAX_CHOICES: u64 = 128;
/// Most prompts in one completions request.
const MAX_PROMPTS: u64 = 128;
/// Tokens reserved for each image in a chat prompt (a high-detail image
/// costs at most about this much on common models).
const IMAGE_TOKENS: u64 = 2_000;

/// What kind of OpenAI-compatible call a body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `messages`: chat/completions.
    Chat,
    /// `prompt`: completions.
    Completion,
    /// `input`: embeddings.
    Embeddings,
    /// `input` and `instructions`: the Responses API (`/v1/responses`).
    Responses,
    /// A predict call (in one of the [`PredictFormat`]s).
    Predict,
}

/// A parsed request body.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    /// The call.
    pub call: Call,
    /// The JSON document (rewritten in place before forwarding).
    pub doc: Map<String, Value>,
    /// Upper bound on prompt tokens: one per byte of the body (no common
    /// tokenizer makes a token of less than a byte), plus images.
    pub prompt_reserve: u64,
    /// Most completion tokens: `max_tokens` times the choices generated.
    pub completion_reserve: u64,
    /// `max_tokens` as it will be sent (named or set by warden).
    pub max_tokens: u64,
    /// Whether the answer is a server-sent-event stream.
    pub stream: bool,
    /// Whether the caller itself asked for the usage chunk of a stream.
    pub caller_wants_usage: bool,
    /// Logprobs asked for (the generated tokens, and the prompt's with `echo`).
    pub logprobs: bool,
    /// `top_logprobs` (chat) or `logprobs` (completions) asked for.
    pub top_logprobs: u32,
    /// `logit_bias` entries: (token id, bias).
    pub logit_bias: Vec<(u32, f64)>,
    /// Prompt text for the detector (messages' text, prompt, or inputs).
    pub text: String,
    /// Embedding inputs (one text each).
    pub inputs: Vec<String>,
    /// Predict feature vectors.
    pub features: Vec<Vec<f64>>,
    /// The shape a predict request came in, and its answer must come back in.
    pub shape: Option<predict::Shape>,
    /// Whether the document was changed and must be serialized again.
    pub rewritten: bool,
}

impl ModelRequest {
    /// Parses `body`, sent to the normalized `path` of a route of kind `api`
    /// (a predict route reads the standard formats: [`Self::predict`] reads
    /// the route's own).
    ///
    /// The call is decided by the path, and only the fields listed for it
    /// are accepted: a backend extension that widens what an answer reveals
    /// or how long it is (`prompt_logprobs`, `n_probs`, `max_new_tokens`,
    /// ...) would otherwise bypass every limit. Anything else gets 400.
    pub fn parse(
        api: ModelApi,
        path: &str,
        body: &[u8],
        default_max_tokens: u32,
    ) -> Result<Self, BadRequest> {
        if api == ModelApi::Predict {
            return Self::predict(&PredictFormat::Auto, body);
        }
        let doc = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(bad("the body must be a JSON object")),
            Err(e) => return Err(bad(format!("the body is not valid JSON: {e}"))),
        };
        let call = match api {
            ModelApi::Predict => Call::Predict,
            ModelApi::Openai if path.ends_with("/chat/completions") => Call::Chat,
            ModelApi::Openai if path.ends_with("/completions") => Call::Completion,
            ModelApi::Openai if path.ends_with("/embeddings") => Call::Embeddings,
            ModelApi::Openai if path.ends_with("/responses") => Call::Responses,
            ModelApi::Openai => {
                return Err(bad(format!(
                    "{path} is not an endpoint this route meters (chat/completions, completions, embeddings, responses)"
                )));
            }
        };
        if let Some(key) = doc.keys().find(|k| !allowed(call, k)) {
            return Err(bad(format!(
                "field {key:?} is not accepted on this route (only the standard fields of the API are)"
            )));
        }
        let mut r = Self::read(call, doc, body.len());
        match call {
            Call::Chat | Call::Completion => r.read_generation(default_max_tokens)?,
            Call::Embeddings => r.read_inputs()?,
            Call::Responses => r.read_response_request(default_max_tokens)?,
            // Decided above.
            Call::Predict => return Err(bad("not a predict route")),
        }
        Ok(r)
    }

    /// Parses the `body` of a predict request in `format`: its rows, and
    /// the shape of its answer. Predict bodies are forwarded as they came
    /// (nothing in them is rewritten).
    pub fn predict(format: &PredictFormat, body: &[u8]) -> Result<Self, BadRequest> {
        let doc = serde_json::from_slice::<Value>(body)
            .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
        let (shape, features) = predict::read(format, &doc)?;
        Ok(Self {
            features,
            shape: Some(shape),
            ..Self::read(Call::Predict, Map::new(), body.len())
        })
    }

    /// A `call` of `len` bytes, before its fields are read.
    fn read(call: Call, doc: Map<String, Value>, len: usize) -> Self {
        Self {
            call,
            doc,
            prompt_reserve: len as u64,
            completion_reserve: 0,
            max_tokens: 0,
            stream: false,
            caller_wants_usage: false,
            logprobs: false,
            top_logprobs: 0,
            logit_bias: Vec::new(),
            text: String::new(),
            inputs: Vec::new(),
            features: Vec::new(),
            shape: None,
            rewritten: false,
        }
    }

    /// What admission reserves.
    pub fn ask(&self) -> Ask {
        let generated = self.completion_reserve;
        let echoed = if self.call == Call::Completion && self.echo() {
            self.prompt_reserve
        } else {
            0
        };
        Ask {
            // A predict call is counted in vectors, not tokens.
            tokens: if self.call == Call::Predict {
                0
            } else {
                self.prompt_reserve.saturating_add(generated)
            },
            logprob_tokens: if self.logprobs {
                generated.saturating_add(echoed)
            } else {
                0
            },
            logit_bias: self.logit_bias.len() as u64,
            vectors: (self.inputs.len() + self.features.len()) as u64,
        }
    }

    fn echo(&self) -> bool {
        self.doc.get("echo").and_then(Value::as_bool) == Some(true)
    }

    fn read_generation(&mut self, default_max_tokens: u32) -> Result<(), BadRequest> {
        let d = &self.doc;
        let count = |key: &str| count(d, key);
        // Servers differ on which of the two wins: reserve for the larger.
        let named = match (count("max_tokens")?, count("max_completion_tokens")?) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let n = count("n")?.unwrap_or(1);
        let best_of = count("best_of")?.unwrap_or(n);
        // A completions request may carry several prompts, each answered `n` times.
        let prompts = match d.get("prompt") {
            Some(Value::Array(a)) if !a.is_empty() && !a.iter().all(Value::is_number) => {
                a.len() as u64
            }
            _ => 1,
        };
        if prompts > MAX_PROMPTS {
            return Err(bad(format!("at most {MAX_PROMPTS} prompts per request")));
        }
        let choices = n.max(best_of).max(1);
        if choices > MAX_CHOICES {
            return Err(bad(format!("n and best_of must be at most {MAX_CHOICES}")));
        }
        let choices = choices * prompts;
        self.stream = flag(d, "stream")?;
        self.caller_wants_usage = d
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true);
        // Logprobs: a boolean plus top_logprobs (chat), or a count (completions).
        match self.call {
            Call::Chat => {
                self.logprobs = flag(d, "logprobs")?;
                let top = count("top_logprobs")?.unwrap_or(0);
                self.top_logprobs = u32::try_from(top).unwrap_or(u32::MAX);
                if top > 0 {
                    self.logprobs = true;
                }
            }
            _ => {
                if let Some(k) = count("logprobs")? {
                    self.logprobs = true;
                    self.top_logprobs = u32::try_from(k).unwrap_or(u32::MAX);
                }
            }
        }
        if let Some(bias) = d.get("logit_bias").filter(|v| !v.is_null()) {
            let Some(bias) = bias.as_object() else {
                return Err(bad("logit_bias must be an object of token id to bias"));
            };
            for (token, b) in bias {
                let (Ok(t), Some(b)) = (token.parse::<u32>(), b.as_f64()) else {
                    return Err(bad("logit_bias keys must be token ids and values numbers"));
                };
                self.logit_bias.push((t, b));
            }
        }
        let mut images = 0u64;
        if self.call == Call::Chat {
            let Some(messages) = d.get("messages").and_then(Value::as_array) else {
                return Err(bad("messages must be an array"));
            };
            for m in messages {
                match m.get("content") {
                    Some(Value::String(s)) => push_text(&mut self.text, s),
                    Some(Value::Array(parts)) => {
                        for p in parts {
                            if let Some(s) = p.get("text").and_then(Value::as_str) {
                                push_text(&mut self.text, s);
                            } else if p.get("type").and_then(Value::as_str) != Some("text") {
                                images += 1;
                            }
                        }
                    }
                    _ => {}
                }
            }
        } else {
            match d.get("prompt") {
                Some(Value::String(s)) => push_text(&mut self.text, s),
                Some(Value::Array(a)) => {
                    for p in a {
                        if let Some(s) = p.as_str() {
                            push_text(&mut self.text, s);
                        }
                    }
                }
                _ => return Err(bad("prompt must be a string or an array")),
            }
        }
        self.prompt_reserve = self
            .prompt_reserve
            .saturating_add(images.saturating_mul(IMAGE_TOKENS));
        // A request that names no limit gets one: what is reserved is what may be generated.
        self.max_tokens = match named {
            Some(m) => m,
            None => {
                // Completions default to 16 tokens (as OpenAI's API does); chat to the route's default.
                let m = if self.call == Call::Completion {
                    16
                } else {
                    u64::from(default_max_tokens)
                };
                self.doc.insert("max_tokens".into(), Value::from(m));
                self.rewritten = true;
                m
            }
        };
        self.completion_reserve = self.max_tokens.saturating_mul(choices);
        // Streams carry their usage, so they are settled exactly.
        if self.stream && !self.caller_wants_usage {
            let opts = self
                .doc
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(o) = opts.as_object_mut() {
                o.insert("include_usage".into(), Value::Bool(true));
                self.rewritten = true;
            }
        }
        Ok(())
    }

    fn read_inputs(&mut self) -> Result<(), BadRequest> {
        match self.doc.get("input") {
            Some(Value::String(s)) => self.inputs.push(s.clone()),
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
                self.inputs = a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect();
            }
            // Token ids: one input, or an array of them.
            Some(Value::Array(a)) if a.iter().all(Value::is_number) => {
                self.inputs.push(token_text(a));
            }
            Some(Value::Array(a)) if a.iter().all(Value::is_array) => {
                self.inputs = a
                    .iter()
                    .filter_map(|v| v.as_array().map(|t| token_text(t)))
                    .collect();
            }
            _ => {
                return Err(bad(
                    "input must be a string, an array of strings, or token ids",
                ));
            }
        }
        if self.inputs.is_empty() {
            return Err(bad("input must not be empty"));
        }
        // The answer's embeddings are read (for answer coverage): only the
        // API's own encodings.
        match self.doc.get("encoding_format") {
            None | Some(Value::Null) => {}
            Some(Value::String(f)) if f == "float" || f == "base64" => {}
            Some(_) => return Err(bad("encoding_format must be \"float\" or \"base64\"")),
        }
        for s in &self.inputs {
            push_text(&mut self.text, s);
        }
        Ok(())
    }

    /// Degrade step: no logprobs, no logit_bias, no echo of the prompt's logprobs.
    pub fn strip_information(&mut self) {
        let mut changed = false;
        for key in ["logprobs", "top_logprobs", "logit_bias", "echo"] {
            changed |= self.doc.remove(key).is_some();
        }
        if self.call == Call::Responses {
            changed |= responses::strip_logprobs(&mut self.doc);
        }
        if changed {
            self.rewritten = true;
            self.logprobs = false;
            self.top_logprobs = 0;
            self.logit_bias.clear();
        }
    }

    /// The body to forward: the caller's bytes, or the rewritten document.
    pub fn body(&self, original: bytes::Bytes) -> bytes::Bytes {
        if !self.rewritten {
            return original;
        }
        serde_json::to_vec(&self.doc)
            .map(bytes::Bytes::from)
            .unwrap_or(original)
    }
}

/// Fields every generation call may carry: the OpenAI API's, and sampling
/// knobs of common servers that change neither the answer's length nor
/// what it reveals.
const GENERATION_FIELDS: &[&str] = &[
    "model",
    "user",
    "metadata",
    "store",
    "service_tier",
    "seed",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "n",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "max_tokens",
    "max_completion_tokens",
    "response_format",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
];
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "reasoning_effort",
];
const COMPLETION_FIELDS: &[&str] = &["prompt", "logprobs", "echo", "best_of", "suffix"];
const EMBEDDING_FIELDS: &[&str] = &["model", "user", "input", "encoding_format", "dimensions"];

fn allowed(call: Call, key: &str) -> bool {
    match call {
        Call::Chat => CHAT_FIELDS.contains(&key) || GENERATION_FIELDS.contains(&key),
        Call::Completion => COMPLETION_FIELDS.contains(&key) || GENERATION_FIELDS.contains(&key),
        Call::Embeddings => EMBEDDING_FIELDS.contains(&key),
        Call::Responses => responses::FIELDS.contains(&key),
        Call::Predict => false,
    }
}

/// A non-negative integer field, if present.
fn count(d: &Map<String, Value>, key: &str) -> Result<Option<u64>, BadRequest> {
    match d.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(format!("{key} must be a non-negative integer"))),
    }
}

/// A boolean field (absent: false).
fn flag(d: &Map<String, Value>, key: &str) -> Result<bool, BadRequest> {
    match d.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(format!("{key} must be a boolean"))),
    }
}

fn bad(s: impl Into<String>) -> BadRequest {
    BadRequest(s.into())
}

/// Text for the detector is bounded: the first 64 KiB of a prompt say
/// everything a fingerprint needs.
const MAX_TEXT: usize = 64 * 1024;

fn push_text(out: &mut String, s: &str) {
    if out.len() >= MAX_TEXT {
        return;
    }
    if !out.is_empty() {
        out.push('\n');
    }
    let room = MAX_TEXT - out.len();
    let mut end = s.len().min(room);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.push_str(&s[..end]);
}

fn token_text(tokens: &[Value]) -> String {
    let mut s = String::new();
    for t in tokens.iter().take(4096) {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(&t.to_string());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> ModelRequest {
        ModelRequest::parse(
            ModelApi::Openai,
            "/v1/chat/completions",
            body.as_bytes(),
            256,
        )
        .unwrap()
    }

    #[test]
    fn a_chat_request_reserves_its_prompt_bound_and_max_tokens() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hello"}],"max_tokens":100,"n":2}"#;
        let r = chat(body);
        assert_eq!(r.call, Call::Chat);
        assert_eq!(r.ask().tokens, body.len() as u64 + 200);
        assert!(!r.rewritten);
        assert_eq!(r.text, "hello");
    }

    #[test]
    fn a_request_without_max_tokens_gets_the_default_set() {
        let r = chat(r#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#);
        assert_eq!(r.max_tokens, 256);
        assert!(r.rewritten);
        let sent: Value = serde_json::from_slice(&r.body(bytes::Bytes::new())).unwrap();
        assert_eq!(sent["max_tokens"], 256);
        assert_eq!(sent["stream_options"]["include_usage"], true);
        assert!(!r.caller_wants_usage);
    }

    #[test]
    fn logprobs_and_logit_bias_are_counted_and_can_be_stripped() {
        let mut r = chat(
            r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":10,"logprobs":true,"top_logprobs":20,"logit_bias":{"50256":-100,"17":5}}"#,
        );
        assert_eq!(r.top_logprobs, 20);
        assert_eq!(r.logit_bias.len(), 2);
        let ask = r.ask();
        assert_eq!((ask.logprob_tokens, ask.logit_bias), (10, 2));
        r.strip_information();
        let sent: Value = serde_json::from_slice(&r.body(bytes::Bytes::new())).unwrap();
        assert!(sent.get("logprobs").is_none() && sent.get("logit_bias").is_none());
        assert_eq!(r.ask().logprob_tokens, 0);
    }

    #[test]
    fn embeddings_count_vectors_and_predict_reads_features() {
        let r = ModelRequest::parse(
            ModelApi::Openai,
            "/v1/embeddings",
            br#"{"model":"e","input":["a","b","c"]}"#,
            1,
        )
        .unwrap();
        assert_eq!((r.call, r.ask().vectors), (Call::Embeddings, 3));
        // Only encodings whose answers can be read.
        for (format, ok) in [
            ("\"float\"", true),
            ("\"base64\"", true),
            ("\"int8\"", false),
            ("1", false),
        ] {
            let body = format!(r#"{{"model":"e","input":"a","encoding_format":{format}}}"#);
            let r = ModelRequest::parse(ModelApi::Openai, "/v1/embeddings", body.as_bytes(), 1);
            assert_eq!(r.is_ok(), ok, "{format}");
        }
        let r = ModelRequest::parse(
            ModelApi::Predict,
            "/predict",
            br#"{"instances":[[1,2.5],[3,4]]}"#,
            1,
        )
        .unwrap();
        assert_eq!(r.features, vec![vec![1.0, 2.5], vec![3.0, 4.0]]);
        assert_eq!(r.ask().vectors, 2);
    }

    #[test]
    fn the_reservation_covers_every_length_field_and_prompt() {
        let r = chat(r#"{"messages":[],"max_tokens":100000,"max_completion_tokens":0}"#);
        assert_eq!(r.completion_reserve, 100_000);
        let r = ModelRequest::parse(
            ModelApi::Openai,
            "/v1/completions",
            br#"{"prompt":["a","b","c"],"max_tokens":10,"n":2}"#,
            1,
        )
        .unwrap();
        assert_eq!(r.completion_reserve, 60);
        // The call is the path's, whatever the body looks like.
        assert!(
            ModelRequest::parse(ModelApi::Openai, "/v1/audio/speech", br#"{"input":"x"}"#, 1)
                .is_err()
        );
    }

    #[test]
    fn malformed_bodies_are_refused_with_a_reason() {
        for body in [
            "not json",
            "[1]",
            r#"{"model":"m"}"#,
            r#"{"messages":"x"}"#,
            r#"{"messages":[],"max_tokens":-1}"#,
            r#"{"messages":[],"n":1000}"#,
            r#"{"messages":[],"logit_bias":{"abc":1}}"#,
            r#"{"messages":[],"prompt_logprobs":20}"#,
            r#"{"messages":[],"max_new_tokens":100000}"#,
        ] {
            assert!(
                ModelRequest::parse(ModelApi::Openai, "/v1/chat/completions", body.as_bytes(), 1)
                    .is_err(),
                "{body}"
            );
        }
        for body in [
            r#"{"instances":[["a"]]}"#,
            r#"{"instances":[]}"#,
            r#"{"x":1}"#,
        ] {
            assert!(
                ModelRequest::parse(ModelApi::Predict, "/predict", body.as_bytes(), 1).is_err(),
                "{body}"
            );
        }
    }
}
