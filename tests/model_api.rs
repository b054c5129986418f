//! Model API protection through the real binary: rate limits with the
//! draft RateLimit headers, token budgets that concurrent requests cannot
//! overshoot, streams charged what they streamed and cut at their
//! reservation, information caps, aggregate limits, shadow mode.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::model::{ModelApp, ModelBehaviour, PROMPT_TOKENS, Session, post};
use common::redis::RedisServer;
use common::*;
use serde_json::json;

struct Bench {
    ca: Ca,
    app: ModelApp,
    proxy: Proxy,
}

impl Bench {
    /// A sidecar in front of a fake model with `routes` under `model_api:`.
    fn start(b: ModelBehaviour, routes: &str) -> Bench {
        Self::start_with(b, routes, "")
    }

    /// The sidecar's config.
    fn config(ca: &Ca, app: &ModelApp, routes: &str, top: &str) -> String {
        let own = Creds {
            dir: ca.issue(&ca.id("/ns/ml/sa/model"), None),
        };
        format!(
            "{}{top}admin: 127.0.0.1:0\ninbound:\n  - name: models\n    listen: 127.0.0.1:0\n    app: {}\n    policy:\n      rules:\n        - name: callers\n          action: allow\n          from: [spiffe://example.org/*]\n    model_api:\n{routes}",
            own.identity_yaml(),
            app.addr
        )
    }

    /// As `start`, with `top` added at the top level of the config.
    fn start_with(b: ModelBehaviour, routes: &str, top: &str) -> Bench {
        let ca = Ca::init("example.org");
        let app = ModelApp::start(b);
        let proxy = Proxy::start(ca.tmp.path(), &Self::config(&ca, &app, routes, top));
        Bench { ca, app, proxy }
    }

    /// A keep-alive mTLS session of `who` with the models listener.
    fn session(&self, who: &Creds) -> Session {
        let (chain, key) = (who.chain(), who.key());
        Session::open(
            self.proxy.addr("models"),
            &who.bundle(),
            Some((&chain, &key)),
        )
    }

    fn caller(&self, path: &str) -> Creds {
        Creds {
            dir: self.ca.issue(&self.ca.id(path), None),
        }
    }

    fn post(&self, who: &Creds, path: &str, body: &str) -> common::model::Answer {
        self.post_to(&self.proxy, who, path, body)
    }

    fn post_to(&self, proxy: &Proxy, who: &Creds, path: &str, body: &str) -> common::model::Answer {
        let (chain, key) = (who.chain(), who.key());
        post(
            proxy.addr("models"),
            &who.bundle(),
            Some((&chain, &key)),
            path,
            body,
        )
    }

    fn metric(&self, prefix: &str) -> f64 {
        self.proxy.metric(prefix)
    }
}

const CHAT: &str = "/v1/chat/completions";

fn chat(max_tokens: u64) -> String {
    json!({"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens}).to_string()
}

#[test]
fn over_the_rate_a_429_carries_ratelimit_headers_retry_after_and_a_problem() {
    let b = Bench::start(
        ModelBehaviour::default(),
        "      - name: chat\n        paths: [/v1/*]\n        api: openai\n        limits:\n          identity:\n            requests_per_second: 0.2\n            burst: 2\n",
    );
    let web = b.caller("/ns/shop/sa/web");
    let first = b.post(&web, CHAT, &chat(10));
    assert_eq!(first.status, 200, "{first:?}");
    // The policy itself comes with refusals; every answer says what is left.
    assert_eq!(first.header("ratelimit-policy"), None);
    assert_eq!(
        first.header("ratelimit"),
        Some("\"identity-requests\";r=1;t=5")
    );
    assert_eq!(b.post(&web, CHAT, &chat(10)).status, 200);
    let refused = b.post(&web, CHAT, &chat(10));
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json")
    );
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=5).contains(&retry), "retry-after {retry}");
    assert_eq!(
        refused.header("ratelimit"),
        Some(format!("\"identity-requests\";r=0;t={retry}").as_str())
    );
    let p = refused.json();
    assert!(
        p["type"].as_str().unwrap().ends_with(":quota-exceeded"),
        "{p}"
    );
    assert_eq!(p["status"], 429);
    // The refused request never reached the model; another caller has its own bucket.
    assert_eq!(b.app.received.lock().unwrap().len(), 2);
    assert_eq!(
        b.post(&b.caller("/ns/shop/sa/batch"), CHAT, &chat(10))
            .status,
        200
    );
    assert_eq!(
        b.metric("warden_model_decisions_total{listener=\"models\",result=\"quota_exceeded\",route=\"chat\"}"),
        1.0
    );
    assert_eq!(
        b.metric("warden_model_quota_refusals_total{listener=\"models\",quota=\"identity-requests\",route=\"chat\"}"),
        1.0
    );
    // Counted with every other refusal of the listener too.
    assert_eq!(
        b.metric("warden_proxy_rejected_requests_total{direction=\"inbound\",listener=\"models\",reason=\"model\"}"),
        1.0
    );
}

#[test]
fn sixty_four_concurrent_requests_never_overshoot_a_token_budget() {
    const BUDGET: u64 = 3000;
    let b = Bench::start(
        ModelBehaviour {
            generate: 50,
            delay: Duration::from_millis(700),
            ..ModelBehaviour::default()
        },
        &format!(
            "      - name: chat\n        paths: [/v1/*]\n        api: openai\n        limits:\n          identity:\n            tokens_per_minute: {BUDGET}\n"
        ),
    );
    let web = b.caller("/ns/shop/sa/web");
    let body = chat(100);
    let reservation = body.len() as u64 + 100;
    let results: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|_| s.spawn(|| b.post(&web, CHAT, &body).status))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = results.iter().filter(|s| **s == 200).count() as u64;
    let refused = results.iter().filter(|s| **s == 429).count() as u64;
    assert_eq!(ok + refused, 64, "{results:?}");
    assert!(ok >= 1 && refused >= 1, "ok {ok} refused {refused}");
    assert!(
        ok * reservation <= BUDGET,
        "{ok} admitted x {reservation} reserved > {BUDGET}"
    );
    // Settled at what the model reported: prompt + completion per request.
    let charged =
        b.metric("warden_model_charged_total{listener=\"models\",route=\"chat\",unit=\"tokens\"}");
    assert_eq!(charged as u64, ok * (PROMPT_TOKENS + 50));
    assert!(charged as u64 <= BUDGET);
    assert_eq!(
        b.metric("warden_model_reservations_outstanding{listener=\"models\",route=\"chat\"}"),
        0.0
    );
    // The refunds are usable: with nothing in flight, a new request fits again.
    assert_eq!(b.post(&web, CHAT, &body).status, 200);
}

#[test]
fn a_stream_is_charged_what_it_streamed_and_cut_cleanly_at_its_reservation() {
    let b = Bench::start(
        ModelBehaviour {
            generate: 12,
            ..ModelBehaviour::default()
        },
        "      - name: chat\n        paths: [/v1/*]\n        api: openai\n        default_max_tokens: 64\n        limits:\n          identity:\n            tokens_per_day: 100000\n",
    );
    let web = b.caller("/ns/shop/sa/web");
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}).to_string();
    let a = b.post(&web, CHAT, &body);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("content-type"), Some("text/event-stream"));
    let deltas = a.body.matches("\"delta\"").count();
    assert_eq!(deltas, 12);
    assert!(a.body.ends_with("data: [DONE]\n\n"), "{}", a.body);
    // warden asked for usage on the caller's behalf and kept it from the caller.
    let sent = b.app.last();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(sent["max_tokens"], 64);
    assert!(!a.body.contains("\"usage\""), "{}", a.body);
    let tokens = "warden_model_charged_total{listener=\"models\",route=\"chat\",unit=\"tokens\"}";
    assert_eq!(b.metric(tokens) as u64, PROMPT_TOKENS + 12);

    // A caller that asks for usage gets it.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"include_usage": true}}).to_string();
    assert!(b.post(&web, CHAT, &body).body.contains("\"usage\""));
    assert_eq!(b.metric(tokens) as u64, 2 * (PROMPT_TOKENS + 12));
}

#[test]
fn a_model_that_ignores_max_tokens_has_its_stream_cut_with_an_error_event() {
    let b = Bench::start(
        ModelBehaviour {
            generate: 40,
            ignore_max_tokens: true,
            ..ModelBehaviour::default()
        },
        "      - name: chat\n        paths: [/v1/*]\n        api: openai\n        limits:\n          identity:\n            tokens_per_minute: 100000\n",
    );
    let web = b.caller("/ns/shop/sa/web");
    let body =
        json!({"messages": [{"role": "user", "content": "hi"}], "stream": true, "max_tokens": 10})
            .to_string();
    let a = b.post(&web, CHAT, &body);
    assert_eq!(a.status, 200);
    assert_eq!(a.body.matches("\"delta\"").count(), 10, "{}", a.body);
    assert!(
        a.body.contains("event: error\ndata: {\"error\""),
        "{}",
        a.body
    );
    assert!(a.body.ends_with("data: [DONE]\n\n"));
    assert_eq!(
        b.metric("warden_model_streams_cut_total{listener=\"models\",route=\"chat\"}"),
        1.0
    );
    // Charged what was delivered: the prompt bound (no usage arrived) plus 10.
    let charged = b
        .metric("warden_model_charged_total{listener=\"models\",route=\"chat\",unit=\"tokens\"}")
        as u64;
    assert_eq!(charged, body.len() as u64 + 10);
}

const RESPONSES: &str = "/v1/responses";

#[test]
fn a_responses_api_request_is_reserved_and_settled_from_its_usage() {
    let b = Bench::start(
        ModelBehaviour::default(),
        "      - name: llm\n        paths: [/v1/*]\n        api: openai\n        default_max_tokens: 32\n        limits:\n          identity:\n            tokens_per_minute: 100000\n            max_top_logprobs: 2\n",
    );
    let web = b.caller("/ns/shop/sa/web");
    let body = json!({"model": "m", "instructions": "be brief", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hello"}]}
    ]})
    .to_string();
    let a = b.post(&web, RESPONSES, &body);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.json()["usage"]["output_tokens"], 5);
    assert!(a.header("ratelimit").is_some());
    // warden set the reservation's length on the forwarded request.
    assert_eq!(b.app.last()["max_output_tokens"], 32);
    let tokens = "warden_model_charged_total{listener=\"models\",route=\"llm\",unit=\"tokens\"}";
    assert_eq!(b.metric(tokens) as u64, PROMPT_TOKENS + 5);
    // Information caps apply as for chat; fields of other APIs are refused.
    let a = b.post(
        &web,
        RESPONSES,
        &json!({"input": "hi", "top_logprobs": 5, "include": ["message.output_text.logprobs"]})
            .to_string(),
    );
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.json()["type"]
            .as_str()
            .unwrap()
            .ends_with(":information-limit")
    );
    let a = b.post(
        &web,
        RESPONSES,
        &json!({"input": "hi", "max_tokens": 5}).to_string(),
    );
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.json()["type"]
            .as_str()
            .unwrap()
            .ends_with(":bad-model-request")
    );
    assert_eq!(b.app.received.lock().unwrap().len(), 1);
}

#[test]
fn a_responses_api_stream_is_metered_from_its_completed_event() {
    let b = Bench::start(
        ModelBehaviour {
            generate: 12,
            ..ModelBehaviour::default()
        },
        "      - name: llm\n        paths: [/v1/*]\n        api: openai\n        default_max_tokens: 64\n        limits:\n          identity:\n            tokens_per_day: 100000\n",
    );
    let web = b.caller("/ns/shop/sa/web");
    let body = json!({"model": "m", "input": "hi", "stream": true}).to_string();
    let a = b.post(&web, RESPONSES, &body);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("content-type"), Some("text/event-stream"));
    assert_eq!(
        a.body.matches("event: response.output_text.delta").count(),
        12
    );
    // Delivered as the model sent it, to its terminal event.
    assert!(
        a.body.contains("event: response.completed\ndata: "),
        "{}",
        a.body
    );
    assert_eq!(b.app.last()["max_output_tokens"], 64);
    let tokens = "warden_model_charged_total{listener=\"models\",route=\"llm\",unit=\"tokens\"}";
    assert_eq!(b.metric(tokens) as u64, PROMPT_TOKENS + 12);
    // Stopped by max_output_tokens: settled from `response.incomplete`.
    let body = json!({"input": "hi", "stream": true, "max_output_tokens": 4}).to_string();
    let a = b.post(&web, RESPONSES, &body);
    assert!(
        a.body.contains("event: response.incomplete\n"),
        "{}",
        a.body
    );
    assert_eq!(b.metric(tokens) as u64, 2 * PROMPT_TOKENS + 12 + 4);
    assert_eq!(
        b.metric("warden_model_reservations_outstanding{listener=\"models\",route=\"llm\"}"),
        0.0
    );
}

#[test]
fn a_responses_api_stream_past_its_reservation_is_cut_with_the_apis_error_event() {
    let b = Bench::start(
        ModelBehaviour {
            generate: 40,
            ignore_max_tokens: true,
            ..ModelBehaviour::default()
        },
        "      - name: llm\n        paths: [/v1/*]\n        api: openai\n        limits:\n          identity:\n            tokens_per_minute: 100000\n",
    );
    let web = b.caller("/ns/shop/sa/web");
    let body = json!({"input": "hi", "stream": true, "max_output_tokens": 10}).to_string();
    let a = b.post(&web, RESPONSES, &body);
    assert_eq!(a.status, 200);
    assert_eq!(
        a.body.matches("event: response.output_text.delta").count(),
        10,
        "{}",
        a.body
    );
    assert!(!a.body.contains("response.completed") && !a.body.contains("[DONE]"));
    let last = a.body.trim_end().rsplit("\n\n").next().unwrap();
    let event: serde_json::Value =
        serde_json::from_str(last.strip_prefix("event: error\ndata: ").expect(last)).unwrap();
    assert_eq!(event["type"], "error");
    assert_eq!(event["code"], "stream_budget_exhausted");
    // created, item added, part added, 10 deltas: the error is number 13.
    assert_eq!(event["sequence_number"], 13);
    assert_eq!(
        b.metric("warden_model_streams_cut_total{listener=\"models\",route=\"llm\"}"),
        1.0
    );
    // Charged the prompt bound (no usage arrived) and the whole reservation.
    let charged = b
        .metric("warden_model_charged_total{listener=\"models\",route=\"llm\",unit=\"tokens\"}")
        as u64;
    assert_eq!(charged, body.len() as u64 + 10);
}

#[test]
fn requests_get_a_max_tokens_and_information_caps_are_enforced() {
    let b = Bench::start(
        ModelBehaviour::default(),
        "      - name: chat\n        paths: [/v1/*]\n        api: openai\n        default_max_tokens: 32\n        limits:\n          identity:\n            max_top_logprobs: 5\n            max_logit_bias: 2\n            logprob_tokens_per_day: 8\n",
    );
    let web = b.caller("/ns/shop/sa/web");
    let plain = json!({"messages": [{"role": "user", "content": "hi"}]}).to_string();
    assert_eq!(b.post(&web, CHAT, &plain).status, 200);
    assert_eq!(b.app.last()["max_tokens"], 32);

    let too_many = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": true, "top_logprobs": 20}).to_string();
    let a = b.post(&web, CHAT, &too_many);
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.json()["type"]
            .as_str()
            .unwrap()
            .ends_with(":information-limit")
    );
    let bias = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logit_bias": {"1": 5, "2": 5, "3": 5}}).to_string();
    assert_eq!(b.post(&web, CHAT, &bias).status, 400);

    // Logprob tokens are metered: 8 per day, 4 per request.
    let ok = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": true, "top_logprobs": 5}).to_string();
    assert_eq!(b.post(&web, CHAT, &ok).status, 200);
    assert_eq!(b.post(&web, CHAT, &ok).status, 200);
    let a = b.post(&web, CHAT, &ok);
    assert_eq!(a.status, 429, "{a:?}");
    assert_eq!(
        a.header("ratelimit"),
        Some(
            format!(
                "\"identity-logprob-tokens-per-day\";r=0;t={}",
                a.header("retry-after").unwrap()
            )
            .as_str()
        )
    );
    assert_eq!(
        b.metric(
            "warden_model_charged_total{listener=\"models\",route=\"chat\",unit=\"logprob_tokens\"}"
        ),
        8.0
    );
}

#[test]
fn a_namespace_limit_binds_many_identities_together() {
    let b = Bench::start(
        ModelBehaviour::default(),
        "      - name: embed\n        paths: [/v1/embeddings]\n        api: openai\n        limits:\n          identity:\n            vectors_per_day: 100\n          namespace:\n            vectors_per_day: 5\n",
    );
    let body = json!({"model": "e", "input": ["a", "b", "c"]}).to_string();
    let a = b.caller("/ns/shop/sa/a");
    let c = b.caller("/ns/shop/sa/c");
    let other = b.caller("/ns/bank/sa/a");
    assert_eq!(b.post(&a, "/v1/embeddings", &body).status, 200);
    // 3 of the namespace's 5 are used: 3 more do not fit, for any identity in it.
    let refused = b.post(&c, "/v1/embeddings", &body);
    assert_eq!(refused.status, 429);
    assert!(
        refused
            .header("ratelimit")
            .unwrap()
            .starts_with("\"namespace-vectors-per-day\"")
    );
    assert_eq!(b.post(&other, "/v1/embeddings", &body).status, 200);
}

#[test]
fn limits_are_proposed_from_a_shadow_recording_of_real_traffic() {
    let ca_tmp = tempfile::tempdir().unwrap();
    let file = ca_tmp.path().join("chat-usage.json");
    let b = Bench::start(
        ModelBehaviour::default(),
        &format!(
            "      - name: chat\n        paths: [/v1/*]\n        api: openai\n        mode: shadow\n        record: {}\n        limits:\n          identity:\n            tokens_per_minute: 10\n",
            file.display()
        ),
    );
    let (heavy, light) = (b.caller("/ns/ml/sa/trainer"), b.caller("/ns/web/sa/front"));
    for _ in 0..6 {
        assert_eq!(
            b.post(&heavy, CHAT, &chat(20)).status,
            200,
            "shadow mode lets it through"
        );
    }
    assert_eq!(b.post(&light, CHAT, &chat(5)).status, 200);
    let Bench { mut proxy, .. } = b;
    proxy.signal("TERM");
    let exit = proxy.wait_exit(Duration::from_secs(15));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    // Written at the end (and every minute while it runs).
    let out = run_ok(&[
        "limits",
        "--record",
        file.to_str().unwrap(),
        "--headroom",
        "3",
    ]);
    assert!(
        out.contains("# route chat: 2 callers, 2 namespaces over 1 days; 3x the heaviest"),
        "{out}"
    );
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("tokens_per_day:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("spiffe://example.org/ns/ml/sa/trainer"),
        "{out}"
    );
    // Three times the trainer's settled tokens (each answer reports its usage).
    let used: u64 = line
        .split("# 3x ")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let proposed: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(proposed, used * 3, "{out}");
    assert!(
        used > 0 && used.is_multiple_of(6),
        "six equal requests: {out}"
    );
    // A file that is not a recording is refused with a reason.
    let bad = ca_tmp.path().join("x.json");
    std::fs::write(&bad, "{}").unwrap();
    let out = run(&["limits", "--record", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a usage recording"));
}

#[test]
fn shadow_mode_counts_what_it_would_refuse_and_lets_it_through() {
    let b = Bench::start(
        ModelBehaviour::default(),
        "      - name: chat\n        paths: [/v1/*]\n        api: openai\n        mode: shadow\n        limits:\n          identity:\n            requests_per_second: 0.1\n            burst: 1\n",
    );
    let web = b.caller("/ns/shop/sa/web");
    for _ in 0..3 {
        assert_eq!(b.post(&web, CHAT, &chat(5)).status, 200);
    }
    assert_eq!(
        b.metric("warden_model_decisions_total{listener=\"models\",result=\"shadow_quota_exceeded\",route=\"chat\"}"),
        2.0
    );
    assert_eq!(b.app.received.lock().unwrap().len(), 3);
}

#[test]
fn bodies_are_bounded_and_must_be_what_the_api_says() {
    let b = Bench::start(
        ModelBehaviour::default(),
        "      - name: chat\n        paths: [/v1/*]\n        api: openai\n        max_body_bytes: 1024\n",
    );
    let web = b.caller("/ns/shop/sa/web");
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(2000)}]}).to_string();
    assert_eq!(b.post(&web, CHAT, &big).status, 413);
    let a = b.post(&web, CHAT, "{not json");
    assert_eq!(a.status, 400);
    assert!(
        a.json()["type"]
            .as_str()
            .unwrap()
            .ends_with(":bad-model-request")
    );
    assert!(b.app.received.lock().unwrap().is_empty());
    // Paths outside the route are not metered or parsed.
    assert_eq!(b.post(&web, "/healthz", "not json").status, 200);
}

#[test]
fn check_names_the_line_and_column_of_a_bad_model_route() {
    let ca = Ca::init("example.org");
    let own = Creds {
        dir: ca.issue(&ca.id("/ns/ml/sa/model"), None),
    };
    let config = format!(
        "{}admin: 127.0.0.1:0\ninbound:\n  - name: models\n    listen: 127.0.0.1:0\n    app: 127.0.0.1:9\n    model_api:\n      - name: p\n        paths: [/predict]\n        api: predict\n        limits:\n          identity:\n            tokens_per_minute: 10\n        detection:\n          ladder: {{warn: 0.9, degrade: 0.5, refuse: 0.95, deny: 1.0}}\n",
        own.identity_yaml()
    );
    let path = ca.tmp.path().join("bad.yaml");
    std::fs::write(&path, config).unwrap();
    let out = run(&["check", "--config", s(&path)]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml:16:13: tokens_per_minute only applies to api: openai"),
        "{err}"
    );
    assert!(
        err.contains("bad.yaml:18:19: ladder scores must be"),
        "{err}"
    );
}

#[test]
fn two_proxies_share_one_token_budget_through_redis() {
    const BUDGET: u64 = 3000;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let routes = format!(
        "      - name: chat\n        paths: [/v1/*]\n        api: openai\n        limits:\n          identity:\n            tokens_per_minute: {BUDGET}\n"
    );
    let top = format!("redis: {}\n", redis.url());
    let b = Bench::start_with(
        ModelBehaviour {
            generate: 50,
            delay: Duration::from_millis(700),
            ..ModelBehaviour::default()
        },
        &routes,
        &top,
    );
    let second = Proxy::start(
        b.ca.tmp.path(),
        &Bench::config(&b.ca, &b.app, &routes, &top),
    );
    let web = b.caller("/ns/shop/sa/web");
    let body = chat(100);
    let reservation = body.len() as u64 + 100;
    let results: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let (b, web, body, second) = (&b, &web, &body, &second);
                s.spawn(move || {
                    let proxy = if i % 2 == 0 { &b.proxy } else { second };
                    b.post_to(proxy, web, CHAT, body).status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = results.iter().filter(|s| **s == 200).count() as u64;
    let refused = results.iter().filter(|s| **s == 429).count() as u64;
    assert_eq!(ok + refused, 64, "{results:?}");
    assert!(ok >= 1 && refused >= 1, "ok {ok} refused {refused}");
    // Each proxy saw 32 attempts, more than the budget's share: with a budget
    // each, about twice as many would have been admitted.
    assert!(
        ok * reservation <= BUDGET,
        "{ok} x {reservation} > {BUDGET}"
    );
    assert!(32 * reservation > BUDGET);
    let tokens = "warden_model_charged_total{listener=\"models\",route=\"chat\",unit=\"tokens\"}";
    let charged = b.proxy.metric(tokens) + second.metric(tokens);
    assert_eq!(charged as u64, ok * (PROMPT_TOKENS + 50));
}

#[test]
fn without_redis_a_route_fails_closed_or_open_as_configured() {
    let dead = format!("redis: redis://127.0.0.1:{}\n", redis::free_port());
    let b = Bench::start_with(
        ModelBehaviour::default(),
        "      - name: strict\n        paths: [/v1/chat/*]\n        api: openai\n        limits:\n          identity:\n            tokens_per_minute: 1000\n      - name: lenient\n        paths: [/v1/*]\n        api: openai\n        on_redis_error: open\n        limits:\n          identity:\n            tokens_per_minute: 1000\n",
        &dead,
    );
    let web = b.caller("/ns/shop/sa/web");
    let a = b.post(&web, CHAT, &chat(5));
    assert_eq!(a.status, 503, "{a:?}");
    assert!(
        a.json()["type"]
            .as_str()
            .unwrap()
            .ends_with(":limit-store-unavailable")
    );
    let body = json!({"prompt": "hi", "max_tokens": 5}).to_string();
    assert_eq!(b.post(&web, "/v1/completions", &body).status, 200);
    assert_eq!(
        b.metric("warden_model_store_errors_total{listener=\"models\",outcome=\"closed\",route=\"strict\"}"),
        1.0
    );
    assert_eq!(
        b.metric("warden_model_store_errors_total{listener=\"models\",outcome=\"open\",route=\"lenient\"}"),
        1.0
    );
}

#[test]
fn requests_without_a_body_count_against_the_rate_and_pass_unparsed() {
    let b = Bench::start(
        ModelBehaviour::default(),
        "      - name: chat\n        paths: [/v1/*]\n        api: openai\n        limits:\n          identity:\n            requests_per_second: 0.1\n            burst: 1\n",
    );
    let web = b.caller("/ns/shop/sa/web");
    let (chain, key) = (web.chain(), web.key());
    let get = || {
        mtls_get(
            b.proxy.addr("models"),
            &web.bundle(),
            Some((&chain, &key)),
            "GET",
            "/v1/models",
            "",
        )
        .unwrap()
        .0
    };
    assert_eq!(get(), 200);
    assert_eq!(get(), 429);
    assert_eq!(b.app.received.lock().unwrap().len(), 1);
}

#[test]
fn what_the_limits_cannot_see_or_bound_is_refused() {
    let b = Bench::start(
        ModelBehaviour {
            generate: 40,
            ignore_max_tokens: true,
            ..ModelBehaviour::default()
        },
        "      - name: chat\n        paths: [/v1/*]\n        api: openai\n        limits:\n          identity:\n            tokens_per_minute: 5000\n",
    );
    let web = b.caller("/ns/shop/sa/web");
    let reason = |a: &common::model::Answer| a.json()["type"].as_str().unwrap_or("").to_owned();
    // A backend extension that widens what an answer reveals.
    let a = b.post(
        &web,
        CHAT,
        &json!({"messages": [], "max_tokens": 5, "prompt_logprobs": 20}).to_string(),
    );
    assert_eq!(
        (a.status, reason(&a).ends_with(":bad-model-request")),
        (400, true),
        "{a:?}"
    );
    // Endpoints the route does not know how to meter fail closed.
    for path in ["/v1/audio/speech", "/v1/responses/resp_1/cancel"] {
        let a = b.post(&web, path, &json!({"input": "hi"}).to_string());
        assert_eq!(a.status, 400, "{path}: {a:?}");
        assert!(reason(&a).ends_with(":bad-model-request"), "{a:?}");
    }
    // More than the whole quota: waiting cannot help, so no Retry-After.
    let a = b.post(&web, CHAT, &chat(100_000));
    assert_eq!(a.status, 400, "{a:?}");
    assert!(reason(&a).ends_with(":request-exceeds-quota"));
    assert!(a.header("retry-after").is_none());
    // A model that ignores max_tokens: charged what it generated, not delivered.
    let a = b.post(&web, CHAT, &chat(10));
    assert_eq!(a.status, 502, "{a:?}");
    assert!(reason(&a).ends_with(":model-exceeded-reservation"));
    assert!(b.app.received.lock().unwrap().len() == 1);
}

#[test]
fn an_answer_warden_cannot_read_is_not_delivered() {
    let b = Bench::start(
        ModelBehaviour {
            gzip: true,
            ..ModelBehaviour::default()
        },
        "      - name: chat\n        paths: [/v1/*]\n        api: openai\n        limits:\n          identity:\n            tokens_per_minute: 5000\n",
    );
    let web = b.caller("/ns/shop/sa/web");
    let a = b.post(&web, CHAT, &chat(10));
    assert_eq!(a.status, 502, "{a:?}");
    assert!(
        a.json()["type"]
            .as_str()
            .unwrap()
            .ends_with(":model-response-unreadable")
    );
    // Charged at its reservation: what it used cannot be read.
    let charged =
        b.metric("warden_model_charged_total{listener=\"models\",route=\"chat\",unit=\"tokens\"}");
    assert_eq!(charged as u64, chat(10).len() as u64 + 10);
}

#[test]
fn open_inference_and_custom_predict_apis_are_read_and_their_answers_limited() {
    let b = Bench::start(
        ModelBehaviour::default(),
        "      - name: oip\n        paths: [/v2/models/*]\n        api: predict\n        outputs: label\n        format: open_inference\n        limits:\n          identity:\n            vectors_per_day: 3\n      - name: custom\n        paths: [/custom/*]\n        api: predict\n        outputs: decimals:1\n        format: json\n        input: /data/features\n        output: /result/scores\n",
    );
    let web = b.caller("/ns/shop/sa/web");
    let infer = json!({"id": "7", "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1.0, 2.0], [-1.0, -2.0]]}]});
    let a = b.post(&web, "/v2/models/m/infer", &infer.to_string());
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.json()["outputs"],
        json!([{"name": "probs", "shape": [2], "datatype": "INT64", "data": [0, 1]}])
    );
    assert_eq!(a.json()["id"], "7");
    // Two vectors counted of three a day: a third passes, a fourth does not.
    let one =
        json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 1]}]});
    assert_eq!(
        b.post(&web, "/v2/models/m/infer", &one.to_string()).status,
        200
    );
    assert_eq!(
        b.post(&web, "/v2/models/m/infer", &one.to_string()).status,
        429
    );
    // An answer with scores in strings is not delivered.
    let other = b.caller("/ns/shop/sa/other");
    let a = b.post(&other, "/v2/models/m/classify", &one.to_string());
    assert_eq!(a.status, 502, "{a:?}");
    // A request asking for the classification extension never reaches the app.
    let ask = json!({"inputs": one["inputs"], "outputs": [{"name": "probs", "parameters": {"classification": 2}}]});
    assert_eq!(
        b.post(&other, "/v2/models/m/infer", &ask.to_string())
            .status,
        400
    );
    // The custom API: rows at /data/features, scores at /result/scores.
    let a = b.post(
        &web,
        "/custom/score",
        &json!({"data": {"features": [[0.3, 0.1]]}}).to_string(),
    );
    assert_eq!(a.status, 200, "{a:?}");
    for p in a.json()["result"]["scores"][0].as_array().unwrap() {
        let p = p.as_f64().unwrap();
        assert_eq!(
            (p * 10.0).round() / 10.0,
            p,
            "rounded to one decimal: {a:?}"
        );
    }
    assert_eq!(
        b.post(&web, "/custom/score", r#"{"features": [[1]]}"#)
            .status,
        400
    );
}

/// A uniform random query in [-4, 4]^8 from a small deterministic generator.
fn random_vector(state: &mut u64) -> Vec<f64> {
    (0..8)
        .map(|_| {
            *state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*state >> 11) as f64 / (1u64 << 53) as f64) * 8.0 - 4.0
        })
        .collect()
}

/// Three cases natural callers work on, in [-2, 2]^8.
fn cases(state: &mut u64) -> Vec<Vec<f64>> {
    (0..3)
        .map(|_| random_vector(state).iter().map(|v| v / 2.0).collect())
        .collect()
}

/// A natural query: near case `i % 3`.
fn near(cases: &[Vec<f64>], state: &mut u64, i: usize) -> Vec<f64> {
    let noise = random_vector(state);
    cases[i % 3]
        .iter()
        .zip(&noise)
        .map(|(c, n)| c + n / 16.0)
        .collect()
}

#[test]
fn with_a_reference_a_new_deployment_stops_a_scraper_from_its_first_queries() {
    // What natural looks like, given by the operator: nobody teaches it.
    let mut state = 11u64;
    let centers = cases(&mut state);
    let natural = |state: &mut u64, i: usize| near(&centers, state, i);
    let file = std::env::temp_dir().join(format!("warden-reference-{}.jsonl", std::process::id()));
    let rows: String = (0..300)
        .map(|i| format!("{}\n", json!(natural(&mut state, i))))
        .collect();
    std::fs::write(&file, rows).unwrap();
    let b = Bench::start(
        ModelBehaviour::default(),
        &format!(
            "      - name: classify\n        paths: [/v1/predict]\n        api: predict\n        input_width: 8\n        detection:\n          reference: {}\n",
            file.display()
        ),
    );
    let session = |who: &Creds| b.session(who);
    let predict =
        |s: &mut Session, x: &[f64]| s.post("/v1/predict", &json!({"instances": [x]}).to_string());
    // The first callers the route ever sees: an honest one, a scraper, and a
    // scraper that claims, in every identity header a proxy might trust, to
    // be the honest one.
    let honest_id = b.ca.id("/ns/shop/sa/forecaster");
    let honest = &mut session(&b.caller("/ns/shop/sa/forecaster"));
    let scraper = &mut session(&b.caller("/ns/batch/sa/scraper"));
    let spoofer = &mut session(&b.caller("/ns/batch/sa/spoofer"));
    let claims = format!(
        "x-forwarded-client-cert: By={honest_id};URI={honest_id}\r\nx-spiffe-id: {honest_id}\r\nx-client-identity: {honest_id}\r\n"
    );
    let mut refused_at = [None, None];
    for q in 1..=200 {
        let a = predict(honest, &natural(&mut state, q));
        assert_eq!(a.status, 200, "honest query {q}: {a:?}");
        assert!(
            a.header("warden-usage-warning").is_none(),
            "honest query {q} warned"
        );
        for (i, who) in [&mut *scraper, &mut *spoofer].into_iter().enumerate() {
            if refused_at[i].is_some() {
                continue;
            }
            let body = json!({"instances": [random_vector(&mut state)]}).to_string();
            let a = who.post_with("/v1/predict", &body, if i == 1 { &claims } else { "" });
            if a.status == 429 {
                refused_at[i] = Some(q);
            } else {
                assert_eq!(a.status, 200, "{a:?}");
            }
        }
    }
    std::fs::remove_file(&file).unwrap();
    let [plain, spoofed] = refused_at.map(|r| r.expect("a scraper was never refused"));
    assert!(plain <= 100, "refused at query {plain}");
    // Spoofed identity headers change nothing: the verified identity is judged.
    assert!(
        spoofed <= 100,
        "spoofing scraper refused at query {spoofed}"
    );
}

#[test]
fn an_extraction_attempt_is_escalated_while_an_honest_heavy_user_is_not() {
    let b = Bench::start(
        ModelBehaviour::default(),
        "      - name: classify\n        paths: [/v1/predict]\n        api: predict\n        outputs: decimals:4\n        input_width: 8\n        detection:\n          population: 2560\n",
    );
    let session = |who: &Creds| b.session(who);
    let predict =
        |s: &mut Session, x: &[f64]| s.post("/v1/predict", &json!({"instances": [x]}).to_string());

    // Natural traffic: ten teams' queries around the cases they work on
    // teach the detector what natural looks like (256 queries each at most).
    let mut state = 7u64;
    let centers = cases(&mut state);
    let natural = |state: &mut u64, i: usize| near(&centers, state, i);
    for team in 0..10 {
        let s = &mut session(&b.caller(&format!("/ns/team{team}/sa/app")));
        for _ in 0..4 {
            let batch: Vec<Vec<f64>> = (0..64).map(|i| natural(&mut state, i)).collect();
            assert_eq!(
                s.post("/v1/predict", &json!({"instances": batch}).to_string())
                    .status,
                200
            );
        }
    }
    // An honest heavy user, one query at a time.
    let honest = &mut session(&b.caller("/ns/shop/sa/forecaster"));
    for i in 0..400 {
        let x = natural(&mut state, i);
        let a = predict(honest, &x);
        assert_eq!(a.status, 200, "honest query {i}: {a:?}");
        // `outputs: decimals:4`: no probability carries more.
        for p in a.json()["predictions"][0].as_array().unwrap() {
            let v = p.as_f64().unwrap() * 1e4;
            assert!((v - v.round()).abs() < 1e-6, "{}", a.body);
        }
        assert!(
            a.header("warden-usage-warning").is_none(),
            "honest query {i} warned"
        );
    }

    // A scraper: uniform random queries over the whole input space.
    let scraper = &mut session(&b.caller("/ns/batch/sa/scraper"));
    let mut refused_at = None;
    for q in 1..=500 {
        let a = predict(scraper, &random_vector(&mut state));
        if a.status == 429 {
            assert!(
                a.json()["type"]
                    .as_str()
                    .unwrap()
                    .ends_with(":abnormal-usage-detected"),
                "{a:?}"
            );
            refused_at = Some(q);
            break;
        }
        assert_eq!(a.status, 200);
    }
    // Within PRADA's figures for the same kind of attack (thousands of queries).
    let refused_at = refused_at.expect("the scraper was never refused");
    assert!(refused_at <= 100, "refused at query {refused_at}");
    // One model, one input width: another width is refused before detection sees it.
    assert_eq!(predict(honest, &[1.0, 2.0]).status, 400);
    // Sticky: the scraper stays refused; the honest user is still served.
    assert_eq!(predict(scraper, &centers[0]).status, 429);
    assert_eq!(predict(honest, &centers[1]).status, 200);
    let reached = |step: &str| {
        b.metric(&format!(
            "warden_model_escalations_total{{listener=\"models\",route=\"classify\",step=\"{step}\"}}"
        ))
    };
    assert!(reached("refuse") + reached("deny") >= 1.0);
    assert_eq!(
        b.metric("warden_model_tracked_identities{listener=\"models\",route=\"classify\"}"),
        12.0
    );
}

#[test]
fn an_embeddings_crawler_is_refused_at_the_share_of_the_space_it_may_cover() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("embed-usage.json");
    let b = Bench::start(
        ModelBehaviour::default(),
        &format!(
            "      - name: embed\n        paths: [/v1/embeddings]\n        api: openai\n        record: {}\n        detection:\n          max_coverage: 0.04\n",
            file.display()
        ),
    );
    let session = |who: &Creds| b.session(who);
    let embed = |s: &mut Session, texts: &[String], format: &str| {
        s.post(
            "/v1/embeddings",
            &json!({"model": "e", "input": texts, "encoding_format": format}).to_string(),
        )
    };
    // An indexer of one topic: its texts (and so its embeddings) keep to a
    // few words, however many it sends.
    let words = ["invoice", "refund", "payment", "overdue", "receipt"];
    let mut state = 11u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let indexer = &mut session(&b.caller("/ns/billing/sa/indexer"));
    for r in 0..40 {
        let texts: Vec<String> = (0..8)
            .map(|_| {
                (0..3)
                    .map(|_| words[(next() % 5) as usize])
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        let a = embed(indexer, &texts, "float");
        assert_eq!(a.status, 200, "indexer request {r}: {a:?}");
        assert!(
            a.header("warden-usage-warning").is_none(),
            "request {r} warned"
        );
    }
    // A crawler of every word it can make up, asking for base64 (as the
    // OpenAI SDKs do by default): refused once its answers cover 4% of the
    // space, and never answered past it.
    let crawler = &mut session(&b.caller("/ns/batch/sa/crawler"));
    // Only the API's own encodings, whose answers can be read.
    assert_eq!(embed(crawler, &["a".to_string()], "int8").status, 400);
    let (mut refused, mut warned) = (None, false);
    for r in 1..=200 {
        let texts: Vec<String> = (0..8)
            .map(|_| {
                (0..3)
                    .map(|_| format!("w{}", next() % 100_000))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        let a = embed(crawler, &texts, "base64");
        if a.status == 429 {
            assert!(
                a.json()["type"]
                    .as_str()
                    .unwrap()
                    .ends_with(":abnormal-usage-detected"),
                "{a:?}"
            );
            assert!(a.header("warden-usage-warning").is_some(), "{a:?}");
            refused = Some(r);
            break;
        }
        assert_eq!(a.status, 200, "{a:?}");
        // Answers on the way there say so.
        warned |= a.header("warden-usage-warning").is_some();
    }
    assert!(warned, "no answer warned before the refusal");
    // 4% of 4,096 buckets is 164: at 8 texts a request, at least 21 requests.
    let refused = refused.expect("the crawler was never refused");
    assert!(
        (21..=120).contains(&refused),
        "refused at request {refused}"
    );
    assert_eq!(
        embed(crawler, &["invoice".to_string()], "float").status,
        429,
        "sticky"
    );
    assert_eq!(embed(indexer, &["refund".to_string()], "float").status, 200);

    // The recording holds each caller's widest share, and `warden limits`
    // proposes max_coverage from the widest: here the crawler (a recording
    // to size limits from is of honest traffic, in shadow mode).
    let Bench { mut proxy, .. } = b;
    proxy.signal("TERM");
    assert!(proxy.wait_exit(Duration::from_secs(15)).is_some());
    let out = run_ok(&["limits", "--record", file.to_str().unwrap()]);
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("max_coverage:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("/ns/batch/sa/crawler"), "{out}");
    let proposed: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(proposed > 0.04 && proposed <= 0.2, "{out}");
}
