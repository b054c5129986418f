//! The proxy's config file: where its identity comes from, the admin
//! listener, inbound listeners (with their authorization policy and limits)
//! and outbound listeners. `warden check --config F` and `warden proxy`
//! both go through [`ProxyConfig::load`]; nothing starts on any error.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::diagnostic::{Collector, Diagnostics, Warnings, load_yaml, parse_yaml};
use crate::duration::HumanDuration;
use crate::lint::never_matching;
use crate::model::{ModelRoute, RawModelRoute, validate_routes};
use crate::pattern::IdentityPattern;
use crate::policy::{Listener, RawRule, validate_rules};
use crate::ratelimit::{RawRateLimit, validate_rate_limits};
use crate::spiffe::{SpiffeId, TrustDomain};

pub use crate::pattern::PathMatch;
pub use crate::policy::{Action, Policy, PolicyMode, Rate, RateLimit, RateOverride, Rule};

/// A validated proxy config.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    /// Where the workload's certificate comes from.
    pub identity: IdentitySource,
    /// Admin listener address (`/live`, `/ready`, `/metrics`).
    pub admin: SocketAddr,
    /// Runtime worker threads.
    pub workers: usize,
    /// How long SIGTERM waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Listeners that accept mTLS and forward to the local app.
    pub inbound: Vec<Inbound>,
    /// Plain local listeners that the app calls; warden originates mTLS.
    pub outbound: Vec<Outbound>,
    /// Redis URL: when set, model API limits live there and are shared by
    /// every proxy pointing at it.
    pub redis: Option<String>,
}

/// Where the proxy's config is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A YAML file, reloaded when it changes or on SIGHUP.
    File(PathBuf),
    /// The YAML text of an environment variable (what `warden inject` gives
    /// a sidecar: no ConfigMap to keep in sync; the pod rolls to change it).
    Env(String),
}

impl ConfigSource {
    /// Reads and validates the config.
    pub fn load(&self) -> Result<ProxyConfig, Diagnostics> {
        match self {
            ConfigSource::File(path) => ProxyConfig::load(path),
            ConfigSource::Env(name) => {
                let shown = PathBuf::from(format!("${name}"));
                let text = std::env::var(name).map_err(|e| {
                    Diagnostics(vec![crate::Diagnostic {
                        file: shown.clone(),
                        line: 0,
                        column: 0,
                        message: format!("cannot read the environment variable: {e}"),
                    }])
                })?;
                ProxyConfig::parse(&shown, &text)
            }
        }
    }

    /// The file, when it is one (watched for changes).
    pub fn file(&self) -> Option<&Path> {
        match self {
            ConfigSource::File(p) => Some(p),
            ConfigSource::Env(_) => None,
        }
    }
}

/// Where the proxy's X.509-SVID comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// Certificate, key and bundle files, reloaded when they change.
    Files {
        /// Leaf then intermediates, PEM.
        cert: PathBuf,
        /// Private key, PEM.
        key: PathBuf,
        /// Trust roots, PEM.
        bundle: PathBuf,
    },
    /// A warden CA: bootstrap with a join token, then renew over mTLS.
    Ca {
        /// `https://host:port` of the CA.
        url: String,
        /// The CA's trust bundle, to verify the CA before the first certificate.
        bundle: PathBuf,
        /// File holding the one-time join token.
        token_file: PathBuf,
        /// The identity to obtain.
        spiffe_id: SpiffeId,
        /// Requested certificate lifetime (the CA caps it).
        ttl: Option<Duration>,
        /// Where the current certificate and key are kept (0600, written
        /// atomically), so that a restart serves them at once and renews
        /// instead of needing a new token.
        state_dir: Option<PathBuf>,
    },
    /// A warden CA, attesting this pod by its projected ServiceAccount
    /// token (re-read at every attestation: the kubelet rotates it); renewed
    /// over mTLS, and attested again after any restart.
    Kubernetes {
        /// `https://host:port` of the CA.
        url: String,
        /// The CA's trust bundle: a file, or the PEM itself (`bundle_pem`,
        /// what `warden inject` writes: the trust anchors travel with the
        /// pod spec, as Linkerd's do).
        bundle: Bundle,
        /// The projected token (audience `warden`).
        token_file: PathBuf,
        /// The trust domain, when given or read here from the bundle; else
        /// the proxy reads it from the bundle at start.
        trust_domain: Option<TrustDomain>,
        /// Requested certificate lifetime (the CA caps it).
        ttl: Option<Duration>,
    },
}

/// A trust bundle, in a file or inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bundle {
    /// A PEM file.
    File(PathBuf),
    /// PEM text.
    Pem(String),
}

/// Where a pod's projected ServiceAccount token is mounted by default
/// (the volume `warden inject` adds).
pub const DEFAULT_K8S_TOKEN_FILE: &str = "/var/run/secrets/tokens/warden";

/// Application protocol of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 or h2 (by ALPN) on the mTLS side.
    Http,
    /// Opaque bytes after the handshake and the identity check.
    Tcp,
}

/// Limits on one listener, each with a safe default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// Longest TLS handshake.
    pub handshake_timeout: Duration,
    /// Longest time to receive a request's headers (HTTP/1.1).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// Largest request header section (the request target and every
    /// header line), in bytes; 431 beyond.
    pub max_header_bytes: usize,
    /// Largest single header line (name and value), in bytes; 431 beyond.
    pub max_header_line_bytes: usize,
    /// Most request headers; 431 beyond.
    pub max_headers: usize,
    /// Most concurrent h2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Most requests in flight on the listener (503 beyond).
    pub max_requests_in_flight: usize,
    /// Longest time to open a connection to the upstream (the app
    /// inbound, the destination outbound); 504 beyond.
    pub connect_timeout: Duration,
    /// Longest time from sending a request to the upstream's response
    /// head; 504 beyond. A streamed answer that has started is not cut.
    pub response_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            // nginx's `large_client_header_buffers 4 8k`: a line of at most
            // 8 KiB, 32 KiB in all; Envoy's 100 headers.
            max_header_bytes: 32 * 1024,
            max_header_line_bytes: 8 * 1024,
            max_headers: 100,
            max_concurrent_streams: 128,
            max_requests_in_flight: 10_000,
            connect_timeout: Duration::from_secs(5),
            // Long enough for a model's non-streamed completion.
            response_timeout: Duration::from_secs(120),
        }
    }
}

/// An inbound listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    /// Name used in metrics and logs.
    pub name: String,
    /// Where to accept mTLS.
    pub listen: SocketAddr,
    /// The local app to forward to.
    pub app: SocketAddr,
    /// HTTP or TCP.
    pub protocol: Protocol,
    /// Speak h2 without TLS (h2c) to the app instead of HTTP/1.1.
    pub app_h2c: bool,
    /// Who may call.
    pub policy: Policy,
    /// Resource limits.
    pub limits: Limits,
    /// Protected model API routes (rate limits, token budgets, extraction detection).
    pub model_api: Vec<ModelRoute>,
}

/// An outbound listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Outbound {
    /// Name used in metrics and logs.
    pub name: String,
    /// Plain local listener for the app.
    pub listen: SocketAddr,
    /// `host:port` of the destination's mTLS listener.
    pub destination: String,
    /// The identity the destination must prove.
    pub server_id: IdentityPattern,
    /// HTTP or TCP.
    pub protocol: Protocol,
    /// Share upstream mTLS connections between the app's connections (the
    /// default). `false`: one upstream connection per app connection.
    pub pool: bool,
    /// Resource limits.
    pub limits: Limits,
}

// ---- the file's shape, with locations for the checks made after parsing ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    identity: Spanned<RawIdentity>,
    admin: SocketAddr,
    #[serde(default)]
    workers: Option<Spanned<usize>>,
    #[serde(default)]
    drain_timeout: Option<HumanDuration>,
    #[serde(default)]
    inbound: Vec<Spanned<RawInbound>>,
    #[serde(default)]
    outbound: Vec<Spanned<RawOutbound>>,
    #[serde(default)]
    redis: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    bundle: Option<PathBuf>,
    ca_url: Option<String>,
    token_file: Option<PathBuf>,
    spiffe_id: Option<SpiffeId>,
    ttl: Option<HumanDuration>,
    state_dir: Option<PathBuf>,
    kubernetes: Option<Spanned<RawKubernetesIdentity>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetesIdentity {
    ca_url: String,
    bundle: Option<PathBuf>,
    bundle_pem: Option<String>,
    token_file: Option<PathBuf>,
    trust_domain: Option<TrustDomain>,
    ttl: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    name: Spanned<String>,
    listen: SocketAddr,
    app: SocketAddr,
    #[serde(default = "http")]
    protocol: Protocol,
    #[serde(default)]
    app_h2c: bool,
    #[serde(default)]
    policy: Option<RawPolicy>,
    /// An environment variable holding the whole policy instead, as one
    /// YAML or JSON value (the sidecar's from a ConfigMap).
    policy_env: Option<Spanned<String>>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    model_api: Vec<RawModelRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbound {
    name: Spanned<String>,
    listen: SocketAddr,
    destination: String,
    server_id: IdentityPattern,
    #[serde(default = "http")]
    protocol: Protocol,
    #[serde(default = "yes")]
    pool: bool,
    #[serde(default)]
    limits: RawLimits,
}

fn yes() -> bool {
    true
}

fn http() -> Protocol {
    Protocol::Http
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    mode: PolicyMode,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    rate_limits: Vec<Spanned<RawRateLimit>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<usize>,
    handshake_timeout: Option<HumanDuration>,
    header_read_timeout: Option<HumanDuration>,
    idle_timeout: Option<HumanDuration>,
    max_header_bytes: Option<usize>,
    max_header_line_bytes: Option<usize>,
    max_headers: Option<usize>,
    max_concurrent_streams: Option<u32>,
    max_requests_in_flight: Option<usize>,
    connect_timeout: Option<HumanDuration>,
    response_timeout: Option<HumanDuration>,
}

impl RawLimits {
    fn resolve(self) -> Limits {
        let d = Limits::default();
        let dur = |v: Option<HumanDuration>, def| v.map(|h| h.0).unwrap_or(def);
        Limits {
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            handshake_timeout: dur(self.handshake_timeout, d.handshake_timeout),
            header_read_timeout: dur(self.header_read_timeout, d.header_read_timeout),
            idle_timeout: dur(self.idle_timeout, d.idle_timeout),
            max_header_bytes: self.max_header_bytes.unwrap_or(d.max_header_bytes),
            max_header_line_bytes: self
                .max_header_line_bytes
                .unwrap_or(d.max_header_line_bytes),
            max_headers: self.max_headers.unwrap_or(d.max_headers),
            max_concurrent_streams: self
                .max_concurrent_streams
                .unwrap_or(d.max_concurrent_streams),
            max_requests_in_flight: self
                .max_requests_in_flight
                .unwrap_or(d.max_requests_in_flight),
            connect_timeout: dur(self.connect_timeout, d.connect_timeout),
            response_timeout: dur(self.response_timeout, d.response_timeout),
        }
    }
}

impl ProxyConfig {
    /// Loads and validates a proxy config file.
    pub fn load(path: &Path) -> Result<Self, Diagnostics> {
        Self::validate(path, load_yaml(path)?, |_| None, &process_env).map(|(c, _)| c)
    }

    /// Parses and validates config text (`path` is used in messages only).
    pub fn parse(path: &Path, text: &str) -> Result<Self, Diagnostics> {
        Self::validate(path, parse_yaml(path, text)?, |_| None, &process_env).map(|(c, _)| c)
    }

    /// What `warden check` does: [`ProxyConfig::load`], plus warnings about
    /// rules that can never match. Patterns are compared with the proxy's
    /// trust domain (every caller is in it): the one of `identity.spiffe_id`
    /// for an identity from a CA; for certificate files, what
    /// `cert_trust_domain` reads from the certificate file (None, e.g. the
    /// file is not there yet: those checks are skipped).
    pub fn check(
        path: &Path,
        cert_trust_domain: impl FnOnce(&Path) -> Option<TrustDomain>,
    ) -> Result<(Self, Warnings), Diagnostics> {
        Self::validate(path, load_yaml(path)?, cert_trust_domain, &process_env)
    }

    /// [`ProxyConfig::check`] on config text.
    pub fn check_text(
        path: &Path,
        text: &str,
        cert_trust_domain: impl FnOnce(&Path) -> Option<TrustDomain>,
    ) -> Result<(Self, Warnings), Diagnostics> {
        Self::validate(
            path,
            parse_yaml(path, text)?,
            cert_trust_domain,
            &process_env,
        )
    }

    fn validate(
        path: &Path,
        raw: RawConfig,
        cert_trust_domain: impl FnOnce(&Path) -> Option<TrustDomain>,
        env: &Env,
    ) -> Result<(Self, Warnings), Diagnostics> {
        let mut errors = Collector::new(path);
        let base = path.parent().unwrap_or(Path::new("."));
        let (identity, trust_domain) =
            match identity_source(&raw.identity, base, &mut errors, cert_trust_domain) {
                Some((source, td)) => (Some(source), td),
                None => (None, None),
            };
        let workers = match &raw.workers {
            Some(w) if w.value == 0 || w.value > 256 => {
                errors.at(w, "workers must be between 1 and 256");
                1
            }
            Some(w) => w.value,
            None => 1,
        };

        let mut names = HashSet::new();
        let mut addrs = vec![raw.admin];
        let mut check_listener =
            |name: &Spanned<String>, listen: SocketAddr, errors: &mut Collector<'_>| {
                let n = &name.value;
                if n.is_empty()
                    || n.len() > 64
                    || !n
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    errors.at(
                        name,
                        "listener name must be 1-64 letters, digits, '-' or '_'",
                    );
                } else if !names.insert(n.clone()) {
                    errors.at(name, format!("listener name {n:?} is used twice"));
                }
                if listen.port() != 0 {
                    if let Some(other) = addrs.iter().find(|a| binds_overlap(**a, listen)) {
                        errors.at(
                            name,
                            if *other == listen {
                                format!("listen address {listen} is used twice")
                            } else {
                                format!("listen address {listen} overlaps {other} (same port)")
                            },
                        );
                    }
                    addrs.push(listen);
                }
            };

        let mut inbound = Vec::new();
        for l in raw.inbound {
            let (l, loc) = (l.value, l.referenced);
            check_listener(&l.name, l.listen, &mut errors);
            let on = Listener {
                tcp: l.protocol == Protocol::Tcp,
                port: Some(l.listen.port()).filter(|p| *p != 0),
                trust_domain: trust_domain.as_ref(),
            };
            // A policy from the environment is checked as its own text:
            // its errors name the variable, with its own lines.
            let env_file = l
                .policy_env
                .as_ref()
                .map(|e| PathBuf::from(format!("${}", e.value)));
            let policy = match (l.policy, &l.policy_env) {
                (Some(_), Some(name)) => {
                    errors.at(
                        name,
                        "policy and policy_env are exclusive: give the policy in the file or name the variable that holds it",
                    );
                    RawPolicy::default()
                }
                (None, Some(name)) => policy_from_env(name, env, &mut errors).unwrap_or_default(),
                (policy, None) => policy.unwrap_or_default(),
            };
            let mut env_errors = env_file.as_deref().map(Collector::new);
            let (rules, rate_limits) = match env_errors.as_mut() {
                Some(c) => check_policy(policy.rules, policy.rate_limits, &on, c),
                None => check_policy(policy.rules, policy.rate_limits, &on, &mut errors),
            };
            if let Some(c) = env_errors {
                errors.absorb(c);
            }
            if l.app_h2c && l.protocol == Protocol::Tcp {
                errors.at_location(loc, "app_h2c only applies to protocol: http");
            }
            if !l.model_api.is_empty() && l.protocol == Protocol::Tcp {
                errors.at_location(loc, "model_api only applies to protocol: http");
            }
            let model_api = validate_routes(l.model_api, &mut errors);
            inbound.push(Inbound {
                name: l.name.value,
                listen: l.listen,
                app: l.app,
                protocol: l.protocol,
                app_h2c: l.app_h2c,
                policy: Policy {
                    mode: policy.mode,
                    rules: rules.into_iter().map(|(r, _)| r).collect(),
                    rate_limits,
                },
                limits: l.limits.resolve(),
                model_api,
            });
        }

        let redis = raw.redis.map(|r| {
            if !(r.value.starts_with("redis://") || r.value.starts_with("unix://")) {
                errors.at(&r, "redis must be a redis:// or unix:// URL");
            }
            r.value
        });

        let mut outbound = Vec::new();
        for o in raw.outbound {
            let o = o.value;
            check_listener(&o.name, o.listen, &mut errors);
            if !valid_host_port(&o.destination) {
                errors.at(
                    &o.name,
                    format!("destination {:?} must be host:port", o.destination),
                );
            }
            outbound.push(Outbound {
                name: o.name.value,
                listen: o.listen,
                destination: o.destination,
                server_id: o.server_id,
                protocol: o.protocol,
                pool: o.pool,
                limits: o.limits.resolve(),
            });
        }

        errors.finish_with_warnings(ProxyConfig {
            identity: identity.unwrap_or(IdentitySource::Files {
                cert: PathBuf::new(),
                key: PathBuf::new(),
                bundle: PathBuf::new(),
            }),
            admin: raw.admin,
            workers,
            drain_timeout: raw
                .drain_timeout
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(10)),
            inbound,
            outbound,
            redis,
        })
    }
}

/// Whether two listen addresses cannot both be bound: the same port on the
/// same address (an IPv4-mapped one is its IPv4 address; link-local ones
/// of different interfaces differ), or on a wildcard that covers the
/// other. `[::]` is bound dual-stack (`warden_identity::listen`), so it
/// covers every address; `0.0.0.0` covers the IPv4 ones.
fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let scope = |s: SocketAddr| match s {
        SocketAddr::V6(v6) => v6.scope_id(),
        SocketAddr::V4(_) => 0,
    };
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    let covers = |wild: IpAddr, other: IpAddr| match wild {
        IpAddr::V6(w) => w.is_unspecified(),
        IpAddr::V4(w) => w.is_unspecified() && other.is_ipv4(),
    };
    a.port() == b.port() && ((x == y && scope(a) == scope(b)) || covers(x, y) || covers(y, x))
}

fn valid_host_port(s: &str) -> bool {
    matches!(s.rsplit_once(':'), Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0))
}

/// Relative paths in the config are relative to the config file's directory.
fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// The identity source, and the trust domain it is in when known here
/// (`trust_domain_of` reads it from a certificate or bundle file).
fn identity_source(
    raw: &Spanned<RawIdentity>,
    base: &Path,
    errors: &mut Collector<'_>,
    trust_domain_of: impl FnOnce(&Path) -> Option<TrustDomain>,
) -> Option<(IdentitySource, Option<TrustDomain>)> {
    let r = &raw.value;
    if let Some(k) = &r.kubernetes {
        if r.cert.is_some()
            || r.key.is_some()
            || r.bundle.is_some()
            || r.ca_url.is_some()
            || r.token_file.is_some()
            || r.spiffe_id.is_some()
            || r.ttl.is_some()
            || r.state_dir.is_some()
        {
            errors.at(
                raw,
                "identity `kubernetes:` takes its own `ca_url`, `bundle`, `token_file`, `trust_domain` and `ttl`; nothing else goes beside it",
            );
            return None;
        }
        let bundle = match (&k.value.bundle, &k.value.bundle_pem) {
            (Some(f), None) => Bundle::File(resolve(base, f)),
            (None, Some(pem)) => Bundle::Pem(pem.clone()),
            _ => {
                errors.at(
                    k,
                    "identity `kubernetes:` needs `bundle` (a file) or `bundle_pem`, one of them",
                );
                return None;
            }
        };
        let trust_domain = k.value.trust_domain.clone().or_else(|| match &bundle {
            Bundle::File(f) => trust_domain_of(f),
            // Read by the proxy at start.
            Bundle::Pem(_) => None,
        });
        if !valid_url(&k.value.ca_url) {
            errors.at(
                k,
                format!("ca_url {:?} needs a host and a port", k.value.ca_url),
            );
        }
        let source = IdentitySource::Kubernetes {
            url: k.value.ca_url.clone(),
            bundle,
            token_file: k.value.token_file.as_ref().map_or_else(
                || PathBuf::from(DEFAULT_K8S_TOKEN_FILE),
                |f| resolve(base, f),
            ),
            trust_domain: trust_domain.clone(),
            ttl: k.value.ttl.map(|t| t.0),
        };
        return Some((source, trust_domain));
    }
    let Some(bundle) = &r.bundle else {
        errors.at(raw, "identity needs `bundle` (the trust roots)");
        return None;
    };
    let bundle = resolve(base, bundle);
    match (&r.cert, &r.key, &r.ca_url) {
        (Some(cert), Some(key), None)
            if r.token_file.is_none() && r.spiffe_id.is_none() && r.state_dir.is_none() =>
        {
            let cert = resolve(base, cert);
            let td = trust_domain_of(&cert);
            let source = IdentitySource::Files {
                cert,
                key: resolve(base, key),
                bundle,
            };
            Some((source, td))
        }
        (None, None, Some(url)) => match (&r.token_file, &r.spiffe_id) {
            (Some(token_file), Some(id)) => Some((
                IdentitySource::Ca {
                    url: url.clone(),
                    bundle,
                    token_file: resolve(base, token_file),
                    spiffe_id: id.clone(),
                    ttl: r.ttl.map(|t| t.0),
                    state_dir: r.state_dir.as_ref().map(|d| resolve(base, d)),
                },
                Some(id.trust_domain()),
            )),
            _ => {
                errors.at(
                    raw,
                    "identity from a CA needs `ca_url`, `token_file` and `spiffe_id`",
                );
                None
            }
        },
        _ => {
            errors.at(
                raw,
                "identity is files (`cert`, `key`, `bundle`), a CA (`ca_url`, `token_file`, `spiffe_id`, `bundle`, `state_dir`) or `kubernetes:`",
            );
            None
        }
    }
}

/// How the environment is read (tests give their own).
type Env = dyn Fn(&str) -> Result<String, std::env::VarError>;

fn process_env(name: &str) -> Result<String, std::env::VarError> {
    std::env::var(name)
}

/// An inbound policy's rules and rate limits, checked, with warnings about
/// rules that can never match.
fn check_policy(
    rules: Vec<Spanned<RawRule>>,
    rate_limits: Vec<Spanned<RawRateLimit>>,
    on: &Listener<'_>,
    errors: &mut Collector<'_>,
) -> (Vec<(Rule, serde_saphyr::Location)>, Vec<RateLimit>) {
    let rules = validate_rules(rules, on, errors);
    let rate_limits = validate_rate_limits(rate_limits, &rules, on, errors);
    never_matching(&rules, on, errors);
    (rules, rate_limits)
}

/// The policy held by the environment variable `env` names: one YAML (or
/// JSON) value that must be a whole policy, so that whatever it holds can
/// never add a listener or change anything else in the config.
fn policy_from_env(
    env: &Spanned<String>,
    lookup: &Env,
    errors: &mut Collector<'_>,
) -> Option<RawPolicy> {
    let name = &env.value;
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        errors.at(
            env,
            format!(
                "policy_env {name:?} must be an environment variable name (letters, digits, '_')"
            ),
        );
        return None;
    }
    let text = match lookup(name) {
        Ok(t) => t,
        Err(e) => {
            errors.at(
                env,
                format!("policy_env {name}: cannot read the environment variable: {e}"),
            );
            return None;
        }
    };
    if text.trim().is_empty() {
        errors.at(env, format!("policy_env {name}: the environment variable is empty; it must hold the listener's whole policy"));
        return None;
    }
    if text.len() as u64 > crate::diagnostic::MAX_CONFIG_BYTES {
        errors.at(
            env,
            format!(
                "policy_env {name}: the environment variable is {} bytes, more than the limit of {}",
                text.len(),
                crate::diagnostic::MAX_CONFIG_BYTES
            ),
        );
        return None;
    }
    match parse_yaml::<RawPolicy>(Path::new(&format!("${name}")), &text) {
        Ok(p) => Some(p),
        Err(problems) => {
            errors.extend(problems);
            None
        }
    }
}

fn valid_url(url: &str) -> bool {
    valid_host_port(
        url.strip_prefix("https://")
            .unwrap_or(url)
            .trim_end_matches('/'),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ProxyConfig, Diagnostics> {
        ProxyConfig::parse(Path::new("/etc/warden/proxy.yaml"), text)
    }

    const SIDECAR: &str = "\
identity:
  cert: cert.pem
  key: key.pem
  bundle: bundle.pem
admin: 127.0.0.1:9901
inbound:
  - name: web
    listen: 0.0.0.0:8443
    app: 127.0.0.1:8080
    policy:
      rules:
        - name: shop-reads
          action: allow
          from: [spiffe://example.org/ns/shop/*]
          methods: [get, HEAD]
          paths: [/api/*, /healthz]
        - name: no-admin
          action: deny
          from: [spiffe://example.org/*]
          paths: [/admin/*]
outbound:
  - name: orders
    listen: 127.0.0.1:15001
    destination: orders.shop.svc:8443
    server_id: spiffe://example.org/ns/shop/sa/orders
";

    #[test]
    fn a_full_sidecar_config_parses() {
        let c = parse(SIDECAR).unwrap();
        assert_eq!(
            c.identity,
            IdentitySource::Files {
                cert: "/etc/warden/cert.pem".into(),
                key: "/etc/warden/key.pem".into(),
                bundle: "/etc/warden/bundle.pem".into(),
            }
        );
        let r = &c.inbound[0].policy.rules[0];
        assert_eq!(r.methods, vec!["GET", "HEAD"]);
        assert_eq!(
            r.paths,
            vec![
                PathMatch::Prefix("/api/".into()),
                PathMatch::Exact("/healthz".into())
            ]
        );
        assert_eq!(c.inbound[0].policy.mode, PolicyMode::Enforce);
        assert_eq!(c.inbound[0].limits, Limits::default());
        assert_eq!(c.outbound[0].protocol, Protocol::Http);
        assert_eq!(c.workers, 1);
    }

    #[test]
    fn wildcard_listeners_overlap_what_they_cover() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        for (x, y) in [
            ("0.0.0.0:8443", "0.0.0.0:8443"),
            ("[::]:8443", "0.0.0.0:8443"),
            ("[::]:8443", "127.0.0.1:8443"),
            ("[::]:8443", "[::1]:8443"),
            ("0.0.0.0:8443", "10.0.0.1:8443"),
            ("0.0.0.0:8443", "[::ffff:10.0.0.1]:8443"),
            ("127.0.0.1:8443", "[::ffff:127.0.0.1]:8443"),
            ("[::ffff:0.0.0.0]:8443", "10.0.0.1:8443"),
            ("[fe80::1%2]:8443", "[fe80::1%2]:8443"),
        ] {
            assert!(binds_overlap(a(x), a(y)), "{x} {y}");
            assert!(binds_overlap(a(y), a(x)), "{y} {x}");
        }
        for (x, y) in [
            ("0.0.0.0:8443", "[::1]:8443"),
            ("127.0.0.1:8443", "127.0.0.2:8443"),
            ("[::]:8443", "[::]:8444"),
            ("127.0.0.1:8443", "[::1]:8443"),
            ("[fe80::1%2]:8443", "[fe80::1%3]:8443"),
        ] {
            assert!(!binds_overlap(a(x), a(y)), "{x} {y}");
        }
        let text = SIDECAR.replace("listen: 127.0.0.1:15001", "listen: \"[::]:8443\"");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("listen address [::]:8443 overlaps 0.0.0.0:8443 (same port)"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_line_and_column_and_are_all_reported() {
        let text = SIDECAR
            .replace("listen: 127.0.0.1:15001", "listen: 0.0.0.0:8443")
            .replace("paths: [/admin/*]", "paths: [/admin/../x]");
        let e = parse(&text).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("/etc/warden/proxy.yaml:20:19: path \"/admin/../x\" is not in normal form"),
            "{s}"
        );
        assert!(
            s.contains("/etc/warden/proxy.yaml:22:11: listen address 0.0.0.0:8443 is used twice"),
            "{s}"
        );
    }

    #[test]
    fn predict_formats_and_their_pointers_are_checked() {
        let route = |keys: &str| {
            SIDECAR.replace(
                "    policy:\n",
                &format!("    model_api:\n      - name: m\n        paths: [/predict]\n{keys}    policy:\n"),
            )
        };
        let ok = parse(&route(
            "        api: predict\n        format: json\n        input: /data\n        output: \"\"\n        fields: [model]\n",
        ))
        .unwrap();
        assert_eq!(
            ok.inbound[0].model_api[0].format,
            crate::model::PredictFormat::Json(crate::model::JsonFormat {
                input: "/data".into(),
                output: String::new(),
                fields: vec!["model".into()],
            })
        );
        let oip = parse(&route(
            "        api: predict\n        format: open_inference\n",
        ))
        .unwrap();
        assert_eq!(
            oip.inbound[0].model_api[0].format,
            crate::model::PredictFormat::OpenInference
        );
        for (keys, says) in [
            (
                "        api: predict\n        format: json\n        output: /y\n",
                "format: json needs input",
            ),
            (
                "        api: predict\n        format: json\n        input: data\n        output: /y\n",
                "input must be a JSON pointer",
            ),
            (
                "        api: predict\n        input: /x\n",
                "input only applies to format: json",
            ),
            (
                "        api: openai\n        format: kserve_v1\n",
                "format only applies to api: predict",
            ),
            (
                "        api: predict\n        format: onnx\n",
                "unknown variant",
            ),
        ] {
            let e = parse(&route(keys)).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("proxy.yaml:"), "{keys}: {e}");
        }
    }

    #[test]
    fn a_detection_reference_is_read_from_beside_the_config_and_checked() {
        let dir = std::env::temp_dir().join(format!("warden-ref-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good: String = (0..40).map(|i| format!("[{i}, 1.5, 2]\n")).collect();
        std::fs::write(dir.join("natural.jsonl"), format!("# sample\n{good}")).unwrap();
        std::fs::write(dir.join("bad.jsonl"), format!("{good}[1, 2]\n")).unwrap();
        let route = |reference: &str, width: usize| {
            SIDECAR.replace(
                "    policy:\n",
                &format!("    model_api:\n      - name: m\n        paths: [/predict]\n        api: predict\n        input_width: {width}\n        detection:\n          reference: {reference}\n    policy:\n"),
            )
        };
        let config = dir.join("proxy.yaml");
        let parse_at = |text: &str| ProxyConfig::parse(&config, text);
        let ok = parse_at(&route("natural.jsonl", 3)).unwrap();
        let r = ok.inbound[0].model_api[0]
            .detection
            .as_ref()
            .and_then(|d| d.reference.clone())
            .unwrap();
        assert_eq!((r.rows.len(), r.width()), (40, 3));
        for (reference, width, says) in [
            (
                "bad.jsonl",
                3,
                "bad.jsonl:41: 2 values, where the first vector has 3",
            ),
            (
                "natural.jsonl",
                4,
                "reference vectors have 3 values, the route's input_width is 4",
            ),
            ("missing.jsonl", 3, "cannot read reference"),
        ] {
            let e = parse_at(&route(reference, width)).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("proxy.yaml:"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_identity_pattern_is_located() {
        let e = parse(&SIDECAR.replace("ns/shop/*]", "ns/*/x]")).unwrap_err();
        assert_eq!(
            (e.0[0].line, e.0[0].file.display().to_string()),
            (14, "/etc/warden/proxy.yaml".into()),
            "{e}"
        );
        assert!(e.0[0].message.contains("'*'"), "{e}");
    }

    #[test]
    fn tcp_rules_match_identities_only() {
        let text = SIDECAR.replace(
            "    app: 127.0.0.1:8080\n",
            "    app: 127.0.0.1:8080\n    protocol: tcp\n",
        );
        let e = parse(&text).unwrap_err();
        assert!(
            e.to_string()
                .contains("tcp listener's rules can only match `from`"),
            "{e}"
        );
    }

    #[test]
    fn identity_is_files_or_a_ca() {
        let e = parse(&SIDECAR.replace("  key: key.pem\n", "")).unwrap_err();
        assert!(e.to_string().contains("identity is files"), "{e}");
        let ca = SIDECAR.replace(
            "  cert: cert.pem\n  key: key.pem\n",
            "  ca_url: https://ca:8443\n  token_file: /run/token\n  spiffe_id: spiffe://example.org/web\n",
        );
        assert!(matches!(
            parse(&ca).unwrap().identity,
            IdentitySource::Ca { .. }
        ));
    }

    /// A config whose inbound listener reads its policy from `WARDEN_POLICY`,
    /// which holds `policy`.
    fn with_env_policy(policy: &str) -> Result<ProxyConfig, Diagnostics> {
        let text = "identity: {cert: cert.pem, key: key.pem, bundle: bundle.pem}\n\
                    admin: 127.0.0.1:9901\n\
                    inbound:\n  - {name: app, listen: 0.0.0.0:4143, app: 127.0.0.1:8080, policy_env: WARDEN_POLICY}\n";
        let policy = policy.to_owned();
        let env = move |name: &str| match name {
            "WARDEN_POLICY" => Ok(policy.clone()),
            _ => Err(std::env::VarError::NotPresent),
        };
        let raw = parse_yaml(Path::new("$WARDEN_PROXY_CONFIG"), text)?;
        ProxyConfig::validate(Path::new("$WARDEN_PROXY_CONFIG"), raw, |_| None, &env)
            .map(|(c, _)| c)
    }

    #[test]
    fn policy_env_gives_the_listener_its_whole_policy_as_json_or_yaml() {
        let json = r#"{"mode": "audit", "rules": [{"name": "checkout", "action": "allow", "from": ["spiffe://example.org/ns/checkout/*"]}]}"#;
        let yaml = "mode: audit\nrules:\n  - name: checkout\n    action: allow\n    from: [spiffe://example.org/ns/checkout/*]\n";
        for text in [json, yaml] {
            let c = with_env_policy(text).unwrap();
            assert_eq!(c.inbound.len(), 1);
            assert_eq!(c.inbound[0].policy.mode, PolicyMode::Audit);
            assert_eq!(c.inbound[0].policy.rules[0].name, "checkout");
        }
    }

    #[test]
    fn a_policy_env_that_tries_to_add_a_listener_is_refused_naming_the_variable() {
        // What pasting it into the config as text would have made a second
        // listener of.
        let e = with_env_policy(
            r#"{"rules": []}}, {"name": "x", "listen": "0.0.0.0:9000", "app": "127.0.0.1:22", "policy": {"rules": [{"name": "all", "action": "allow", "from": ["*"]}]}"#,
        )
        .unwrap_err();
        assert!(
            e.0.iter().all(|d| d.file == Path::new("$WARDEN_POLICY")),
            "{e}"
        );
        // Keys of a listener are not a policy's.
        let e = with_env_policy(r#"{"rules": [], "listen": "0.0.0.0:9000"}"#).unwrap_err();
        assert!(e.to_string().starts_with("$WARDEN_POLICY:1:"), "{e}");
        assert!(e.to_string().contains("listen"), "{e}");
        // A rule's error is located in the variable's own text.
        let e = with_env_policy(
            "rules:\n  - name: a\n    action: allow\n    from: [spiffe://td/ns/*/x]\n",
        )
        .unwrap_err();
        assert_eq!(
            (e.0[0].file.display().to_string(), e.0[0].line),
            ("$WARDEN_POLICY".into(), 4),
            "{e}"
        );
        for (value, says) in [("", "is empty"), ("  \n", "is empty")] {
            let e = with_env_policy(value).unwrap_err().to_string();
            assert!(
                e.contains("policy_env WARDEN_POLICY") && e.contains(says),
                "{e}"
            );
        }
    }

    #[test]
    fn policy_env_is_a_set_variable_and_not_beside_a_policy() {
        let base = "identity: {cert: cert.pem, key: key.pem, bundle: bundle.pem}\nadmin: 127.0.0.1:9901\ninbound:\n  - {name: app, listen: 0.0.0.0:4143, app: 127.0.0.1:8080, ";
        for (tail, says) in [
            (
                "policy_env: WARDEN_NOT_SET_ANYWHERE_4711}\n",
                "policy_env WARDEN_NOT_SET_ANYWHERE_4711: cannot read the environment variable",
            ),
            (
                "policy_env: \"A-B\"}\n",
                "must be an environment variable name",
            ),
            (
                "policy_env: PATH, policy: {rules: []}}\n",
                "policy and policy_env are exclusive",
            ),
        ] {
            let e = parse(&format!("{base}{tail}")).unwrap_err().to_string();
            assert!(
                e.contains(says) && e.starts_with("/etc/warden/proxy.yaml:4:"),
                "{e}"
            );
        }
    }
}
