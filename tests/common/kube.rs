//! The Kubernetes API as the tests play it (there is no cluster here): an
//! HTTPS server on 127.0.0.1 with a certificate of its own, answering with
//! the JSON shapes of the Kubernetes API reference:
//!
//! - `GET /.well-known/openid-configuration` and `GET /openid/v1/jwks` (the
//!   service account issuer discovery);
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews` (TokenReview, with
//!   `user.username`, `groups`, and `extra` `authentication.kubernetes.io/
//!   pod-name`, `pod-uid`, `credential-id`, `node-name`, `node-uid`);
//! - `GET /api/v1/namespaces/<ns>/pods/<name>` (a Pod, or a 404 Status).
//!
//! Every call needs the reviewer's bearer token. Tokens are minted with the
//! claim set of projected ServiceAccount tokens, signed RS256 or ES256 with
//! keys made here. Its TokenReview checks signature, expiry and audience
//! but not the bound pod's existence, so the pod check warden makes itself
//! is what the tests see.

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, jwk::Jwk};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

use super::read_request;

/// The issuer the fake cluster signs with.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A pod the fake cluster runs.
#[derive(Debug, Clone)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
}

struct SigningKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwk: Value,
}

impl SigningKey {
    fn new(kid: &str, alg: Algorithm) -> Self {
        let key = match alg {
            Algorithm::RS256 => KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap(),
            _ => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        };
        let pem = key.serialize_pem();
        let encoding = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
            _ => EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
        };
        let mut jwk = Jwk::from_encoding_key(&encoding, alg).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        let decoding = DecodingKey::from_jwk(&jwk).unwrap();
        let mut jwk = serde_json::to_value(&jwk).unwrap();
        jwk["use"] = "sig".into();
        Self {
            kid: kid.to_owned(),
            alg,
            encoding,
            decoding,
            jwk,
        }
    }
}

struct State {
    keys: Vec<SigningKey>,
    pods: HashMap<(String, String), Pod>,
    /// Review as an API server that ignores `spec.audiences` (and checks
    /// its own default audience instead): no `status.audiences`.
    ignore_audiences: bool,
}

/// The fake API server.
pub struct Kube {
    pub addr: SocketAddr,
    /// The serving certificate (the CA's `ca_file`).
    pub ca_file: PathBuf,
    /// The bearer token the CA must present (its `token_file`).
    pub reviewer_token_file: PathBuf,
    state: Arc<Mutex<State>>,
    /// Calls per endpoint: "review", "pod", "jwks", "discovery".
    calls: Arc<Mutex<HashMap<&'static str, usize>>>,
    next_uid: AtomicUsize,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl Kube {
    /// Starts the server, writing its CA and the reviewer's token into `dir`.
    pub fn start(dir: &Path) -> Kube {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
            SanType::DnsName("kubernetes.default.svc".try_into().unwrap()),
        ];
        let cert = params.self_signed(&key).unwrap();
        let ca_file = dir.join("kube-ca.crt");
        std::fs::write(&ca_file, cert.pem()).unwrap();
        let reviewer = format!("reviewer-{}", super::rand_suffix());
        let reviewer_token_file = dir.join("reviewer.token");
        std::fs::write(&reviewer_token_file, format!("{reviewer}\n")).unwrap();

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            keys: vec![
                SigningKey::new("rsa-1", Algorithm::RS256),
                SigningKey::new("ec-1", Algorithm::ES256),
            ],
            pods: HashMap::new(),
            ignore_audiences: false,
        }));
        let calls = Arc::new(Mutex::new(HashMap::new()));
        {
            let (state, calls) = (state.clone(), calls.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let (config, state, calls, reviewer) = (
                        config.clone(),
                        state.clone(),
                        calls.clone(),
                        reviewer.clone(),
                    );
                    std::thread::spawn(move || {
                        serve(stream, config, &state, &calls, &reviewer, addr);
                    });
                }
            });
        }
        Kube {
            addr,
            ca_file,
            reviewer_token_file,
            state,
            calls,
            next_uid: AtomicUsize::new(1),
        }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Runs a pod; returns it.
    pub fn add_pod(&self, namespace: &str, name: &str, service_account: &str) -> Pod {
        let n = self.next_uid.fetch_add(1, Ordering::Relaxed);
        let pod = Pod {
            namespace: namespace.into(),
            name: name.into(),
            uid: format!(
                "{n:08x}-5c1e-4c55-9d1f-{:012x}",
                rand::random::<u64>() >> 16
            ),
            service_account: service_account.into(),
        };
        self.state
            .lock()
            .unwrap()
            .pods
            .insert((namespace.into(), name.into()), pod.clone());
        pod
    }

    /// Deletes a pod.
    pub fn delete_pod(&self, pod: &Pod) {
        self.state
            .lock()
            .unwrap()
            .pods
            .remove(&(pod.namespace.clone(), pod.name.clone()));
    }

    /// Makes TokenReview ignore the audiences asked for, as an API server
    /// without audience support does.
    pub fn ignore_audiences(&self, on: bool) {
        self.state.lock().unwrap().ignore_audiences = on;
    }

    /// Replaces the key set with a new key (a rotation).
    pub fn rotate(&self, kid: &str, alg: Algorithm) {
        self.state.lock().unwrap().keys = vec![SigningKey::new(kid, alg)];
    }

    /// How many times an endpoint was called.
    pub fn calls(&self, endpoint: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .get(endpoint)
            .copied()
            .unwrap_or(0)
    }

    /// The claims of a projected token for `pod` (audience `warden`, 1 h).
    pub fn claims(&self, pod: &Pod) -> Value {
        let t = now();
        json!({
            "aud": ["warden"],
            "exp": t + 3600,
            "iat": t,
            "iss": ISSUER,
            "jti": format!("{:032x}", rand::random::<u128>()),
            "kubernetes.io": {
                "namespace": pod.namespace,
                "node": {"name": "node-1", "uid": "6b8f1b1e-1d2c-4a7e-9a57-6f0e6f7c2a11"},
                "pod": {"name": pod.name, "uid": pod.uid},
                "serviceaccount": {"name": pod.service_account, "uid": "2f6c9e1a-8b4d-4c3e-a1f2-0d9e8c7b6a54"}
            },
            "nbf": t,
            "sub": format!("system:serviceaccount:{}:{}", pod.namespace, pod.service_account),
        })
    }

    /// Signs `claims` with the key named `kid` (its algorithm).
    pub fn sign(&self, claims: &Value, kid: &str) -> String {
        let state = self.state.lock().unwrap();
        let key = state
            .keys
            .iter()
            .find(|k| k.kid == kid)
            .expect("a key of the fake cluster");
        let mut header = Header::new(key.alg);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
    }

    /// A valid projected token for `pod`, RS256.
    pub fn token(&self, pod: &Pod) -> String {
        self.sign(&self.claims(pod), "rsa-1")
    }
}

fn serve(
    stream: std::net::TcpStream,
    config: Arc<rustls::ServerConfig>,
    state: &Mutex<State>,
    calls: &Mutex<HashMap<&'static str, usize>>,
    reviewer: &str,
    addr: SocketAddr,
) {
    let mut conn = rustls::ServerConnection::new(config).unwrap();
    let mut sock = stream;
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    let mut reader = BufReader::new(&mut tls);
    let Some((head, body)) = read_request(&mut reader) else {
        return;
    };
    drop(reader);
    let mut parts = head[0].split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let authorized = head[1..].iter().any(|h| {
        h.split_once(':').is_some_and(|(n, v)| {
            n.eq_ignore_ascii_case("authorization") && v.trim() == format!("Bearer {reviewer}")
        })
    });
    let count = |e: &'static str| *calls.lock().unwrap().entry(e).or_default() += 1;
    let (status, answer) = if !authorized {
        (401, status_object(401, "Unauthorized", "Unauthorized"))
    } else if method == "GET" && path == "/.well-known/openid-configuration" {
        count("discovery");
        (
            200,
            json!({
                "issuer": ISSUER,
                "jwks_uri": format!("https://{addr}/openid/v1/jwks"),
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["ES256", "RS256"],
            }),
        )
    } else if method == "GET" && path == "/openid/v1/jwks" {
        count("jwks");
        let keys: Vec<Value> = state
            .lock()
            .unwrap()
            .keys
            .iter()
            .map(|k| k.jwk.clone())
            .collect();
        (200, json!({ "keys": keys }))
    } else if method == "POST" && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        count("review");
        (201, review(state, &body))
    } else if let (true, Some(rest)) = (method == "GET", path.strip_prefix("/api/v1/namespaces/")) {
        count("pod");
        match rest.split('/').collect::<Vec<_>>().as_slice() {
            [ns, "pods", name] => match state
                .lock()
                .unwrap()
                .pods
                .get(&((*ns).to_owned(), (*name).to_owned()))
            {
                Some(p) => (200, pod_object(p)),
                None => (
                    404,
                    json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure",
                        "message": format!("pods \"{name}\" not found"),
                        "reason": "NotFound",
                        "details": {"name": name, "kind": "pods"},
                        "code": 404
                    }),
                ),
            },
            _ => (
                404,
                status_object(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            ),
        }
    } else {
        (
            404,
            status_object(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        )
    };
    let text = answer.to_string();
    let reason = match status {
        200 => "OK",
        201 => "Created",
        401 => "Unauthorized",
        _ => "Not Found",
    };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = tls.write_all(resp.as_bytes());
    let _ = tls.flush();
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

fn pod_object(p: &Pod) -> Value {
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": p.name,
            "namespace": p.namespace,
            "uid": p.uid,
            "resourceVersion": "4711",
            "creationTimestamp": "2026-12-01T10:00:00Z",
            "labels": {"app": p.name}
        },
        "spec": {
            "serviceAccountName": p.service_account,
            "nodeName": "node-1",
            "containers": [{"name": "app", "image": "registry.example/app:1"}]
        },
        "status": {"phase": "Running", "podIP": "10.244.0.7"}
    })
}

/// A TokenReview answer, as the API server gives it.
fn review(state: &Mutex<State>, body: &[u8]) -> Value {
    let req: Value = serde_json::from_slice(body).unwrap_or_default();
    let token = req["spec"]["token"].as_str().unwrap_or("");
    let audiences: Vec<String> = req["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut answer = json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": {"token": token, "audiences": audiences},
    });
    let ignore = state.lock().unwrap().ignore_audiences;
    let verified = (|| {
        let header = jsonwebtoken::decode_header(token).ok()?;
        let state = state.lock().unwrap();
        let key = state
            .keys
            .iter()
            .find(|k| Some(&k.kid) == header.kid.as_ref())?;
        let mut v = Validation::new(key.alg);
        if ignore {
            v.validate_aud = false;
        } else {
            v.set_audience(&audiences);
        }
        v.set_issuer(&[ISSUER]);
        jsonwebtoken::decode::<Value>(token, &key.decoding, &v)
            .ok()
            .map(|d| d.claims)
    })();
    let Some(c) = verified else {
        answer["status"] = json!({
            "authenticated": false,
            "user": {},
            "error": "[invalid bearer token, service account token could not be validated]"
        });
        return answer;
    };
    let k = &c["kubernetes.io"];
    let ns = k["namespace"].as_str().unwrap_or("");
    let mut extra = serde_json::Map::new();
    extra.insert(
        "authentication.kubernetes.io/credential-id".into(),
        json!([format!("JTI={}", c["jti"].as_str().unwrap_or(""))]),
    );
    if k["pod"].is_object() {
        extra.insert(
            "authentication.kubernetes.io/pod-name".into(),
            json!([k["pod"]["name"]]),
        );
        extra.insert(
            "authentication.kubernetes.io/pod-uid".into(),
            json!([k["pod"]["uid"]]),
        );
    }
    if k["node"].is_object() {
        extra.insert(
            "authentication.kubernetes.io/node-name".into(),
            json!([k["node"]["name"]]),
        );
        extra.insert(
            "authentication.kubernetes.io/node-uid".into(),
            json!([k["node"]["uid"]]),
        );
    }
    let token_aud: Vec<String> = match &c["aud"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let mut status = json!({
        "authenticated": true,
        "user": {
            "username": format!("system:serviceaccount:{ns}:{}", k["serviceaccount"]["name"].as_str().unwrap_or("")),
            "uid": k["serviceaccount"]["uid"],
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
            "extra": extra,
        },
        "audiences": audiences.iter().filter(|a| token_aud.contains(a)).collect::<Vec<_>>(),
    });
    if ignore {
        status.as_object_mut().unwrap().remove("audiences");
    }
    answer["status"] = status;
    answer
}

/// The Kubernetes release manifests are validated against.
pub const KUBERNETES: &str = "1.37.0";

/// Validates manifests against the Kubernetes schema, strictly (unknown
/// fields refused). Every document must pass: a kind the validator has no
/// schema for (it only warns) fails too, and a `List` (which has none) is
/// validated item by item. The validator must be there when CI=true.
pub fn validate(dir: &std::path::Path, yaml: &str) {
    let mut docs: Vec<String> = Vec::new();
    let mut current = String::new();
    let flush = |text: &mut String, docs: &mut Vec<String>| {
        let has_content = text
            .lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        if has_content {
            let v: Value = serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            if v["kind"] == "List" {
                for item in v["items"].as_array().into_iter().flatten() {
                    docs.push(format!("{item}\n"));
                }
            } else {
                docs.push(std::mem::take(text));
            }
        }
        text.clear();
    };
    for line in yaml.split_inclusive('\n') {
        let separator =
            line.starts_with("---") && line[3..].chars().next().is_none_or(char::is_whitespace);
        if separator {
            flush(&mut current, &mut docs);
        } else {
            current.push_str(line);
        }
    }
    flush(&mut current, &mut docs);
    assert!(!docs.is_empty(), "nothing to validate:\n{yaml}");
    let file = dir.join(format!("manifests-{}.yaml", super::rand_suffix()));
    std::fs::write(&file, docs.join("---\n")).unwrap();
    let out = match std::process::Command::new("kubernetes-validate")
        .args(["--strict", "-k", KUBERNETES, super::s(&file)])
        .output()
    {
        Ok(o) => o,
        Err(e) if std::env::var("CI").is_err() => {
            eprintln!("kubernetes-validate not installed ({e}): schema check skipped outside CI");
            return;
        }
        Err(e) => panic!("kubernetes-validate is needed (pip install kubernetes-validate): {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let passed = lines
        .iter()
        .filter(|l| l.starts_with("INFO ") && l.contains(" passed for resource "))
        .count();
    assert!(
        out.status.success()
            && lines.iter().all(|l| l.starts_with("INFO "))
            && passed == docs.len(),
        "{passed} of {} documents passed:\n{text}\n{}",
        docs.len(),
        docs.join("---\n")
    );
}

/// A CA (not started) whose `ca.yaml` attests pods of namespace `shop`
/// against a fresh fake API, plus `extra` settings of the section.
pub fn ca_with_kubernetes(extra: &str) -> (super::Ca, Kube) {
    let ca = super::Ca::init("example.org");
    let kube = Kube::start(ca.tmp.path());
    let config = ca.dir.join("ca.yaml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "kubernetes:\n  allow: [spiffe://example.org/ns/shop/*]\n  api: {{url: {}, ca_file: {}, token_file: {}}}\n{extra}",
        kube.url(),
        super::s(&kube.ca_file),
        super::s(&kube.reviewer_token_file)
    ));
    std::fs::write(&config, text).unwrap();
    (ca, kube)
}

/// The jwks settings the tests that run sidecars use.
pub fn jwks_section() -> String {
    format!("  verify: jwks\n  issuer: {ISSUER}\n")
}
