//! A fake model server (OpenAI-compatible chat, completions, embeddings,
//! the Responses API, plain and streamed, and predict endpoints in KServe
//! v1, Open Inference (`/infer`, `/classify`) and a custom shape (`/score`))
//! that records what it received, and a
//! client that POSTs JSON over mTLS and reads any HTTP/1.1 answer
//! (content-length, chunked, or close-delimited).

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use super::{ClientCert, mtls_connect, read_request};

/// Prompt tokens the fake model reports for every request.
pub const PROMPT_TOKENS: u64 = 10;

/// How the fake model behaves.
#[derive(Debug, Clone, Copy)]
pub struct ModelBehaviour {
    /// Tokens it generates when `max_tokens` allows.
    pub generate: u64,
    /// Generate `generate` tokens whatever `max_tokens` says.
    pub ignore_max_tokens: bool,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Label JSON answers `Content-Encoding: gzip` (as an app with
    /// compression middleware would).
    pub gzip: bool,
}

impl Default for ModelBehaviour {
    fn default() -> Self {
        Self {
            generate: 5,
            ignore_max_tokens: false,
            delay: Duration::ZERO,
            gzip: false,
        }
    }
}

/// The fake model server.
pub struct ModelApp {
    pub addr: SocketAddr,
    /// Every request body received, in order.
    pub received: Arc<Mutex<Vec<Value>>>,
}

impl ModelApp {
    pub fn start(b: ModelBehaviour) -> ModelApp {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let rec = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let rec = rec.clone();
                std::thread::spawn(move || serve(stream, b, rec));
            }
        });
        ModelApp { addr, received }
    }

    pub fn last(&self) -> Value {
        self.received
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or(Value::Null)
    }
}

fn serve(stream: TcpStream, b: ModelBehaviour, rec: Arc<Mutex<Vec<Value>>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let Some((head, body)) = read_request(&mut reader) else {
            return;
        };
        let path = head[0].split_whitespace().nth(1).unwrap_or("").to_owned();
        let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        rec.lock().unwrap().push(req.clone());
        std::thread::sleep(b.delay);
        let responses = path.ends_with("/responses");
        let max = if responses {
            req["max_output_tokens"].as_u64()
        } else {
            req["max_tokens"].as_u64()
        }
        .unwrap_or(u64::MAX);
        let n = if b.ignore_max_tokens {
            b.generate
        } else {
            b.generate.min(max)
        };
        if responses {
            let stream = req["stream"] == json!(true);
            let (head, body) = response_answer(&req, n, n < b.generate, stream);
            if stream {
                let _ = out.write_all(head.as_bytes());
                for piece in body.as_bytes().chunks(37) {
                    if out.write_all(piece).is_err() {
                        return;
                    }
                    let _ = out.flush();
                }
                return;
            }
            if out.write_all(format!("{head}{body}").as_bytes()).is_err() {
                return;
            }
            continue;
        }
        if req["stream"] == json!(true) {
            let mut events = String::new();
            for i in 0..n {
                let mut choice = json!({"index": 0, "delta": {"content": format!("t{i} ")}});
                if req["logprobs"] == json!(true) {
                    choice["logprobs"] = json!({"content": [{"token": "t", "logprob": -0.1}]});
                }
                events.push_str(&format!("data: {}\n\n", json!({"choices": [choice]})));
            }
            if req["stream_options"]["include_usage"] == json!(true) {
                let usage = json!({"choices": [], "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n}});
                events.push_str(&format!("data: {usage}\n\n"));
            }
            events.push_str("data: [DONE]\n\n");
            let head =
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
            let _ = out.write_all(head.as_bytes());
            // In pieces, so events arrive split across reads.
            for piece in events.as_bytes().chunks(37) {
                if out.write_all(piece).is_err() {
                    return;
                }
                let _ = out.flush();
            }
            return;
        }
        let answer = if path.ends_with("/embeddings") {
            let texts: Vec<String> = match &req["input"] {
                Value::Array(a) => a
                    .iter()
                    .map(|t| t.as_str().unwrap_or("").to_string())
                    .collect(),
                t => vec![t.as_str().unwrap_or("").to_string()],
            };
            let inputs = texts.len();
            let base64 = req["encoding_format"] == "base64";
            let data: Vec<Value> = texts
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let e = embedding(t);
                    let e = if base64 {
                        use base64::Engine as _;
                        let bytes: Vec<u8> = e.iter().flat_map(|x| x.to_le_bytes()).collect();
                        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                    } else {
                        json!(e)
                    };
                    json!({"object": "embedding", "index": i, "embedding": e})
                })
                .collect();
            json!({"data": data, "usage": {"prompt_tokens": 5 * inputs, "total_tokens": 5 * inputs}})
        } else if path.ends_with("/infer") {
            // Open Inference Protocol: one FP32 tensor of probabilities per row.
            let t = &req["inputs"][0];
            let width = t["shape"]
                .as_array()
                .and_then(|s| s.last())
                .and_then(Value::as_u64)
                .unwrap_or(1) as usize;
            let flat: Vec<Value> = t["data"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|v| v.as_array().cloned().unwrap_or_else(|| vec![v.clone()]))
                .collect();
            let rows: Vec<Value> = flat
                .chunks(width.max(1))
                .map(|r| predict(&json!(r)))
                .collect();
            let data: Vec<Value> = rows
                .iter()
                .flat_map(|r| r.as_array().cloned().unwrap_or_default())
                .collect();
            json!({"model_name": "m", "id": req["id"], "outputs": [
                {"name": "probs", "shape": [rows.len(), 3], "datatype": "FP32", "data": data}
            ]})
        } else if path.ends_with("/classify") {
            // Triton's classification extension: scores inside strings.
            json!({"outputs": [{"name": "c", "shape": [1], "datatype": "BYTES", "data": ["0.9:1:b"]}]})
        } else if path.ends_with("/score") {
            let rows: Vec<Value> = req["data"]["features"]
                .as_array()
                .map(|a| a.iter().map(predict).collect())
                .unwrap_or_default();
            json!({"result": {"scores": rows}})
        } else if path.ends_with("/predict") {
            let preds: Vec<Value> = req["instances"]
                .as_array()
                .map(|a| a.iter().map(predict).collect())
                .unwrap_or_default();
            json!({"predictions": preds})
        } else {
            let mut choice = json!({"index": 0, "message": {"role": "assistant", "content": "t ".repeat(n as usize)}, "finish_reason": "stop"});
            if req["logprobs"] == json!(true) {
                let lp: Vec<Value> = (0..n)
                    .map(|_| json!({"token": "t", "logprob": -0.1}))
                    .collect();
                choice["logprobs"] = json!({"content": lp});
            }
            json!({"choices": [choice], "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n}})
        };
        let text = answer.to_string();
        let encoding = if b.gzip {
            "Content-Encoding: gzip\r\n"
        } else {
            ""
        };
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{encoding}Content-Length: {}\r\n\r\n{text}",
            text.len()
        );
        if out.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// A Responses API answer of `n` generated tokens (`cut`: stopped at
/// `max_output_tokens`): the response head and body, a JSON response or
/// its event stream ending in `response.completed` or `response.incomplete`.
fn response_answer(req: &Value, n: u64, cut: bool, stream: bool) -> (String, String) {
    let logprobs = req["include"]
        .as_array()
        .is_some_and(|a| a.contains(&json!("message.output_text.logprobs")));
    let lp = |k: u64| -> Vec<Value> {
        (0..k)
            .map(|_| json!({"token": "t", "logprob": -0.1, "bytes": [116], "top_logprobs": []}))
            .collect()
    };
    let mut part =
        json!({"type": "output_text", "text": "t ".repeat(n as usize), "annotations": []});
    if logprobs {
        part["logprobs"] = json!(lp(n));
    }
    let (status, terminal) = if cut {
        ("incomplete", "response.incomplete")
    } else {
        ("completed", "response.completed")
    };
    let item = json!({"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "content": [part]});
    let mut response = json!({
        "id": "resp_1", "object": "response", "created_at": 1, "model": req["model"],
        "status": status, "output": [item],
        "usage": {"input_tokens": PROMPT_TOKENS, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": n, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": PROMPT_TOKENS + n},
    });
    if cut {
        response["incomplete_details"] = json!({"reason": "max_output_tokens"});
    }
    if !stream {
        let text = response.to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            text.len()
        );
        return (head, text);
    }
    let mut started = response.clone();
    started["status"] = json!("in_progress");
    started["output"] = json!([]);
    started["usage"] = Value::Null;
    let mut events = vec![
        json!({"type": "response.created", "response": started}),
        json!({"type": "response.output_item.added", "output_index": 0, "item": {"type": "message", "id": "msg_1", "role": "assistant", "status": "in_progress", "content": []}}),
        json!({"type": "response.content_part.added", "item_id": "msg_1", "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}),
    ];
    for i in 0..n {
        let mut delta = json!({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": format!("t{i} ")});
        if logprobs {
            delta["logprobs"] = json!(lp(1));
        }
        events.push(delta);
    }
    events.push(json!({"type": "response.output_text.done", "item_id": "msg_1", "output_index": 0, "content_index": 0, "text": "t ".repeat(n as usize)}));
    events.push(json!({"type": "response.output_item.done", "output_index": 0, "item": item}));
    events.push(json!({"type": terminal, "response": response}));
    let mut body = String::new();
    for (seq, mut e) in events.into_iter().enumerate() {
        e["sequence_number"] = json!(seq);
        body.push_str(&format!(
            "event: {}\ndata: {e}\n\n",
            e["type"].as_str().unwrap()
        ));
    }
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
    (head.to_owned(), body)
}

/// A 3-class linear model with softmax probabilities.
fn predict(x: &Value) -> Value {
    let x: Vec<f64> = x
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let s: f64 = x.iter().sum();
    let z = [s, -s, 0.3];
    let m = z.iter().cloned().fold(f64::MIN, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let t: f64 = e.iter().sum();
    json!(e.iter().map(|v| v / t).collect::<Vec<_>>())
}

/// An HTTP/1.1 answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// POSTs `body` to `path` on a fresh mTLS connection and reads the answer.
pub fn post(
    addr: SocketAddr,
    bundle: &str,
    client: ClientCert<'_>,
    path: &str,
    body: &str,
) -> Answer {
    let mut tls = mtls_connect(addr, bundle, client, &[b"http/1.1"]).unwrap();
    write!(
        tls,
        "POST {path} HTTP/1.1\r\nHost: model.test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    tls.flush().unwrap();
    read_answer(&mut tls)
}

fn read_answer<S: Read>(stream: &mut S) -> Answer {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) if !raw.is_empty() && e.kind() == std::io::ErrorKind::ConnectionAborted => break,
            Err(e) => panic!("reading the answer: {e} (got {} bytes)", raw.len()),
        }
    }
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    let (status, headers) = parse_head(&raw[..end]);
    let rest = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    }
}

/// A response head: the status and the headers (names lower-cased).
fn parse_head(head: &[u8]) -> (u16, Vec<(String, String)>) {
    let head = String::from_utf8_lossy(head);
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers)
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = eol + 2;
        out.extend_from_slice(&rest[start..(start + size).min(rest.len())]);
        rest = &rest[(start + size + 2).min(rest.len())..];
    }
}

/// A kept-alive mTLS HTTP/1.1 connection (for many requests in a row).
pub struct Session {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl Session {
    pub fn open(addr: SocketAddr, bundle: &str, client: ClientCert<'_>) -> Session {
        Session {
            tls: mtls_connect(addr, bundle, client, &[b"http/1.1"]).unwrap(),
        }
    }

    /// POSTs `body`; the answer must have a Content-Length.
    pub fn post(&mut self, path: &str, body: &str) -> Answer {
        self.post_with(path, body, "")
    }

    /// POSTs `body` with `extra` header lines (each ending in CRLF).
    pub fn post_with(&mut self, path: &str, body: &str, extra: &str) -> Answer {
        write!(
            self.tls,
            "POST {path} HTTP/1.1\r\nHost: model.test\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        self.tls.flush().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(self.tls.read(&mut byte).unwrap(), 1, "connection closed");
            head.push(byte[0]);
        }
        let (status, headers) = parse_head(&head);
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .expect("a content-length");
        let mut body = vec![0u8; len];
        self.tls.read_exact(&mut body).unwrap();
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).to_string(),
        }
    }
}

/// The fake model's embedding of `text`: a hashed bag of its words in 16
/// values, unit length, so that texts about the same words land together.
pub fn embedding(text: &str) -> Vec<f32> {
    let mut v = [0f32; 16];
    for w in text.split_whitespace() {
        let h = w.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        v[(h % 16) as usize] += if h >> 63 == 1 { 1.0 } else { -1.0 };
    }
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    v.iter().map(|x| x / n).collect()
}
