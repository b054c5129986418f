//! Model API protection, as configured on an inbound listener: which paths
//! are a model API (OpenAI-compatible or a generic JSON predict endpoint),
//! the limits per caller and per aggregate of callers, how much a caller
//! may learn from each answer, and extraction detection with its escalation
//! ladder. Every limit is keyed on the caller's verified SPIFFE ID only.

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::diagnostic::Collector;
use crate::pattern::PathMatch;
use crate::reference::Reference;

/// The kind of model API behind a route: decides how bodies are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelApi {
    /// OpenAI-compatible chat/completions, completions, embeddings and the
    /// Responses API (JSON, server-sent-event streams, `usage` in answers).
    Openai,
    /// A JSON predict endpoint taking numeric feature vectors, in one of
    /// the [`PredictFormat`]s.
    Predict,
}

/// The JSON shape of a predict route's requests and answers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PredictFormat {
    /// Whichever standard shape a request comes in (`instances`, TF
    /// Serving's columnar `inputs`, or Open Inference Protocol tensors),
    /// its answer expected in the same.
    #[default]
    Auto,
    /// KServe v1: `instances` in, `predictions` out.
    KserveV1,
    /// TF Serving's REST API: rows (`instances` -> `predictions`) or
    /// columns (`inputs` -> `outputs`).
    TfServing,
    /// The Open Inference Protocol (KServe v2, Triton, MLServer): `inputs`
    /// tensors in, `outputs` tensors out.
    OpenInference,
    /// Any JSON API, located by JSON pointers.
    Json(JsonFormat),
}

/// Where a custom predict API keeps its feature vectors and its scores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonFormat {
    /// JSON pointer (RFC 6901) to one feature vector or an array of them
    /// (`""`: the whole body).
    pub input: String,
    /// JSON pointer to the answer's scores: one array or one per row.
    pub output: String,
    /// Other top-level request fields accepted (the input's own always is).
    pub fields: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawFormat {
    Auto,
    KserveV1,
    TfServing,
    OpenInference,
    Json,
}

/// Whether a route's refusals are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitMode {
    /// Over-limit and abnormal requests are refused.
    #[default]
    Enforce,
    /// They are counted and logged, then let through: to size limits on real traffic.
    Shadow,
}

/// What to do when the shared state (Redis) cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Refuse the request (503): no limit is ever silently lifted.
    #[default]
    Closed,
    /// Let the request through unlimited, counted in a metric.
    Open,
}

/// How much of a predict answer's probabilities a caller sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputDetail {
    /// As the model answered.
    Full,
    /// Rounded to this many decimal places.
    Decimals(u8),
    /// Only the index of the most likely class.
    Label,
}

impl OutputDetail {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(Self::Full),
            "label" => Ok(Self::Label),
            _ => s
                .strip_prefix("decimals:")
                .and_then(|n| n.parse::<u8>().ok())
                .filter(|n| *n <= 6)
                .map(Self::Decimals)
                .ok_or_else(|| {
                    format!("outputs {s:?} must be full, label or decimals:N (N from 0 to 6)")
                }),
        }
    }
}

/// The limits of one level of the identity hierarchy. Each is optional;
/// an absent limit does not apply.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LimitSet {
    /// Sustained request rate, with `burst` requests allowed at once (GCRA).
    pub requests_per_second: Option<f64>,
    /// Requests allowed at once on top of the rate (default: one second's worth).
    pub burst: u32,
    /// Prompt plus completion tokens per sliding minute.
    pub tokens_per_minute: Option<u64>,
    /// Prompt plus completion tokens per sliding day.
    pub tokens_per_day: Option<u64>,
    /// Requests in progress at once (streams count until they end).
    pub concurrent: Option<u32>,
    /// Generated tokens returned with logprobs, per sliding day.
    pub logprob_tokens_per_day: Option<u64>,
    /// Largest `top_logprobs` one request may ask for (0: logprobs not allowed).
    pub max_top_logprobs: Option<u32>,
    /// `logit_bias` entries sent, per sliding day.
    pub logit_bias_per_day: Option<u64>,
    /// Most `logit_bias` entries in one request (0: logit_bias not allowed).
    pub max_logit_bias: Option<u32>,
    /// Vectors per sliding day: embeddings returned, or feature vectors
    /// submitted to a predict endpoint.
    pub vectors_per_day: Option<u64>,
}

/// Limits per level: the caller, its namespace, its trust domain. The
/// aggregate levels stop many identities from adding up to one unlimited
/// caller.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Limits {
    /// Per SPIFFE ID.
    pub identity: LimitSet,
    /// Per namespace: `spiffe://td/ns/<ns>` for Kubernetes-style IDs,
    /// otherwise the ID without its last path segment.
    pub namespace: LimitSet,
    /// Per trust domain.
    pub trust_domain: LimitSet,
}

/// Scores at which each escalation step starts, in (0, 1], non-decreasing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LadderConfig {
    /// Answer with a warning header.
    pub warn: f64,
    /// Strip logprobs and logit_bias, coarsen probabilities.
    pub degrade: f64,
    /// Refuse with 429 abnormal-usage-detected.
    pub refuse: f64,
    /// Also ask the CA to stop renewing the identity.
    pub deny: f64,
}

/// Extraction detection on a route.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectionConfig {
    /// Most identities tracked at once (least recently seen evicted).
    pub max_identities: usize,
    /// Most queries remembered per identity.
    pub history: usize,
    /// The served LLM's hidden size: a logprob sweep must be stopped long
    /// before it has collected this many full logprob vectors.
    pub hidden_size: u32,
    /// Natural queries (from callers not suspected, at most 256 each) seen
    /// before the population-based signals (input-space coverage, typical
    /// nearest distance) are trusted.
    pub population: u64,
    /// Where each step starts (None: the detector's tuned defaults).
    pub ladder: Option<LadderConfig>,
    /// What a predict caller sees at the degrade step.
    pub degrade_outputs: OutputDetail,
    /// At the deny step, ask the CA (the proxy's identity source) to deny the identity.
    pub report_to_ca: bool,
    /// Natural inputs that define what natural looks like (predict routes):
    /// with one, the population signals count from the first query and
    /// never learn from live callers.
    pub reference: Option<std::sync::Arc<Reference>>,
    /// The share of the embedding space (B4B's buckets of the answers'
    /// embeddings) an identity may be answered in before it is refused;
    /// None: measured (and recorded) but not bounded. `warden limits`
    /// proposes it from a shadow-mode recording.
    pub max_coverage: Option<f64>,
}

impl Default for DetectionConfig {
    fn default() -> Self {
        Self {
            max_identities: 4096,
            history: 128,
            hidden_size: 4096,
            population: 10_240,
            ladder: None,
            degrade_outputs: OutputDetail::Decimals(1),
            report_to_ca: false,
            reference: None,
            max_coverage: None,
        }
    }
}

/// One protected model route on an inbound listener.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRoute {
    /// Name used in metrics, logs and `RateLimit-Policy`.
    pub name: String,
    /// Paths this route covers (the first route whose paths match wins).
    pub paths: Vec<PathMatch>,
    /// How bodies are read.
    pub api: ModelApi,
    /// Enforce or shadow.
    pub mode: LimitMode,
    /// What to do when shared state is unreachable.
    pub on_store_error: OnStoreError,
    /// Largest request body read (413 beyond).
    pub max_body_bytes: usize,
    /// Largest non-streamed answer read (502 beyond).
    pub max_response_bytes: usize,
    /// Completion tokens reserved (and set as `max_tokens`) when a request names none.
    pub default_max_tokens: u32,
    /// The limits.
    pub limits: Limits,
    /// What a predict caller sees normally.
    pub outputs: OutputDetail,
    /// The predict model's input width: other widths get 400 (so that a
    /// caller cannot reset its detection history by changing widths).
    pub input_width: Option<usize>,
    /// The predict API's JSON shape.
    pub format: PredictFormat,
    /// Where per-caller usage is recorded for sizing limits (`warden limits`).
    pub record: Option<std::path::PathBuf>,
    /// Extraction detection, when configured.
    pub detection: Option<DetectionConfig>,
}

// ---- the file's shape ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModelRoute {
    name: Spanned<String>,
    paths: Vec<Spanned<String>>,
    api: ModelApi,
    #[serde(default)]
    mode: LimitMode,
    #[serde(default)]
    on_redis_error: OnStoreError,
    #[serde(default)]
    max_body_bytes: Option<Spanned<usize>>,
    #[serde(default)]
    max_response_bytes: Option<Spanned<usize>>,
    #[serde(default)]
    default_max_tokens: Option<Spanned<u32>>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    outputs: Option<Spanned<String>>,
    #[serde(default)]
    input_width: Option<Spanned<usize>>,
    #[serde(default)]
    format: Option<Spanned<RawFormat>>,
    #[serde(default)]
    input: Option<Spanned<String>>,
    #[serde(default)]
    output: Option<Spanned<String>>,
    #[serde(default)]
    fields: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    record: Option<Spanned<String>>,
    #[serde(default)]
    detection: Option<Spanned<RawDetection>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default)]
    identity: Option<Spanned<RawLimitSet>>,
    #[serde(default)]
    namespace: Option<Spanned<RawLimitSet>>,
    #[serde(default)]
    trust_domain: Option<Spanned<RawLimitSet>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimitSet {
    requests_per_second: Option<f64>,
    burst: Option<u32>,
    tokens_per_minute: Option<u64>,
    tokens_per_day: Option<u64>,
    concurrent: Option<u32>,
    logprob_tokens_per_day: Option<u64>,
    max_top_logprobs: Option<u32>,
    logit_bias_per_day: Option<u64>,
    max_logit_bias: Option<u32>,
    vectors_per_day: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDetection {
    max_identities: Option<usize>,
    history: Option<usize>,
    hidden_size: Option<u32>,
    population: Option<u64>,
    #[serde(default)]
    ladder: Option<Spanned<RawLadder>>,
    degrade_outputs: Option<String>,
    #[serde(default)]
    report_to_ca: bool,
    #[serde(default)]
    reference: Option<Spanned<String>>,
    #[serde(default)]
    max_coverage: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLadder {
    warn: f64,
    degrade: f64,
    refuse: f64,
    deny: f64,
}

/// Largest request body a route may be configured to read.
const MAX_BODY_CEILING: usize = 64 << 20;
/// Largest answer a route may be configured to read.
const MAX_RESPONSE_CEILING: usize = 256 << 20;

/// Checks a listener's routes; problems go to `errors` with their location.
pub(crate) fn validate_routes(
    raw: Vec<RawModelRoute>,
    errors: &mut Collector<'_>,
) -> Vec<ModelRoute> {
    let mut names = std::collections::HashSet::new();
    raw.into_iter()
        .map(|r| {
            if !names.insert(r.name.value.clone()) {
                errors.at(
                    &r.name,
                    format!("model route name {:?} is used twice", r.name.value),
                );
            }
            r.validate(errors)
        })
        .collect()
}

impl RawModelRoute {
    fn validate(self, errors: &mut Collector<'_>) -> ModelRoute {
        let name = &self.name;
        let n = &name.value;
        if n.is_empty()
            || n.len() > 64
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            errors.at(name, "route name must be 1-64 letters, digits, '-' or '_'");
        }
        if self.paths.is_empty() {
            errors.at(name, "a model route needs at least one path");
        }
        let mut paths = Vec::new();
        for p in &self.paths {
            match PathMatch::parse(&p.value) {
                Ok(m) => paths.push(m),
                Err(e) => errors.at(p, e),
            }
        }
        let bytes = |v: &Option<Spanned<usize>>,
                     def: usize,
                     ceiling: usize,
                     what: &str,
                     errors: &mut Collector<'_>| match v {
            Some(b) if b.value == 0 || b.value > ceiling => {
                errors.at(b, format!("{what} must be between 1 and {ceiling}"));
                def
            }
            Some(b) => b.value,
            None => def,
        };
        let max_body_bytes = bytes(
            &self.max_body_bytes,
            1 << 20,
            MAX_BODY_CEILING,
            "max_body_bytes",
            errors,
        );
        let max_response_bytes = bytes(
            &self.max_response_bytes,
            32 << 20,
            MAX_RESPONSE_CEILING,
            "max_response_bytes",
            errors,
        );
        let default_max_tokens = match &self.default_max_tokens {
            Some(t) if t.value == 0 => {
                errors.at(t, "default_max_tokens must be at least 1");
                1
            }
            Some(t) => t.value,
            None => 1024,
        };
        let api = self.api;
        let level = |raw: &Option<Spanned<RawLimitSet>>, errors: &mut Collector<'_>| {
            raw.as_ref()
                .map(|s| limit_set(s, api, errors))
                .unwrap_or_default()
        };
        let limits = Limits {
            identity: level(&self.limits.identity, errors),
            namespace: level(&self.limits.namespace, errors),
            trust_domain: level(&self.limits.trust_domain, errors),
        };
        let outputs = match &self.outputs {
            Some(o) if api != ModelApi::Predict => {
                errors.at(o, "outputs only applies to api: predict");
                OutputDetail::Full
            }
            Some(o) => OutputDetail::parse(&o.value).unwrap_or_else(|e| {
                errors.at(o, e);
                OutputDetail::Full
            }),
            None => OutputDetail::Full,
        };
        let input_width = self.input_width.as_ref().map(|w| {
            if api != ModelApi::Predict {
                errors.at(w, "input_width only applies to api: predict");
            } else if w.value == 0 || w.value > 65_536 {
                errors.at(w, "input_width must be between 1 and 65536");
            }
            w.value
        });
        let format = self.format(errors);
        let mut detection = self.detection.as_ref().map(|d| detection(d, errors));
        if let Some(d) = detection.as_mut() {
            d.reference = self.reference(input_width, errors);
        }
        self.warn_disarmed(&limits, errors);
        ModelRoute {
            name: self.name.value,
            paths,
            api,
            mode: self.mode,
            on_store_error: self.on_redis_error,
            max_body_bytes,
            max_response_bytes,
            default_max_tokens,
            limits,
            outputs,
            input_width,
            format,
            record: self.record.as_ref().and_then(|r| recording(r, errors)),
            detection,
        }
    }

    /// The detection reference, read and checked against the route.
    fn reference(
        &self,
        input_width: Option<usize>,
        errors: &mut Collector<'_>,
    ) -> Option<std::sync::Arc<Reference>> {
        let at = self.detection.as_ref()?.value.reference.as_ref()?;
        match Reference::load(errors.file(), &at.value) {
            Ok(r) if r.is_texts() != (self.api == ModelApi::Openai) => {
                errors.at(
                    at,
                    if r.is_texts() {
                        "a reference of texts is for api: openai (its embeddings calls); api: predict takes feature vectors, one JSON array per line"
                    } else {
                        "a reference of feature vectors is for api: predict; api: openai takes texts (for its embeddings calls), one JSON string per line"
                    },
                );
                None
            }
            Ok(r) if input_width.is_some_and(|w| w != r.width()) => {
                errors.at(
                    at,
                    format!(
                        "reference vectors have {} values, the route's input_width is {}",
                        r.width(),
                        input_width.unwrap_or_default()
                    ),
                );
                None
            }
            Ok(r) => {
                if !r.is_texts() && r.rows.len() < r.outlier_rows() {
                    errors.warn(
                        at,
                        format!(
                            "reference has {} vectors, fewer than the {} its outlier test needs: uniform-random and out-of-distribution queries are then caught by coverage cells alone; give more natural inputs",
                            r.rows.len(),
                            r.outlier_rows()
                        ),
                    );
                }
                Some(std::sync::Arc::new(r))
            }
            Err(e) => {
                errors.at(at, e);
                None
            }
        }
    }

    /// Warns about an LLM route whose logprobs or logit_bias nothing
    /// bounds, or whose detection is scaled to a hidden size nobody chose;
    /// and about predict detection that must learn natural from its callers.
    fn warn_disarmed(&self, limits: &Limits, errors: &mut Collector<'_>) {
        if let Some(d) = &self.detection
            && let Some(m) = &d.value.max_coverage
        {
            if self.api == ModelApi::Predict {
                errors.at(
                    m,
                    "max_coverage bounds the embeddings an openai route answers; a predict route has none",
                );
            }
        } else if let Some(d) = &self.detection
            && self.api == ModelApi::Openai
            && self.paths.iter().any(|p| p.value.contains("embeddings"))
        {
            errors.warn(
                d,
                format!(
                    "detection on route {:?} does not bound how much of the embedding space a caller is answered in: a crawl of natural-looking text is stopped only by a vectors budget; record a shadow-mode day (record: FILE) and set the max_coverage that `warden limits` proposes",
                    self.name.value
                ),
            );
        }
        if self.api == ModelApi::Predict {
            if let Some(d) = &self.detection
                && d.value.reference.is_none()
            {
                errors.warn(
                    d,
                    format!(
                        "detection on route {:?} has no reference: input-space coverage and the typical distance wait for the population's ~10,000 natural queries, which a small deployment may never reach; give natural inputs with reference: FILE",
                        self.name.value
                    ),
                );
            }
            return;
        }
        let levels = [limits.identity, limits.namespace, limits.trust_domain];
        let logprobs = !levels.iter().any(|l| l.max_top_logprobs == Some(0));
        let logit_bias = !levels.iter().any(|l| l.max_logit_bias == Some(0));
        if !logprobs && !logit_bias {
            return;
        }
        let what = match (logprobs, logit_bias) {
            (true, true) => "logprobs and logit_bias",
            (true, false) => "logprobs",
            _ => "logit_bias",
        };
        let budgeted = levels
            .iter()
            .any(|l| l.logprob_tokens_per_day.is_some() || l.logit_bias_per_day.is_some());
        match &self.detection {
            None if !budgeted => errors.warn(
                &self.name,
                format!(
                    "route {:?} allows {what} with neither detection nor a logprob_tokens_per_day or logit_bias_per_day budget: nothing bounds a logit-probing extraction (set max_top_logprobs: 0 and max_logit_bias: 0 if the model need not reveal them)",
                    self.name.value
                ),
            ),
            Some(d) if d.value.hidden_size.is_none() => errors.warn(
                d,
                format!(
                    "detection on route {:?} allows {what} but names no hidden_size: the probing signal assumes 4096 and starts only after 8 x 4096 revealed values; set the served model's hidden size (its config.json `hidden_size`)",
                    self.name.value
                ),
            ),
            Some(d) if d.value.hidden_size.is_some_and(|h| h > 32_768) => errors.warn(
                d,
                format!(
                    "hidden_size on route {:?} is larger than any served model's (at most 32768): the probing signal scales with it and would start late",
                    self.name.value
                ),
            ),
            _ => {}
        }
    }

    /// The predict format, with its pointers checked.
    fn format(&self, errors: &mut Collector<'_>) -> PredictFormat {
        let raw = self.format.as_ref();
        if let Some(f) = raw
            && self.api != ModelApi::Predict
        {
            errors.at(f, "format only applies to api: predict");
        }
        let json = raw.is_some_and(|f| f.value == RawFormat::Json);
        let custom = [
            ("input", self.input.as_ref()),
            ("output", self.output.as_ref()),
        ];
        if !json {
            for (what, v) in custom {
                if let Some(v) = v {
                    errors.at(v, format!("{what} only applies to format: json"));
                }
            }
            if let Some(f) = &self.fields {
                errors.at(f, "fields only applies to format: json");
            }
        }
        match raw.map(|f| f.value) {
            None | Some(RawFormat::Auto) => PredictFormat::Auto,
            Some(RawFormat::KserveV1) => PredictFormat::KserveV1,
            Some(RawFormat::TfServing) => PredictFormat::TfServing,
            Some(RawFormat::OpenInference) => PredictFormat::OpenInference,
            Some(RawFormat::Json) => {
                let mut pointer = |what: &str, v: Option<&Spanned<String>>| match v {
                    Some(p) if p.value.is_empty() || p.value.starts_with('/') => p.value.clone(),
                    Some(p) => {
                        errors.at(
                            p,
                            format!("{what} must be a JSON pointer: \"\" or starting with /"),
                        );
                        String::new()
                    }
                    None => {
                        if let Some(f) = raw {
                            errors.at(f, format!("format: json needs {what}: a JSON pointer"));
                        }
                        String::new()
                    }
                };
                PredictFormat::Json(JsonFormat {
                    input: pointer("input", self.input.as_ref()),
                    output: pointer("output", self.output.as_ref()),
                    fields: self
                        .fields
                        .as_ref()
                        .map(|f| f.value.clone())
                        .unwrap_or_default(),
                })
            }
        }
    }
}

/// The recording's path (relative to the config file's directory), whose
/// directory must exist.
fn recording(raw: &Spanned<String>, errors: &mut Collector<'_>) -> Option<std::path::PathBuf> {
    let path = crate::reference::beside(errors.file(), &raw.value);
    match path.parent() {
        Some(dir) if dir.as_os_str().is_empty() || dir.is_dir() => Some(path),
        _ => {
            errors.at(
                raw,
                format!("record: the directory of {} does not exist", path.display()),
            );
            None
        }
    }
}

fn limit_set(raw: &Spanned<RawLimitSet>, api: ModelApi, errors: &mut Collector<'_>) -> LimitSet {
    let r = &raw.value;
    if let Some(rps) = r.requests_per_second
        && !(rps.is_finite() && rps > 0.0 && rps <= 1e6)
    {
        errors.at(
            raw,
            "requests_per_second must be above 0 and at most 1000000",
        );
    }
    if r.burst.is_some() && r.requests_per_second.is_none() {
        errors.at(raw, "burst needs requests_per_second");
    }
    if r.burst == Some(0) {
        errors.at(raw, "burst must be at least 1");
    }
    let zero = [
        ("tokens_per_minute", r.tokens_per_minute),
        ("tokens_per_day", r.tokens_per_day),
        ("concurrent", r.concurrent.map(u64::from)),
        ("logprob_tokens_per_day", r.logprob_tokens_per_day),
        ("logit_bias_per_day", r.logit_bias_per_day),
        ("vectors_per_day", r.vectors_per_day),
    ];
    for (what, v) in zero {
        if v == Some(0) {
            errors.at(
                raw,
                format!("{what} must be at least 1 (leave it out for no limit)"),
            );
        }
    }
    if api == ModelApi::Predict {
        let llm_only = [
            ("tokens_per_minute", r.tokens_per_minute.is_some()),
            ("tokens_per_day", r.tokens_per_day.is_some()),
            ("logprob_tokens_per_day", r.logprob_tokens_per_day.is_some()),
            ("max_top_logprobs", r.max_top_logprobs.is_some()),
            ("logit_bias_per_day", r.logit_bias_per_day.is_some()),
            ("max_logit_bias", r.max_logit_bias.is_some()),
        ];
        for (what, set) in llm_only {
            if set {
                errors.at(raw, format!("{what} only applies to api: openai"));
            }
        }
    }
    let burst = r.burst.unwrap_or_else(|| {
        r.requests_per_second
            .map(|rps| rps.ceil().clamp(1.0, 1e6) as u32)
            .unwrap_or(1)
    });
    LimitSet {
        requests_per_second: r.requests_per_second,
        burst,
        tokens_per_minute: r.tokens_per_minute,
        tokens_per_day: r.tokens_per_day,
        concurrent: r.concurrent,
        logprob_tokens_per_day: r.logprob_tokens_per_day,
        max_top_logprobs: r.max_top_logprobs,
        logit_bias_per_day: r.logit_bias_per_day,
        max_logit_bias: r.max_logit_bias,
        vectors_per_day: r.vectors_per_day,
    }
}

fn detection(raw: &Spanned<RawDetection>, errors: &mut Collector<'_>) -> DetectionConfig {
    let r = &raw.value;
    let d = DetectionConfig::default();
    let max_identities = r.max_identities.unwrap_or(d.max_identities);
    if !(1..=1_000_000).contains(&max_identities) {
        errors.at(raw, "max_identities must be between 1 and 1000000");
    }
    let history = r.history.unwrap_or(d.history);
    if !(16..=4096).contains(&history) {
        errors.at(raw, "history must be between 16 and 4096");
    }
    let population = r.population.unwrap_or(d.population);
    if !(512..=10_000_000).contains(&population) {
        errors.at(raw, "population must be between 512 and 10000000");
    }
    let hidden_size = r.hidden_size.unwrap_or(d.hidden_size);
    if hidden_size < 16 {
        errors.at(raw, "hidden_size must be at least 16");
    }
    let ladder = match &r.ladder {
        Some(l) => {
            let v = &l.value;
            let steps = [v.warn, v.degrade, v.refuse, v.deny];
            if steps
                .iter()
                .any(|s| !(s.is_finite() && *s > 0.0 && *s <= 1.0))
                || steps.windows(2).any(|w| w[0] > w[1])
            {
                errors.at(
                    l,
                    "ladder scores must be in (0, 1] and non-decreasing: warn <= degrade <= refuse <= deny",
                );
            }
            Some(LadderConfig {
                warn: v.warn,
                degrade: v.degrade,
                refuse: v.refuse,
                deny: v.deny,
            })
        }
        None => None,
    };
    let degrade_outputs = match &r.degrade_outputs {
        Some(s) => OutputDetail::parse(s).unwrap_or_else(|e| {
            errors.at(raw, e);
            d.degrade_outputs
        }),
        None => d.degrade_outputs,
    };
    let max_coverage = r.max_coverage.as_ref().map(|m| {
        if !(m.value.is_finite() && m.value > 0.0 && m.value <= 1.0) {
            errors.at(
                m,
                "max_coverage is a share of the embedding space: in (0, 1]",
            );
        }
        m.value
    });
    DetectionConfig {
        max_identities,
        history,
        hidden_size,
        population,
        ladder,
        degrade_outputs,
        report_to_ca: r.report_to_ca,
        reference: None,
        max_coverage,
    }
}
