//! The sidecar `warden inject` adds to a pod: a native sidecar (an init
//! container with `restartPolicy: Always`, first in the list, so that it
//! starts before the app and stops after it, and a Job still completes),
//! ready once it holds its identity (`/ready` as its startup probe, so the
//! app's containers start only then), configured from the pod's
//! annotations, with the projected ServiceAccount token mounted into it
//! alone.

use serde_json::{Map, Value, json};

/// The sidecar's container name; its presence means "injected".
pub const CONTAINER: &str = "warden-proxy";
/// The projected token volume.
pub const TOKEN_VOLUME: &str = "warden-token";
/// Where the token volume is mounted in the sidecar.
pub const TOKEN_DIR: &str = "/var/run/secrets/tokens";
/// The annotation that turns injection off (`disabled`) or on (`enabled`).
pub const INJECT: &str = "warden.dev/inject";
/// The annotation recording an injection (the version that did it).
pub const INJECTED: &str = "warden.dev/injected";
/// The UID the control plane runs as (non-root; the image's own).
pub const UID: i64 = 65532;
/// The UID the sidecar runs as: its own, so that an app sharing the pod's
/// process namespace under the image's default UID cannot read its key.
pub const SIDECAR_UID: i64 = 2102;

/// Injection settings that come from the operator, not the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The sidecar image.
    pub image: String,
    /// `https://host:port` of the CA, as pods reach it.
    pub ca_url: String,
    /// The CA's trust bundle (PEM): the trust anchors travel in the pod spec.
    pub bundle_pem: String,
    /// The trust domain (for the default policy).
    pub trust_domain: String,
}

/// A pod annotation that configures the sidecar, with its default.
struct Knob {
    key: &'static str,
    default: &'static str,
}

/// Every annotation the sidecar reads (documented in README).
const INBOUND_PORT: Knob = Knob {
    key: "warden.dev/inbound-port",
    default: "4143",
};
const ADMIN_PORT: Knob = Knob {
    key: "warden.dev/admin-port",
    default: "4191",
};
const APP_PORT: Knob = Knob {
    key: "warden.dev/app-port",
    default: "",
};
const ALLOW: Knob = Knob {
    key: "warden.dev/allow",
    default: "",
};
/// A ConfigMap of the pod's namespace whose key [`POLICY_KEY`] is the
/// inbound listener's `policy:` (instead of `warden.dev/allow`).
const POLICY_CONFIGMAP: Knob = Knob {
    key: "warden.dev/policy-configmap",
    default: "",
};
/// The key of the policy ConfigMap: the policy as JSON (or YAML).
pub const POLICY_KEY: &str = "policy.json";
/// The sidecar's environment variable the kubelet fills from it; the proxy
/// reads it as the listener's `policy_env`: one policy value, never text
/// pasted into the config (which could add listeners).
const POLICY_ENV: &str = "WARDEN_POLICY";
const OUTBOUND: Knob = Knob {
    key: "warden.dev/outbound",
    default: "",
};
const LOG_LEVEL: Knob = Knob {
    key: "warden.dev/log-level",
    default: "info",
};
const CPU_REQUEST: Knob = Knob {
    key: "warden.dev/proxy-cpu-request",
    default: "10m",
};
const MEMORY_REQUEST: Knob = Knob {
    key: "warden.dev/proxy-memory-request",
    default: "32Mi",
};
const MEMORY_LIMIT: Knob = Knob {
    key: "warden.dev/proxy-memory-limit",
    default: "256Mi",
};
const CPU_LIMIT: Knob = Knob {
    key: "warden.dev/proxy-cpu-limit",
    default: "",
};

fn knob<'a>(annotations: &'a Map<String, Value>, k: &Knob) -> &'a str {
    annotations
        .get(k.key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .unwrap_or(k.default)
}

fn port(annotations: &Map<String, Value>, k: &Knob) -> Result<u16, String> {
    let v = knob(annotations, k);
    v.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("annotation {} is {v:?}, not a port", k.key))
}

/// The app's port: the annotation, or the first container's first port.
fn app_port(annotations: &Map<String, Value>, spec: &Value) -> Result<u16, String> {
    if annotations.contains_key(APP_PORT.key) {
        return port(annotations, &APP_PORT);
    }
    spec.pointer("/containers/0/ports/0/containerPort")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| {
            format!(
                "no port to protect: the first container declares none; set the {} annotation",
                APP_PORT.key
            )
        })
}

/// `name=local port,destination host:port,server SPIFFE ID` entries,
/// separated by `;`.
fn outbound(annotations: &Map<String, Value>) -> Result<Vec<Value>, String> {
    let text = knob(annotations, &OUTBOUND);
    let mut out = Vec::new();
    for entry in text.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = || {
            format!(
                "annotation {}: {entry:?} is not name=port,destination,server-id",
                OUTBOUND.key
            )
        };
        let (name, rest) = entry.split_once('=').ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split(',').map(str::trim).collect();
        let [local, destination, server_id] = parts.as_slice() else {
            return Err(bad());
        };
        let local: u16 = local.parse().map_err(|_| bad())?;
        out.push(json!({
            "name": name.trim(),
            "listen": format!("127.0.0.1:{local}"),
            "destination": destination,
            "server_id": server_id,
        }));
    }
    Ok(out)
}

/// A Kubernetes object name (a DNS subdomain, RFC 1123).
fn object_name(annotations: &Map<String, Value>, k: &Knob) -> Result<String, String> {
    let v = knob(annotations, k);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if v.len() <= 253 && v.split('.').all(label_ok) {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "annotation {} is {v:?}, not a ConfigMap name",
            k.key
        ))
    }
}

/// The policy ConfigMap's name, when the pod names one.
fn policy_configmap(annotations: &Map<String, Value>) -> Result<Option<String>, String> {
    if knob(annotations, &POLICY_CONFIGMAP).is_empty() {
        return Ok(None);
    }
    if !knob(annotations, &ALLOW).is_empty() {
        return Err(format!(
            "annotations {} and {} both set the inbound policy: keep one",
            ALLOW.key, POLICY_CONFIGMAP.key
        ));
    }
    object_name(annotations, &POLICY_CONFIGMAP).map(Some)
}

/// The proxy config the sidecar runs with (YAML, in an environment
/// variable). `$(WARDEN_NAMESPACE)` is expanded by the kubelet from the
/// downward API: by default only the pod's own namespace may call it.
///
/// With a policy ConfigMap the inbound listener has `policy_env:
/// WARDEN_POLICY` instead of a policy: the proxy parses that variable (the
/// ConfigMap's [`POLICY_KEY`]) as the listener's whole policy, one value
/// that cannot reach any other part of the config.
fn proxy_config(
    s: &Settings,
    annotations: &Map<String, Value>,
    spec: &Value,
) -> Result<String, String> {
    let allow: Vec<String> = match knob(annotations, &ALLOW) {
        "" => vec![format!(
            "spiffe://{}/ns/$(WARDEN_NAMESPACE)/*",
            s.trust_domain
        )],
        list => list
            .split(',')
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect(),
    };
    let configmap = policy_configmap(annotations)?;
    let policy = json!({"rules": [{"name": "allowed", "action": "allow", "from": allow}]});
    let mut config = json!({
        "identity": {"kubernetes": {
            "ca_url": s.ca_url,
            "bundle_pem": s.bundle_pem,
            "token_file": format!("{TOKEN_DIR}/warden"),
        }},
        "admin": format!("[::]:{}", port(annotations, &ADMIN_PORT)?),
        "inbound": [{
            "name": "app",
            "listen": format!("[::]:{}", port(annotations, &INBOUND_PORT)?),
            "app": format!("127.0.0.1:{}", app_port(annotations, spec)?),
            "policy": policy,
        }],
    });
    let outbound = outbound(annotations)?;
    if !outbound.is_empty() {
        config["outbound"] = Value::Array(outbound);
    }
    // What the sidecar will run with must parse now, with some policy in
    // place of the ConfigMap's (checked when the proxy starts: exit 2 with
    // the variable, line and column, in the container's log).
    let probe = serde_saphyr::to_string(&config).map_err(|e| format!("proxy config: {e}"))?;
    if configmap.is_some() {
        config["inbound"][0]["policy_env"] = Value::String(POLICY_ENV.to_owned());
        if let Some(inbound) = config["inbound"][0].as_object_mut() {
            inbound.remove("policy");
        }
    }
    let text = serde_saphyr::to_string(&config).map_err(|e| format!("proxy config: {e}"))?;
    // What the sidecar will run with must parse now, not crash-loop later.
    let probe = probe.replace("$(WARDEN_NAMESPACE)", "default");
    warden_config::ProxyConfig::parse(std::path::Path::new("the sidecar's config"), &probe)
        .map_err(|e| format!("the annotations give a config the proxy refuses: {e}"))?;
    Ok(text)
}

/// A Kubernetes resource quantity (`10m`, `32Mi`, `0.5`).
fn quantity(annotations: &Map<String, Value>, k: &Knob) -> Result<String, String> {
    let v = knob(annotations, k);
    let digits = v.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &v[digits.len()..];
    let ok = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits.chars().filter(|c| *c == '.').count() <= 1
        && ["", "m", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"].contains(&suffix);
    if ok {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "annotation {} is {v:?}, not a resource quantity",
            k.key
        ))
    }
}

/// The sidecar's ports must be free: not the app's, not each other, not a
/// port another container of the pod declares.
fn check_ports(annotations: &Map<String, Value>, spec: &Value) -> Result<(), String> {
    let (inbound, admin) = (
        port(annotations, &INBOUND_PORT)?,
        port(annotations, &ADMIN_PORT)?,
    );
    let app = app_port(annotations, spec)?;
    if inbound == admin {
        return Err(format!("the inbound and admin ports are both {inbound}"));
    }
    if app == inbound || app == admin {
        return Err(format!(
            "the app's port {app} is one of the sidecar's ({inbound}, {admin}): set {} or {}",
            INBOUND_PORT.key, ADMIN_PORT.key
        ));
    }
    for list in ["containers", "initContainers"] {
        for c in spec
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for p in c
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let n = p.get("containerPort").and_then(Value::as_u64);
                if n == Some(u64::from(inbound)) || n == Some(u64::from(admin)) {
                    return Err(format!(
                        "container {} already uses port {}, which the sidecar needs",
                        c["name"].as_str().unwrap_or("?"),
                        n.unwrap_or_default()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// (the app's port, the sidecar's inbound port) for a pod.
pub fn ports(annotations: &Map<String, Value>, spec: &Value) -> Result<(u16, u16), String> {
    Ok((
        app_port(annotations, spec)?,
        port(annotations, &INBOUND_PORT)?,
    ))
}

/// The sidecar container for a pod with these annotations and spec.
pub fn container(
    s: &Settings,
    annotations: &Map<String, Value>,
    spec: &Value,
) -> Result<Value, String> {
    check_ports(annotations, spec)?;
    let config = proxy_config(s, annotations, spec)?;
    let inbound = port(annotations, &INBOUND_PORT)?;
    let admin = port(annotations, &ADMIN_PORT)?;
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": {"path": path, "port": "warden-admin"},
            "periodSeconds": period,
            "failureThreshold": failures,
        })
    };
    let mut limits = json!({"memory": quantity(annotations, &MEMORY_LIMIT)?});
    if !knob(annotations, &CPU_LIMIT).is_empty() {
        limits["cpu"] = quantity(annotations, &CPU_LIMIT)?.into();
    }
    let requests = json!({
        "cpu": quantity(annotations, &CPU_REQUEST)?,
        "memory": quantity(annotations, &MEMORY_REQUEST)?,
    });
    let mut env = vec![
        json!({"name": "WARDEN_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
        json!({"name": "WARDEN_LOG", "value": knob(annotations, &LOG_LEVEL)}),
    ];
    // Read by the sidecar alone. Not optional: without its policy the
    // sidecar does not start.
    if let Some(name) = policy_configmap(annotations)? {
        env.push(
            json!({"name": POLICY_ENV, "valueFrom": {"configMapKeyRef": {
                "name": name, "key": POLICY_KEY, "optional": false,
            }}}),
        );
    }
    env.push(json!({"name": "WARDEN_PROXY_CONFIG", "value": config}));
    Ok(json!({
        "name": CONTAINER,
        "image": s.image,
        "args": ["proxy", "--config-env", "WARDEN_PROXY_CONFIG"],
        // A native sidecar: starts before the app, stops after it.
        "restartPolicy": "Always",
        "env": env,
        "ports": [
            {"name": "warden-in", "containerPort": inbound, "protocol": "TCP"},
            {"name": "warden-admin", "containerPort": admin, "protocol": "TCP"},
        ],
        // The app's containers start once this passes: the proxy holds its identity.
        "startupProbe": probe("/ready", 1, 120),
        "readinessProbe": probe("/ready", 5, 3),
        "livenessProbe": probe("/live", 10, 3),
        "resources": {"requests": requests, "limits": limits},
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "privileged": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }))
}

/// The projected ServiceAccount token volume (audience `warden`, 1 h).
pub fn token_volume() -> Value {
    json!({
        "name": TOKEN_VOLUME,
        "projected": {"sources": [{"serviceAccountToken": {
            "audience": "warden",
            "expirationSeconds": 3600,
            "path": "warden",
        }}]},
    })
}
