//! `warden`: the CLI. Parses arguments, wires the crates together, handles
//! signals and exit codes (2: bad usage or config; 1: the command failed).
//! No logic of its own lives here.

#![forbid(unsafe_code)]

mod demo;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use time::OffsetDateTime;

use warden_ca::client::{CaClient, Credentials};
use warden_ca::{Authority, CaService, InitOptions, files_out};
use warden_config::{CaConfig, ProxyConfig, SpiffeId, TrustDomain};

/// warden: mTLS zero-trust sidecar with a built-in SPIFFE certificate authority.
#[derive(Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "WARDEN_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// The certificate authority: create it, issue identities, serve the API.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Run the sidecar or gateway proxy.
    Proxy {
        /// The proxy config file (YAML).
        #[arg(long, env = "WARDEN_CONFIG", required_unless_present = "config_env")]
        config: Option<PathBuf>,
        /// Read the config (YAML) from this environment variable instead, as
        /// an injected sidecar does.
        #[arg(long, conflicts_with = "config")]
        config_env: Option<String>,
    },
    /// Validate a config file (proxy or CA): exit 0, or exit 2 listing `file:line:column: problem`; warnings (rules that can never match) do not change the exit code.
    Check {
        /// The file to check.
        #[arg(long)]
        config: PathBuf,
    },
    /// Propose model route limits from usage recordings (`record:` on a route, best in `mode: shadow`): a multiple of the heaviest caller and namespace, as YAML with the evidence.
    Limits {
        /// Recording files (several proxies' files of one route add up).
        #[arg(long = "record", required = true, num_args = 1..)]
        records: Vec<PathBuf>,
        /// The multiple of the heaviest observed volume to allow.
        #[arg(long, default_value_t = 2.0)]
        headroom: f64,
    },
    /// Add the warden sidecar to Kubernetes workloads (Pod, Deployment,
    /// StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, List) in a YAML
    /// stream; everything else passes through unchanged. Print the result.
    Inject {
        /// The manifests (`-` for standard input).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Also point each Service of the input that selects injected pods
        /// at their sidecar (its targetPort for the app's port becomes the
        /// inbound port).
        #[arg(long)]
        services: bool,
        #[command(flatten)]
        sidecar: SidecarArgs,
    },
    /// Print the control plane's manifests for `kubectl apply -f -`: the CA
    /// (a StatefulSet), the admission webhook, RBAC, and the keys made now
    /// (as Linkerd's install does; keep the output secret, it holds them).
    Install {
        /// The trust domain.
        #[arg(long)]
        trust_domain: TrustDomain,
        /// The control plane's namespace.
        #[arg(long, default_value = "warden")]
        namespace: String,
        /// The image of every warden container.
        #[arg(long, default_value = concat!("warden:", env!("CARGO_PKG_VERSION")))]
        image: String,
        /// Admission webhook replicas.
        #[arg(long, default_value_t = 2)]
        webhook_replicas: i32,
        /// CA replicas (more than one needs --ha; with it, default 2).
        #[arg(long)]
        ca_replicas: Option<i32>,
        /// CA replicas on a shared PostgreSQL store, whose URL is the key
        /// `url` of the Secret --store-secret names.
        #[arg(long)]
        ha: bool,
        /// The Secret in the namespace holding the store's URL (key `url`).
        #[arg(long, default_value = "warden-ca-store", requires = "ha")]
        store_secret: String,
        /// Bring your own root: its certificate (PEM); the intermediate is
        /// made under it.
        #[arg(long, requires = "root_key")]
        root_cert: Option<PathBuf>,
        /// The root's key (PEM); used once, here, and not written out.
        #[arg(long, requires = "root_cert")]
        root_key: Option<PathBuf>,
        /// Bring your own root from a Secret manifest in cert-manager's
        /// layout (`kubectl get secret NAME -o yaml` or `-o json`: tls.crt,
        /// tls.key, optional ca.crt); used as --root-cert/--root-key are.
        #[arg(long, conflicts_with_all = ["root_cert", "root_key"])]
        root_secret: Option<PathBuf>,
        /// Which pods the CA attests (default: every namespace's).
        #[arg(long)]
        allow: Vec<String>,
    },
    /// The mutating admission webhook: injects the same sidecar as `warden
    /// inject` into pods the API server sends it (POST /inject/namespace,
    /// /inject/pod), as a JSONPatch.
    Webhook {
        /// The HTTPS listener.
        #[arg(long, default_value = "[::]:8443")]
        listen: SocketAddr,
        /// The admin listener (/live, /ready, /metrics).
        #[arg(long, default_value = "[::]:9901")]
        admin: SocketAddr,
        /// Serving certificate chain (PEM; from `warden ca issue --dns-name`),
        /// reloaded when it changes.
        #[arg(long, requires = "key", required_unless_present = "k8s_token")]
        cert: Option<PathBuf>,
        /// Its key.
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// Instead of files: the pod's projected ServiceAccount token
        /// (audience `warden`); the certificate then comes from the CA at
        /// --ca-url (verified with --bundle) and is renewed at half-life.
        #[arg(long, conflicts_with_all = ["cert", "key"], requires = "dns_name")]
        k8s_token: Option<PathBuf>,
        /// A DNS name to ask the CA for (repeat: the Service's names; the
        /// CA's `kubernetes.dns_names` must grant them).
        #[arg(long, requires = "k8s_token")]
        dns_name: Vec<String>,
        /// Lifetime to ask the CA for (it caps it).
        #[arg(long, requires = "k8s_token", value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Close a connection on which no request has started or been in
        /// flight for this long (keep-alive pings do not count).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        idle_timeout: Duration,
        #[command(flatten)]
        sidecar: SidecarArgs,
    },
    /// Run the whole system on loopback and show what it does, step by step.
    Demo {
        /// Leave everything running afterwards and print how to call it by hand.
        #[arg(long)]
        keep_running: bool,
    },
}

#[derive(Args)]
struct DirArg {
    /// The CA's directory.
    #[arg(long, env = "WARDEN_CA_DIR")]
    dir: PathBuf,
    /// Where the store and the audit trail are, when not in --dir (a pod's
    /// read-only keys beside a state volume: `warden install` sets both, so
    /// `kubectl exec warden-ca-0 -- warden ca deny ...` works).
    #[arg(long, env = "WARDEN_CA_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

impl DirArg {
    /// Where the store and the audit trail are.
    fn state(&self) -> &std::path::Path {
        self.state_dir.as_deref().unwrap_or(&self.dir)
    }
}

/// What `warden ca list` lists.
#[derive(Clone, Copy, clap::ValueEnum)]
enum ListWhat {
    /// Issued certificates: serial, SPIFFE ID, kind, NotAfter, issuer.
    Certs,
    /// Join tokens: SHA-256 prefix, SPIFFE ID, expiry, use time.
    Tokens,
    /// Denied identities: SPIFFE ID, since.
    Denied,
}

#[derive(Subcommand)]
enum RootCommand {
    /// Put a new root in the trust bundle (pushed to every proxy); it signs
    /// nothing until `activate`.
    Add {
        #[command(flatten)]
        dir: DirArg,
        /// A root made elsewhere (PEM) instead of a new self-signed one.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// Its private key (PEM); kept in the state directory's keys/ (0600).
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// Lifetime of a root this command makes.
        #[arg(long, default_value = "3650d", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Sign with a new intermediate under this root from now on (refused
    /// until it has been in the bundle for `rotation_overlap`).
    Activate {
        #[command(flatten)]
        dir: DirArg,
        /// The root's id, or at least 8 hex characters of it (`warden ca status`).
        #[arg(long)]
        id: String,
    },
    /// Take a root out of the bundle (refused while any certificate signed
    /// under it is still valid).
    Retire {
        #[command(flatten)]
        dir: DirArg,
        /// The root's id, or at least 8 hex characters of it.
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA: a root and an intermediate (or an intermediate under an existing root).
    Init {
        #[command(flatten)]
        dir: DirArg,
        /// The trust domain to issue identities in, e.g. example.org.
        #[arg(long)]
        trust_domain: TrustDomain,
        /// An existing root certificate (PEM) to put the intermediate under.
        #[arg(long, requires = "root_key")]
        root_cert: Option<PathBuf>,
        /// The existing root's private key (PEM); it is used once and not copied.
        #[arg(long, requires = "root_cert")]
        root_key: Option<PathBuf>,
        /// Lifetime of the root this command creates.
        #[arg(long, default_value = "3650d", value_parser = humantime::parse_duration)]
        root_ttl: Duration,
        /// Lifetime of the intermediate (capped at the root's).
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        intermediate_ttl: Duration,
    },
    /// Issue a certificate and key for a workload, offline, into a directory.
    Issue {
        #[command(flatten)]
        dir: DirArg,
        /// The workload's SPIFFE ID.
        #[arg(long)]
        spiffe_id: SpiffeId,
        /// Where to write cert.pem, key.pem (0600) and bundle.pem.
        #[arg(long)]
        out_dir: PathBuf,
        /// Certificate lifetime (capped by the CA's max_ttl).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// A DNS name to put beside the SPIFFE ID (repeatable), for a
        /// service reached by name, e.g. the admission webhook's
        /// `warden-webhook.warden.svc`.
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
    },
    /// Print a one-time join token for a SPIFFE ID.
    Token {
        #[command(flatten)]
        dir: DirArg,
        /// The identity the token lets its holder obtain.
        #[arg(long)]
        spiffe_id: SpiffeId,
        /// How long the token stays usable (default: the CA's token_ttl).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Serve the CA's HTTPS API and admin endpoints.
    Serve {
        #[command(flatten)]
        dir: DirArg,
        /// Address of the API listener (port 0 picks one).
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// Address of the admin listener (/live, /ready, /metrics).
        #[arg(long, default_value = "127.0.0.1:9443")]
        admin: SocketAddr,
    },
    /// Deny a SPIFFE ID: no more certificates or renewals, and every proxy
    /// following the trust feed refuses its handshakes and closes its connections.
    Deny {
        #[command(flatten)]
        dir: DirArg,
        /// The identity to deny.
        #[arg(long)]
        spiffe_id: SpiffeId,
    },
    /// Undo `deny`.
    Allow {
        #[command(flatten)]
        dir: DirArg,
        /// The identity to allow again.
        #[arg(long)]
        spiffe_id: SpiffeId,
    },
    /// Audit trail tools.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// What the store holds, one tab-separated line each (times in unix seconds).
    List {
        #[command(flatten)]
        dir: DirArg,
        /// certs (still valid), tokens (unused, unexpired) or denied.
        #[arg(value_enum)]
        what: ListWhat,
        /// Every certificate or token, expired and used ones too.
        #[arg(long)]
        all: bool,
    },
    /// A consistent copy of the CA (store, audit trail up to the store's
    /// head, keys, settings) into a new directory, taken while it runs.
    Backup {
        #[command(flatten)]
        dir: DirArg,
        /// The new directory to write.
        #[arg(long)]
        to: PathBuf,
    },
    /// Rotate the root: add a new one, let it sign, retire the old one
    /// (intermediates rotate by themselves).
    #[command(subcommand)]
    Root(RootCommand),
    /// Every root and intermediate with its state and expiry, the trust
    /// feed's sequence, the last rotation, and what the store holds.
    Status {
        #[command(flatten)]
        dir: DirArg,
    },
    /// Obtain a certificate from a CA server: with a join token, a pod's
    /// ServiceAccount token, or by renewing a current one.
    Certify {
        /// The CA server, e.g. https://127.0.0.1:8443.
        #[arg(long)]
        server: String,
        /// The CA's trust bundle (PEM) to verify the server with.
        #[arg(long)]
        bundle: PathBuf,
        /// The identity to obtain (with --k8s-token: the one the token names,
        /// in the bundle's trust domain, unless given).
        #[arg(long, required_unless_present = "k8s_token")]
        spiffe_id: Option<SpiffeId>,
        /// A join token (for a first certificate).
        #[arg(long, env = "WARDEN_JOIN_TOKEN", conflicts_with_all = ["renew_from", "k8s_token"])]
        token: Option<String>,
        /// A file holding a projected ServiceAccount token with warden's
        /// audience (for a pod's certificate).
        #[arg(long, conflicts_with = "renew_from")]
        k8s_token: Option<PathBuf>,
        /// Renew: a directory holding the current cert.pem and key.pem.
        #[arg(long)]
        renew_from: Option<PathBuf>,
        /// Where to write cert.pem, key.pem (0600) and bundle.pem.
        #[arg(long)]
        out_dir: PathBuf,
        /// Requested lifetime (the CA caps it).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
}

/// What an injected sidecar is given (`warden inject`, `warden webhook`).
#[derive(clap::Args)]
struct SidecarArgs {
    /// The CA's trust bundle (PEM) the sidecars start from.
    #[arg(long)]
    bundle: PathBuf,
    /// The CA as pods reach it.
    #[arg(long, default_value = "https://warden-ca.warden.svc:8443")]
    ca_url: String,
    /// The sidecar image.
    #[arg(long, default_value = concat!("warden:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// The trust domain (default: the one the bundle names).
    #[arg(long)]
    trust_domain: Option<TrustDomain>,
}

impl SidecarArgs {
    fn settings(self) -> Result<warden_deploy::sidecar::Settings, Failure> {
        let bundle_pem = std::fs::read_to_string(&self.bundle)
            .map_err(|e| usage(format!("{}: {e}", self.bundle.display())))?;
        let trust_domain = match self.trust_domain {
            Some(td) => td,
            None => {
                let certs = warden_ca::pem::parse_certs(&bundle_pem)
                    .map_err(|e| usage(format!("{}: {e}", self.bundle.display())))?;
                warden_ca::tls::bundle_trust_domain(&certs).ok_or_else(|| {
                    usage(format!(
                        "{} names no trust domain (no spiffe:// URI SAN): give --trust-domain",
                        self.bundle.display()
                    ))
                })?
            }
        };
        Ok(warden_deploy::sidecar::Settings {
            image: self.image,
            ca_url: self.ca_url,
            bundle_pem,
            trust_domain: trust_domain.to_string(),
        })
    }
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the audit trail for edited, deleted, inserted or reordered lines.
    Verify {
        #[command(flatten)]
        dir: DirArg,
    },
}

/// A failed command: what to print and the exit code.
struct Failure {
    code: u8,
    message: String,
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Self {
            code: 1,
            message: e.to_string(),
        }
    }
}

fn usage(message: impl std::fmt::Display) -> Failure {
    Failure {
        code: 2,
        message: message.to_string(),
    }
}

/// Where `warden proxy` reads its config: `--config-env` or the file.
fn config_source(
    file: &Option<PathBuf>,
    env: &Option<String>,
) -> warden_config::proxy::ConfigSource {
    match (env, file) {
        (Some(name), _) => warden_config::proxy::ConfigSource::Env(name.clone()),
        (None, Some(f)) => warden_config::proxy::ConfigSource::File(f.clone()),
        // clap requires one of them.
        (None, None) => warden_config::proxy::ConfigSource::File(PathBuf::from("proxy.yaml")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Demo { .. }) {
        "error"
    } else {
        "info"
    };
    init_logging(cli.log_format, default_level);
    // The proxy's config says how many worker threads it gets; read it first.
    let mut workers = None;
    if let Command::Proxy { config, config_env } = &cli.command {
        match config_source(config, config_env).load() {
            Ok(c) => workers = Some(c.workers),
            Err(d) => {
                eprintln!("error: {d}");
                return ExitCode::from(2);
            }
        }
    }
    // One worker: a current-thread runtime (no work-stealing machinery, no
    // cross-thread wakeups); more: the multi-thread scheduler.
    let mut builder = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// Logs go to stderr (stdout carries the `listening`/`ready` lines and
/// command output). `WARDEN_LOG` sets the filter; the demo is quiet by default.
fn init_logging(format: LogFormat, default_level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARDEN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// How many of each control-plane pod `install` runs.
struct Replicas {
    webhook: i32,
    ca: i32,
    /// The Secret with the shared store's URL (CA replicas).
    store_secret: Option<String>,
}

/// Writes a file only its owner can read (a key on its way to `install`).
fn write_private(path: &std::path::Path, text: &str) -> Result<(), Failure> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| usage(format!("{}: {e}", path.display())))
}

/// Makes the CA's keys in a scratch directory and the control plane's
/// manifests around them.
async fn install(
    td: &TrustDomain,
    namespace: &str,
    image: String,
    replicas: Replicas,
    root: Option<(PathBuf, PathBuf)>,
    allow: &[String],
    now: OffsetDateTime,
) -> Result<String, Failure> {
    use warden_ca::authority::files;
    let scratch = tempfile::tempdir().map_err(|e| usage(format!("a scratch directory: {e}")))?;
    let dir = scratch.path().join("ca");
    let opts = InitOptions {
        external_root: root,
        ..InitOptions::default()
    };
    Authority::init(&dir, td, &opts, now)?;
    let allow: Vec<String> = if allow.is_empty() {
        vec![format!("spiffe://{td}/ns/*")]
    } else {
        allow.to_vec()
    };
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).map_err(|e| usage(format!("{name}: {e}")))
    };
    // The webhook attests like a sidecar and is granted its Service's
    // names; it is always allowed, whatever `--allow` narrows.
    let webhook_id = warden_deploy::install::webhook_id(td.as_str(), namespace);
    let id = SpiffeId::parse(&webhook_id)
        .map_err(|e| usage(format!("--namespace {namespace:?}: {e}")))?;
    let covered = allow
        .iter()
        .any(|p| warden_config::IdentityPattern::parse(p).is_ok_and(|p| p.matches(&id)));
    let mut allow = allow;
    if !covered {
        allow.push(webhook_id.clone());
    }
    let ca_yaml = format!(
        "{}kubernetes:\n  allow: [{}]\n  verify: tokenreview\n  dns_names:\n    - {{spiffe_id: {webhook_id}, names: [{}]}}\n",
        read(files::CONFIG)?,
        allow.join(", "),
        warden_deploy::install::webhook_dns_names(namespace).join(", ")
    );
    // The settings the CA pod will read, checked here first.
    CaConfig::parse(std::path::Path::new("ca.yaml"), &ca_yaml).map_err(usage)?;
    let manifest = warden_deploy::install::Install {
        namespace: namespace.to_owned(),
        trust_domain: td.to_string(),
        image,
        webhook_replicas: replicas.webhook,
        ca_yaml,
        bundle_pem: read(files::BUNDLE)?,
        root_pem: read(files::ROOT_CERT)?,
        intermediate_pem: read(files::INTERMEDIATE_CERT)?,
        intermediate_key_pem: read(files::INTERMEDIATE_KEY)?,
        ca_replicas: replicas.ca,
        store_secret: replicas.store_secret,
        store_key: read(files::STORE_KEY)?,
        // Made here: the CA holds it and rotates its intermediates itself.
        root_key_pem: read(files::ROOT_KEY).ok(),
    };
    warden_deploy::install::manifests(&manifest).map_err(usage)
}

/// Opens the CA of `dir`; a bad settings file is a usage error (exit 2).
async fn open_ca(dir: &DirArg) -> Result<CaService, Failure> {
    open_ca_with_state(&dir.dir, dir.state_dir.clone()).await
}

async fn open_ca_with_state(
    dir: &std::path::Path,
    state_dir: Option<PathBuf>,
) -> Result<CaService, Failure> {
    let mut authority = Authority::open(dir).map_err(|e| match e {
        warden_ca::CaError::Config(d) => usage(d),
        other => Failure::from(other),
    })?;
    if let Some(s) = state_dir {
        authority.state_dir = s;
    }
    Ok(CaService::open(authority)?)
}

async fn run(command: Command) -> Result<(), Failure> {
    let now = OffsetDateTime::now_utc();
    match command {
        Command::Ca(ca) => run_ca(ca, now).await,
        Command::Check { config } => {
            if is_ca_config(&config) {
                CaConfig::load(&config).map_err(usage)?;
            } else {
                let trust_domain = warden_proxy::authz::cert_trust_domain;
                let (_, warnings) = ProxyConfig::check(&config, trust_domain).map_err(usage)?;
                // Warnings do not change the exit code.
                if !warnings.0.is_empty() {
                    eprintln!("{warnings}");
                }
            }
            println!("{}: ok", config.display());
            Ok(())
        }
        Command::Proxy { config, config_env } => {
            let source = config_source(&config, &config_env);
            let config = source.load().map_err(usage)?;
            warden_proxy::run(config, source, shutdown_on_signal()).await?;
            Ok(())
        }
        Command::Webhook {
            listen,
            admin,
            cert,
            key,
            k8s_token,
            dns_name,
            ttl,
            idle_timeout,
            sidecar,
        } => {
            if idle_timeout.is_zero() {
                return Err(usage("--idle-timeout must be more than 0"));
            }
            let bundle = sidecar.bundle.clone();
            let settings = sidecar.settings()?;
            let serving = match (cert, key, k8s_token) {
                (Some(cert), Some(key), None) => warden_deploy::server::Source::Files { cert, key },
                (None, None, Some(token_file)) => {
                    if let Some(bad) = dns_name
                        .iter()
                        .find(|d| !warden_config::dns::valid_dns_name(d))
                    {
                        return Err(usage(format!(
                            "--dns-name {bad:?} is not a DNS name a certificate may carry"
                        )));
                    }
                    warden_deploy::server::Source::Ca {
                        url: settings.ca_url.clone(),
                        bundle: bundle.clone(),
                        trust_domain: TrustDomain::parse(&settings.trust_domain).map_err(usage)?,
                        token_file,
                        dns_names: dns_name,
                        ttl,
                    }
                }
                _ => return Err(usage("give --cert and --key, or --k8s-token")),
            };
            let config = warden_deploy::server::Config {
                listen,
                admin,
                serving,
                settings,
                idle_timeout,
            };
            warden_deploy::server::run(config, shutdown_on_signal())
                .await
                .map_err(|e| Failure {
                    code: 1,
                    message: e.to_string(),
                })?;
            Ok(())
        }
        Command::Install {
            trust_domain,
            namespace,
            image,
            webhook_replicas,
            ca_replicas,
            ha,
            store_secret,
            root_cert,
            root_key,
            root_secret,
            allow,
        } => {
            // The Secret's root as the two files --root-cert/--root-key
            // give, in a private scratch directory removed afterwards.
            let secret_dir =
                tempfile::tempdir().map_err(|e| usage(format!("a scratch directory: {e}")))?;
            let root = match root_secret {
                Some(file) => {
                    let r = warden_deploy::root_secret::read(&file)
                        .map_err(|e| usage(format!("--root-secret {e}")))?;
                    let (cert, key) = (
                        secret_dir.path().join("root.pem"),
                        secret_dir.path().join("root-key.pem"),
                    );
                    write_private(&cert, &r.cert_pem)?;
                    write_private(&key, &r.key_pem)?;
                    Some((cert, key))
                }
                None => root_cert.zip(root_key),
            };
            let ca_replicas = ca_replicas.unwrap_or(if ha { 2 } else { 1 });
            if !ha && ca_replicas > 1 {
                return Err(usage(
                    "CA replicas share a PostgreSQL store: add --ha (and a Secret with its URL, --store-secret)",
                ));
            }
            if !(1..=9).contains(&ca_replicas) {
                return Err(usage("--ca-replicas must be between 1 and 9"));
            }
            if !(1..=20).contains(&webhook_replicas) {
                return Err(usage("--webhook-replicas must be between 1 and 20"));
            }
            print!(
                "{}",
                install(
                    &trust_domain,
                    &namespace,
                    image,
                    Replicas {
                        webhook: webhook_replicas,
                        ca: ca_replicas,
                        store_secret: ha.then_some(store_secret),
                    },
                    root,
                    &allow,
                    now
                )
                .await?
            );
            Ok(())
        }
        Command::Inject {
            file,
            services,
            sidecar,
        } => {
            let settings = sidecar.settings()?;
            let input = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .map_err(|e| usage(format!("standard input: {e}")))?;
                s
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| usage(format!("{}: {e}", file.display())))?
            };
            let (out, reports) = warden_deploy::inject::inject_stream(&input, &settings, services)
                .map_err(|e| usage(format!("{}: {e}", file.display())))?;
            use warden_deploy::inject::Outcome;
            let mut invalid = Vec::new();
            for r in &reports {
                match &r.outcome {
                    Outcome::Injected => eprintln!("{}: injected", r.object),
                    Outcome::AlreadyInjected => eprintln!("{}: already injected", r.object),
                    Outcome::Skipped(why) => {
                        eprintln!("warning: {}: not injected: {why}", r.object)
                    }
                    Outcome::Invalid(why) => invalid.push(format!("{}: {why}", r.object)),
                }
            }
            if !invalid.is_empty() {
                // Nothing is printed: half a stream applied is worse than none.
                return Err(usage(format!("cannot inject:\n  {}", invalid.join("\n  "))));
            }
            if reports.iter().any(|r| r.outcome == Outcome::Injected) {
                eprintln!(
                    "note: peers reach the app through the sidecar's port; the app must listen on 127.0.0.1 only, or it stays reachable without mTLS (transparent interception comes later)"
                );
            }
            print!("{out}");
            Ok(())
        }
        Command::Limits { records, headroom } => {
            if !(headroom.is_finite() && headroom >= 1.0) {
                return Err(usage("--headroom must be at least 1"));
            }
            let mut books = Vec::with_capacity(records.len());
            for f in &records {
                let bytes = std::fs::read(f).map_err(|e| usage(format!("{}: {e}", f.display())))?;
                let book: warden_guard::record::Book = serde_json::from_slice(&bytes)
                    .map_err(|e| usage(format!("{}: not a usage recording: {e}", f.display())))?;
                books.push(book);
            }
            print!("{}", warden_guard::record::propose(&books, headroom));
            Ok(())
        }
        Command::Demo { keep_running } => demo::run(keep_running).await.map_err(Failure::from),
    }
}

async fn run_ca(command: CaCommand, now: OffsetDateTime) -> Result<(), Failure> {
    match command {
        CaCommand::Init {
            dir,
            trust_domain,
            root_cert,
            root_key,
            root_ttl,
            intermediate_ttl,
        } => {
            let opts = InitOptions {
                external_root: root_cert.zip(root_key),
                root_ttl,
                intermediate_ttl,
            };
            let authority = Authority::init(&dir.dir, &trust_domain, &opts, now)?;
            let svc = CaService::open(authority)?;
            let event = warden_ca::audit::Event::new("ca_initialized")
                .with("trust_domain", trust_domain.as_str())
                .with("external_root", opts.external_root.is_some());
            svc.audit(event, now)?;
            println!(
                "created CA for trust domain {trust_domain} in {}",
                dir.dir.display()
            );
            println!(
                "trust bundle: {}",
                dir.dir.join(warden_ca::authority::files::BUNDLE).display()
            );
            Ok(())
        }
        CaCommand::Issue {
            dir,
            spiffe_id,
            out_dir,
            ttl,
            dns_names,
        } => {
            let svc = open_ca(&dir).await?;
            let (issued, key_pem) =
                svc.issue_local_with_dns(&spiffe_id, &dns_names, ttl, "offline", now)?;
            files_out::write_credentials(
                &out_dir,
                &issued.svid.chain_pem,
                &key_pem,
                &issued.bundle_pem,
            )?;
            println!(
                "issued {spiffe_id} (serial {}, valid until {}) into {}",
                issued.svid.serial,
                rfc3339(issued.svid.validity.not_after),
                out_dir.display()
            );
            Ok(())
        }
        CaCommand::Token {
            dir,
            spiffe_id,
            ttl,
        } => {
            let svc = open_ca(&dir).await?;
            let (token, _expires) = svc.create_token(&spiffe_id, ttl, now)?;
            println!("{token}");
            Ok(())
        }
        CaCommand::Serve { dir, listen, admin } => {
            let svc = Arc::new(open_ca(&dir).await?);
            let api = warden_ca::server::bind("api", listen).await?;
            let admin = warden_ca::server::bind("admin", admin).await?;
            warden_ca::server::run(svc, api, admin, shutdown_on_signal()).await?;
            Ok(())
        }
        CaCommand::Root(cmd) => {
            let (dir, what) = match &cmd {
                RootCommand::Add { dir, .. } => (dir, "added (in the bundle, not signing)"),
                RootCommand::Activate { dir, .. } => (dir, "activated (signs from now on)"),
                RootCommand::Retire { dir, .. } => (dir, "retired (out of the bundle)"),
            };
            let svc = open_ca(dir).await?;
            let root = match &cmd {
                RootCommand::Add { cert, key, ttl, .. } => {
                    let brought = cert.as_deref().zip(key.as_deref());
                    svc.add_root(brought, *ttl, now)?
                }
                RootCommand::Activate { id, .. } => svc.activate_root(id, now)?,
                RootCommand::Retire { id, .. } => svc.retire_root(id, now)?,
            };
            println!("root {} {what}", root.id);
            Ok(())
        }
        CaCommand::List { dir, what, all } => {
            let svc = open_ca(&dir).await?;
            let mut conn = svc.store.lock();
            let t = now.unix_timestamp();
            let (header, rows) = match what {
                ListWhat::Certs => (
                    "serial\tspiffe_id\tkind\tnot_after\tissuer",
                    warden_ca::store::list_certs(&mut *conn, t, all),
                ),
                ListWhat::Tokens => (
                    "token_sha256\tspiffe_id\texpires_at\tused_at",
                    warden_ca::store::list_tokens(&mut *conn, t, all),
                ),
                ListWhat::Denied => (
                    "spiffe_id\tsince",
                    warden_ca::store::list_denied(&mut *conn),
                ),
            };
            let rows = rows.map_err(warden_ca::CaError::from)?;
            println!("{header}");
            for r in rows {
                println!("{}", r.join("\t"));
            }
            Ok(())
        }
        CaCommand::Backup { dir, to } => {
            let svc = open_ca(&dir).await?;
            let lines = svc.backup(&to)?;
            println!("backed up into {} ({lines} audit lines)", to.display());
            Ok(())
        }
        CaCommand::Status { dir } => {
            let svc = open_ca(&dir).await?;
            print!("{}", svc.status(now)?);
            Ok(())
        }
        CaCommand::Deny { dir, spiffe_id } => set_denied(&dir, &spiffe_id, true, now).await,
        CaCommand::Allow { dir, spiffe_id } => set_denied(&dir, &spiffe_id, false, now).await,
        CaCommand::Audit(AuditCommand::Verify { dir }) => {
            let config = CaConfig::load(&dir.dir.join("ca.yaml")).ok();
            let postgres = config.as_ref().and_then(warden_ca::service::store_url);
            let lines =
                warden_ca::audit::verify_dir(dir.state(), postgres.as_deref()).map_err(|e| {
                    Failure {
                        code: 1,
                        message: format!("audit trail: {e}"),
                    }
                })?;
            println!("audit trail ok: {lines} lines");
            Ok(())
        }
        CaCommand::Certify {
            server,
            bundle,
            spiffe_id,
            token,
            k8s_token,
            renew_from,
            out_dir,
            ttl,
        } => {
            let bundle_pem = std::fs::read_to_string(&bundle)
                .map_err(|e| usage(format!("{}: {e}", bundle.display())))?;
            let sa_token = k8s_token
                .as_ref()
                .map(|f| {
                    std::fs::read_to_string(f).map_err(|e| usage(format!("{}: {e}", f.display())))
                })
                .transpose()?;
            let spiffe_id = match (spiffe_id, &sa_token) {
                (Some(id), _) => id,
                (None, Some(t)) => {
                    let certs = warden_ca::pem::parse_certs(&bundle_pem).map_err(usage)?;
                    let td = warden_ca::tls::bundle_trust_domain(&certs).ok_or_else(|| {
                        usage("the bundle names no trust domain (no spiffe:// URI SAN): give --spiffe-id")
                    })?;
                    warden_ca::client::pod_identity(t, &td)?
                }
                (None, None) => return Err(usage("give --spiffe-id")),
            };
            let client =
                CaClient::new(&server, spiffe_id.trust_domain(), &bundle_pem).map_err(usage)?;
            let creds = match (token, sa_token, renew_from) {
                (Some(token), None, None) => client.bootstrap(&spiffe_id, &token, ttl).await?,
                (None, Some(t), None) => {
                    client
                        .bootstrap_kubernetes(&spiffe_id, &t, &[], ttl)
                        .await?
                }
                (None, None, Some(from)) => {
                    client
                        .renew(&read_credentials(&from, &spiffe_id)?, ttl)
                        .await?
                }
                _ => return Err(usage("give one of --token, --k8s-token or --renew-from")),
            };
            files_out::write_credentials(
                &out_dir,
                &creds.chain_pem,
                &creds.key_pem,
                &creds.bundle_pem,
            )?;
            println!(
                "obtained {} (valid until {}) into {}",
                creds.spiffe_id,
                rfc3339(creds.not_after),
                out_dir.display()
            );
            Ok(())
        }
    }
}

async fn set_denied(
    dir: &DirArg,
    id: &SpiffeId,
    deny: bool,
    now: OffsetDateTime,
) -> Result<(), Failure> {
    let svc = open_ca(dir).await?;
    let changed = svc.set_denied(id, deny, now)?;
    let state = if deny { "denied" } else { "allowed" };
    let note = if changed { "" } else { " (no change)" };
    println!("{id} {state}{note}");
    Ok(())
}

/// The current credentials in `dir` for `--renew-from`, read as the proxy
/// reads its `state_dir`: a pair interrupted between its two renames is
/// finished, and a certificate that is not the key's is refused.
fn read_credentials(dir: &std::path::Path, id: &SpiffeId) -> Result<Credentials, Failure> {
    let (chain_pem, key_pem) =
        files_out::read_credentials(dir).map_err(|e| usage(format!("{}: {e}", dir.display())))?;
    let bundle = dir.join(files_out::BUNDLE);
    let bundle_pem = std::fs::read_to_string(&bundle)
        .map_err(|e| usage(format!("{}: {e}", bundle.display())))?;
    let certs = warden_ca::authority::parse_certs(&chain_pem).map_err(usage)?;
    let v = warden_ca::authority::validity_of(&certs[0]).map_err(usage)?;
    Ok(Credentials {
        spiffe_id: id.clone(),
        chain_pem,
        key_pem,
        bundle_pem,
        not_before: v.not_before,
        not_after: v.not_after,
    })
}

/// A CA config has a top-level `trust_domain`; a proxy config never does.
fn is_ca_config(path: &std::path::Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.lines().any(|l| l.starts_with("trust_domain:")))
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A channel that turns true on SIGTERM or Ctrl-C.
fn shutdown_on_signal() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = term => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        tracing::info!("shutting down: draining in-flight requests");
        let _ = tx.send(true);
    });
    rx
}
