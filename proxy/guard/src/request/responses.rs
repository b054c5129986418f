//! A body for the OpenAI Responses API (`POST /v1/responses`): `input` (a
//! string, or an array of items whose content is text, images or files),
//! `instructions`, `max_output_tokens` (set to the route's default when
//! absent, so that what is reserved is what may be generated), and what it
//! reveals: logprobs come back only with `include:
//! ["message.output_text.logprobs"]`, `top_logprobs` per position.
//!
//! Only the API's own request fields are accepted. A background response
//! (`background: true`) is refused: its answer carries no usage to settle
//! from (the model runs after the answer is sent).

use serde_json::{Map, Value};

use super::{BadRequest, IMAGE_TOKENS, ModelRequest, bad, count, flag, push_text};

/// The request fields of `POST /v1/responses`, as the OpenAI API reference
/// lists them.
pub(super) const FIELDS: &[&str] = &[
    "background",
    "conversation",
    "include",
    "input",
    "instructions",
    "max_output_tokens",
    "max_tool_calls",
    "metadata",
    "model",
    "parallel_tool_calls",
    "previous_response_id",
    "prompt",
    "prompt_cache_key",
    "prompt_cache_retention",
    "reasoning",
    "safety_identifier",
    "service_tier",
    "store",
    "stream",
    "stream_options",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "truncation",
    "user",
];

/// The `include` value that returns the generated tokens' logprobs.
const LOGPROBS: &str = "message.output_text.logprobs";

/// What `include` may name (anything else is refused: it might release
/// more than the route knows of).
const INCLUDABLE: &[&str] = &[
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
    "file_search_call.results",
    "message.input_image.image_url",
    LOGPROBS,
    "reasoning.encrypted_content",
    "web_search_call.action.sources",
    "web_search_call.results",
];

impl ModelRequest {
    pub(super) fn read_response_request(
        &mut self,
        default_max_tokens: u32,
    ) -> Result<(), BadRequest> {
        let d = &self.doc;
        if flag(d, "background")? {
            return Err(bad(
                "background responses cannot be metered (their answer carries no usage); send them without background",
            ));
        }
        self.stream = flag(d, "stream")?;
        // The stream's last event carries the usage whether asked or not: nothing to add or withhold.
        self.caller_wants_usage = true;
        match d.get("include") {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) => {
                for v in a {
                    match v.as_str() {
                        Some(LOGPROBS) => self.logprobs = true,
                        Some(s) if INCLUDABLE.contains(&s) => {}
                        _ => {
                            return Err(bad(format!(
                                "include may only name {}",
                                INCLUDABLE.join(", ")
                            )));
                        }
                    }
                }
            }
            Some(_) => return Err(bad("include must be an array of strings")),
        }
        let top = count(d, "top_logprobs")?.unwrap_or(0);
        self.top_logprobs = u32::try_from(top).unwrap_or(u32::MAX);
        if top > 0 {
            // Counted as asked for whatever `include` says: fail closed.
            self.logprobs = true;
        }
        let named = count(d, "max_output_tokens")?;
        let mut text = String::new();
        let mut images = 0u64;
        match d.get("instructions") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => push_text(&mut text, s),
            Some(_) => return Err(bad("instructions must be a string")),
        }
        match d.get("input") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => push_text(&mut text, s),
            Some(Value::Array(items)) => {
                for item in items {
                    let Some(item) = item.as_object() else {
                        return Err(bad("input items must be objects"));
                    };
                    read_item(item, &mut text, &mut images);
                }
            }
            Some(_) => return Err(bad("input must be a string or an array of items")),
        }
        self.text = text;
        self.prompt_reserve = self
            .prompt_reserve
            .saturating_add(images.saturating_mul(IMAGE_TOKENS));
        self.max_tokens = match named {
            Some(m) => m,
            None => {
                let m = u64::from(default_max_tokens);
                self.doc.insert("max_output_tokens".into(), Value::from(m));
                self.rewritten = true;
                m
            }
        };
        // Reasoning tokens count in max_output_tokens: it bounds everything generated.
        self.completion_reserve = self.max_tokens;
        Ok(())
    }
}

/// Reads one input item: a message (`content` a string or parts), a tool
/// call's arguments or a tool's output. Text goes to the detector; each
/// part that is not text (an image, a file) reserves [`IMAGE_TOKENS`].
fn read_item(item: &Map<String, Value>, text: &mut String, images: &mut u64) {
    for key in ["content", "output"] {
        match item.get(key) {
            Some(Value::String(s)) => push_text(text, s),
            Some(Value::Array(parts)) => {
                for p in parts {
                    match p.get("text").or_else(|| p.get("refusal")) {
                        Some(Value::String(s)) => push_text(text, s),
                        _ => *images = images.saturating_add(1),
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(Value::String(s)) = item.get("arguments") {
        push_text(text, s);
    }
}

/// Degrade step: no logprobs. True when the document changed.
pub(super) fn strip_logprobs(doc: &mut Map<String, Value>) -> bool {
    let Some(Value::Array(include)) = doc.get_mut("include") else {
        return false;
    };
    let before = include.len();
    include.retain(|v| v.as_str() != Some(LOGPROBS));
    include.len() != before
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use warden_config::model::ModelApi;

    use super::super::Call;
    use super::*;

    fn parse(body: &Value) -> Result<ModelRequest, BadRequest> {
        ModelRequest::parse(
            ModelApi::Openai,
            "/v1/responses",
            body.to_string().as_bytes(),
            256,
        )
    }

    #[test]
    fn a_response_request_reserves_its_input_and_max_output_tokens() {
        let body = json!({"model": "m", "instructions": "be brief", "input": "hello", "max_output_tokens": 100});
        let r = parse(&body).unwrap();
        assert_eq!(r.call, Call::Responses);
        assert_eq!(r.ask().tokens, body.to_string().len() as u64 + 100);
        assert_eq!(r.text, "be brief\nhello");
        assert!(!r.rewritten && !r.logprobs);
    }

    #[test]
    fn without_max_output_tokens_the_default_is_set() {
        let r = parse(&json!({"input": "hi", "stream": true})).unwrap();
        assert_eq!((r.max_tokens, r.completion_reserve), (256, 256));
        let sent: Value = serde_json::from_slice(&r.body(bytes::Bytes::new())).unwrap();
        assert_eq!(sent["max_output_tokens"], 256);
        // No stream option is added: the usage comes in the stream's last event.
        assert!(sent.get("stream_options").is_none() && r.stream);
    }

    #[test]
    fn input_items_give_text_and_images_their_due() {
        let body = json!({"input": [
            {"role": "user", "content": "plain"},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "look"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                {"type": "input_file", "file_id": "file-1"}
            ]},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{\"x\":1}"},
            {"type": "function_call_output", "call_id": "c", "output": "42"}
        ], "max_output_tokens": 10});
        let r = parse(&body).unwrap();
        assert_eq!(r.text, "plain\nlook\n{\"x\":1}\n42");
        assert_eq!(
            r.prompt_reserve,
            body.to_string().len() as u64 + 2 * IMAGE_TOKENS
        );
    }

    #[test]
    fn logprobs_are_asked_by_include_or_top_logprobs_and_can_be_stripped() {
        let mut r = parse(&json!({"input": "x", "max_output_tokens": 8, "include": [LOGPROBS, "reasoning.encrypted_content"], "top_logprobs": 5})).unwrap();
        assert!(r.logprobs);
        assert_eq!((r.top_logprobs, r.ask().logprob_tokens), (5, 8));
        r.strip_information();
        let sent: Value = serde_json::from_slice(&r.body(bytes::Bytes::new())).unwrap();
        assert_eq!(sent["include"], json!(["reasoning.encrypted_content"]));
        assert!(sent.get("top_logprobs").is_none());
        assert_eq!(r.ask().logprob_tokens, 0);
        // top_logprobs alone counts as asking.
        assert!(
            parse(&json!({"input": "x", "top_logprobs": 1}))
                .unwrap()
                .logprobs
        );
    }

    #[test]
    fn what_the_responses_api_does_not_define_is_refused() {
        for body in [
            json!({"input": "x", "max_tokens": 10}),
            json!({"input": "x", "logit_bias": {"1": 5}}),
            json!({"input": "x", "logprobs": true}),
            json!({"input": "x", "n": 2}),
            json!({"input": "x", "background": true}),
            json!({"input": "x", "include": ["everything"]}),
            json!({"input": "x", "include": "message.output_text.logprobs"}),
            json!({"input": 5}),
            json!({"input": ["x"]}),
            json!({"input": "x", "instructions": ["x"]}),
            json!({"input": "x", "max_output_tokens": -1}),
            json!({"input": "x", "stream": "yes"}),
        ] {
            assert!(parse(&body).is_err(), "{body}");
        }
    }
}
