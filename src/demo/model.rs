//! The demo's model API part: a small classifier and chat model behind a
//! sidecar with model routes; an analyst who goes over the chat limit (a
//! 429 with its rate-limit headers), an honest heavy user of the
//! classifier who is never flagged, and a scraper whose random queries are
//! detected, escalated and finally reported to the CA, which then refuses
//! to renew its certificate.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use warden_ca::CaService;
use warden_ca::client::{CaClient, ClientError, Credentials};
use warden_config::{IdentityPattern, SpiffeId};

use super::procs::{Warden, write};
use super::{DemoResult, Script, TD, app, id};

/// Features of the classifier's input.
const DIM: usize = 8;

/// The model server: `POST /v1/predict` (KServe v1, a 3-class linear
/// softmax over 8 features) and `POST /v1/chat/completions` (a canned answer
/// with usage).
pub async fn start_model() -> std::io::Result<SocketAddr> {
    app::serve_with(answer).await
}

fn answer(req: &app::Received) -> (&'static str, String) {
    let doc: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let answer = if req.path == "/v1/predict" {
        let preds: Vec<Value> = doc["instances"]
            .as_array()
            .map(|a| a.iter().map(classify).collect())
            .unwrap_or_default();
        json!({ "predictions": preds })
    } else {
        json!({
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Three bullet points."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}
        })
    };
    ("application/json", answer.to_string())
}

/// The victim: fixed weights, softmax probabilities.
fn classify(x: &Value) -> Value {
    const W: [[f64; DIM]; 3] = [
        [1.2, -0.4, 0.3, 0.8, -1.1, 0.2, 0.5, -0.3],
        [-0.7, 1.0, -0.2, 0.1, 0.9, -0.8, 0.3, 0.6],
        [0.1, -0.5, 0.9, -0.6, 0.2, 0.7, -1.0, 0.4],
    ];
    let x: Vec<f64> = x
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let z: Vec<f64> = W
        .iter()
        .map(|w| w.iter().zip(&x).map(|(a, b)| a * b).sum())
        .collect();
    let m = z.iter().cloned().fold(f64::MIN, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let t: f64 = e.iter().sum();
    json!(e.iter().map(|v| v / t).collect::<Vec<_>>())
}

fn sidecar_config(root: &Path, ca: SocketAddr, token_file: &str, model: SocketAddr) -> String {
    format!(
        "identity:\n  ca_url: https://{ca}\n  token_file: {token_file}\n  spiffe_id: spiffe://{TD}/ns/ml/sa/model\n  bundle: {}\nadmin: 127.0.0.1:0\ninbound:\n  - name: model\n    listen: 127.0.0.1:0\n    app: {model}\n    policy:\n      rules:\n        - name: everyone-in-the-mesh\n          action: allow\n          from: [spiffe://{TD}/*]\n    model_api:\n      - name: chat\n        paths: [/v1/chat/completions]\n        api: openai\n        limits:\n          identity:\n            requests_per_second: 0.5\n            burst: 3\n            tokens_per_minute: 20000\n            max_top_logprobs: 0\n            max_logit_bias: 0\n      - name: classify\n        paths: [/v1/predict]\n        api: predict\n        outputs: decimals:3\n        input_width: 8\n        limits:\n          identity:\n            vectors_per_day: 100000\n        detection:\n          population: 2560\n          report_to_ca: true\n",
        root.join("ca").join("bundle.pem").display()
    )
}

/// An mTLS HTTP/1.1 connection to the model sidecar as one workload.
struct Caller {
    tls: TlsStream<TcpStream>,
}

impl Caller {
    async fn connect(
        inbound: SocketAddr,
        svc: &CaService,
        creds: &Credentials,
    ) -> DemoResult<Self> {
        let provider = warden_ca::tls::provider();
        let roots = warden_ca::tls::root_store(&svc.authority.bundle())?;
        let verifier = warden_ca::tls::SpiffeServerVerifier::new(
            roots,
            svc.authority.trust_domain().clone(),
            IdentityPattern::parse(&format!("spiffe://{TD}/ns/ml/sa/model"))?,
            provider.clone(),
        );
        let key = warden_ca::tls::certified_key(&creds.chain_pem, &creds.key_pem, &provider)?;
        let resolver = Arc::new(warden_ca::tls::RotatingCert::default());
        resolver.set(key);
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(resolver);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(inbound).await?;
        let name = rustls_pki_types::ServerName::try_from("model.invalid")?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        Ok(Self { tls })
    }

    /// POSTs JSON: (status, head, body).
    async fn post(&mut self, path: &str, body: &Value) -> std::io::Result<(u16, String, String)> {
        let body = body.to_string();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: model\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.tls.write_all(req.as_bytes()).await?;
        app::read_response_with_head(&mut self.tls).await
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        l.split_once(':')
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    })
}

async fn enrol(svc: &CaService, client: &CaClient, id: &SpiffeId) -> DemoResult<Credentials> {
    let (token, _) = svc.create_token(id, None, OffsetDateTime::now_utc())?;
    Ok(client.bootstrap(id, &token, None).await?)
}

/// The model API steps. The CA's `deny_reporters` already lists the model sidecar.
pub async fn run(s: &mut Script, svc: &CaService, root: &Path, ca: &Warden) -> DemoResult<Warden> {
    let model = start_model().await?;
    let model_id = id("/ns/ml/sa/model")?;
    let (token, _) = svc.create_token(&model_id, None, OffsetDateTime::now_utc())?;
    let token_file = write(root, "model.token", &token)?;
    let config = sidecar_config(root, ca.addr("api"), &token_file, model);
    let sidecar =
        Warden::start(&["proxy", "--config", &write(root, "model.yaml", &config)?]).await?;
    let inbound = sidecar.addr("model");
    let client = CaClient::new(
        &format!("https://{}", ca.addr("api")),
        svc.authority.trust_domain().clone(),
        &std::fs::read_to_string(root.join("ca").join("bundle.pem"))?,
    )?;

    // An analyst goes over the chat route's request rate.
    let analyst = enrol(svc, &client, &id("/ns/shop/sa/analyst")?).await?;
    let mut conn = Caller::connect(inbound, svc, &analyst).await?;
    let chat = json!({"model": "demo", "messages": [{"role": "user", "content": "Summarize the quarter."}], "max_tokens": 64});
    let mut refused = None;
    let mut allowed = 0;
    for _ in 0..6 {
        let (status, head, body) = conn.post("/v1/chat/completions", &chat).await?;
        if status == 429 {
            refused = Some((head, body));
            break;
        }
        allowed += u32::from(status == 200);
    }
    match &refused {
        Some((head, body)) => {
            let ok = header(head, "retry-after").is_some() && header(head, "ratelimit").is_some();
            s.step(
                ok,
                "model API: analyst over the chat rate",
                format!(
                    "{allowed} answered, then 429 {}",
                    serde_json::from_str::<Value>(body)
                        .map(|p| p["type"].to_string())
                        .unwrap_or_default()
                ),
            );
            for h in ["ratelimit-policy", "ratelimit", "retry-after"] {
                println!("         {h}: {}", header(head, h).unwrap_or("(missing)"));
            }
        }
        None => s.step(
            false,
            "model API: analyst over the chat rate",
            "never refused",
        ),
    }

    // Natural traffic: the cases the teams using the classifier work on.
    let mut rng = StdRng::seed_from_u64(7);
    let centers: Vec<[f64; DIM]> = (0..3)
        .map(|_| std::array::from_fn(|_| rng.random_range(-2.0..2.0)))
        .collect();
    let natural = |rng: &mut StdRng| -> Vec<f64> {
        let c = &centers[rng.random_range(0..centers.len())];
        c.iter().map(|v| v + gaussian(rng) * 0.5).collect()
    };
    // Ten teams' traffic teaches the detector what natural queries look like.
    let mut team_refused = 0;
    for team in 0..10 {
        let creds = enrol(svc, &client, &id(&format!("/ns/team{team}/sa/app"))?).await?;
        let mut conn = Caller::connect(inbound, svc, &creds).await?;
        for _ in 0..4 {
            let batch: Vec<Vec<f64>> = (0..64).map(|_| natural(&mut rng)).collect();
            let (status, _, _) = conn
                .post("/v1/predict", &json!({ "instances": batch }))
                .await?;
            team_refused += usize::from(status != 200);
        }
    }
    // An honest heavy user: many natural queries, one at a time.
    let honest = enrol(svc, &client, &id("/ns/shop/sa/forecaster")?).await?;
    let mut conn = Caller::connect(inbound, svc, &honest).await?;
    let mut honest_refused = 0;
    let mut honest_warned = 0;
    const HONEST_QUERIES: usize = 600;
    for _ in 0..HONEST_QUERIES {
        let x = natural(&mut rng);
        let (status, head, _) = conn.post("/v1/predict", &json!({"instances": [x]})).await?;
        honest_refused += usize::from(status != 200);
        honest_warned += usize::from(header(&head, "warden-usage-warning").is_some());
    }
    s.step(
        honest_refused == 0 && honest_warned == 0 && team_refused == 0,
        "model API: honest users of the classifier",
        format!("10 teams x 256 queries and a heavy user's {HONEST_QUERIES}: {} refused, {honest_warned} warned", team_refused + honest_refused),
    );

    // A scraper copying the classifier with uniform random queries.
    let scraper_id = id("/ns/batch/sa/scraper")?;
    let scraper = enrol(svc, &client, &scraper_id).await?;
    let mut conn = Caller::connect(inbound, svc, &scraper).await?;
    let (mut warned, mut degraded, mut stopped) = (None, None, None);
    for q in 1..=3000usize {
        let x: Vec<f64> = (0..DIM).map(|_| rng.random_range(-4.0..4.0)).collect();
        let (status, head, body) = conn.post("/v1/predict", &json!({"instances": [x]})).await?;
        if status == 429 {
            stopped = Some((q, body));
            break;
        }
        let step = header(&head, "warden-usage-warning");
        if warned.is_none() && step.is_some() {
            warned = Some(q);
        }
        if degraded.is_none() && step == Some("degrade") {
            degraded = Some(q);
        }
    }
    let fmt = |q: Option<usize>| q.map_or("-".to_owned(), |q| q.to_string());
    let detected = stopped
        .as_ref()
        .is_some_and(|(_, b)| b.contains("abnormal-usage-detected"));
    s.step(
        detected,
        "model extraction: a scraper's random queries",
        format!(
            "refused (429 abnormal-usage-detected) at query {} (warned at {}, outputs coarsened at {}; '-': the evidence jumped past that step)",
            fmt(stopped.as_ref().map(|(q, _)| *q)),
            fmt(warned),
            fmt(degraded),
        ),
    );

    // The last step of the ladder: the CA no longer renews the scraper.
    let mut renewal = client.renew(&scraper, None).await;
    for _ in 0..20 {
        if matches!(&renewal, Err(ClientError::Refused { reason, .. }) if reason == "denied") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        renewal = client.renew(&scraper, None).await;
    }
    let denied = matches!(&renewal, Err(ClientError::Refused { reason, .. }) if reason == "denied");
    s.step(
        denied,
        "model extraction: escalated to the CA",
        match &renewal {
            Err(e) => format!("{scraper_id} asked to renew: {e}"),
            Ok(_) => format!("{scraper_id} renewed: should have been denied"),
        },
    );
    Ok(sidecar)
}

fn gaussian(rng: &mut StdRng) -> f64 {
    let (u, v): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random_range(0.0..1.0));
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}
