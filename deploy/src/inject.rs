//! The one mutation behind `warden inject` and the admission webhook: find
//! the pod template of a workload object and add the sidecar to it, on the
//! object's raw JSON, so that every field warden does not know survives.
//!
//! Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs,
//! CronJobs, and `List`s of them. Idempotent: an injected template is left
//! as it is (it has the sidecar and the `warden.dev/injected` annotation).
//! Skipped, with the reason: a template opted out
//! (`warden.dev/inject: disabled`), one on the host's network, a Windows
//! pod, one with a container named `warden-proxy` that warden did not add.

use serde_json::{Map, Value};

use crate::sidecar::{self, CONTAINER, INJECT, INJECTED, Settings};

/// What happened to one pod template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar was added.
    Injected,
    /// It already has the sidecar: nothing changed.
    AlreadyInjected,
    /// Left alone on purpose (opted out, host network, Windows), and why.
    Skipped(String),
    /// Left alone because its annotations or ports cannot work: a config
    /// error (the CLI fails, the webhook refuses the pod).
    Invalid(String),
}

/// One object and what happened to each pod template in it (none for an
/// object that has no pod template: a Service, a ConfigMap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `Kind/name` of the object (of the item, in a List).
    pub object: String,
    /// What was done.
    pub outcome: Outcome,
    /// For an injected template: where its pods are (namespace, labels)
    /// and (app port, inbound port), to point Services at the sidecar.
    pub pods: Option<Pods>,
}

/// The pods an injected workload makes, as a Service selects them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pods {
    /// The namespace written in the manifest, if any.
    pub namespace: Option<String>,
    /// The template's labels.
    pub labels: Map<String, Value>,
    /// The app's port.
    pub app_port: u16,
    /// The sidecar's inbound port.
    pub inbound_port: u16,
}

/// Where a kind keeps its pod template (a JSON pointer), or `None`.
fn template_path(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

fn name_of(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj["kind"].as_str().unwrap_or("?"),
        obj.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("?")
    )
}

/// Injects into `obj` (a List: into each item) in place; returns what
/// happened per workload.
pub fn inject(obj: &mut Value, s: &Settings) -> Vec<Report> {
    let kind = obj["kind"].as_str().unwrap_or("").to_owned();
    if kind == "List" {
        let mut out = Vec::new();
        if let Some(items) = obj.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                out.extend(inject(item, s));
            }
        }
        return out;
    }
    let Some(path) = template_path(&kind) else {
        return Vec::new();
    };
    let object = name_of(obj);
    // A workload opted out on its own metadata counts too.
    let opted_out = obj
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(INJECT))
        .and_then(Value::as_str)
        == Some("disabled");
    let namespace = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mut pods = None;
    let outcome = match obj.pointer_mut(path) {
        _ if opted_out => Outcome::Skipped(format!("{INJECT}: disabled")),
        Some(template) => {
            let before = template.clone();
            let outcome = inject_template(template, s);
            if outcome == Outcome::Injected {
                let annotations = before
                    .pointer("/metadata/annotations")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                if let Ok((app_port, inbound_port)) = sidecar::ports(&annotations, &before["spec"])
                {
                    pods = Some(Pods {
                        namespace,
                        labels: before
                            .pointer("/metadata/labels")
                            .and_then(Value::as_object)
                            .cloned()
                            .unwrap_or_default(),
                        app_port,
                        inbound_port,
                    });
                }
            }
            outcome
        }
        None => Outcome::Skipped("no pod template".into()),
    };
    vec![Report {
        object,
        outcome,
        pods,
    }]
}

/// Points a Service at the sidecar of the injected pods it selects: each
/// of its ports that reaches the app's port (by number, or by default)
/// gets the sidecar's inbound port as `targetPort`. True when it changed.
fn point_service(service: &mut Value, injected: &[Pods]) -> bool {
    if service["kind"] != "Service" {
        return false;
    }
    let namespace = service
        .pointer("/metadata/namespace")
        .and_then(Value::as_str);
    let Some(selector) = service
        .pointer("/spec/selector")
        .and_then(Value::as_object)
        .cloned()
    else {
        return false;
    };
    if selector.is_empty() {
        return false;
    }
    let Some(pods) = injected.iter().find(|p| {
        p.namespace.as_deref() == namespace
            && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
    }) else {
        return false;
    };
    let mut changed = false;
    if let Some(ports) = service
        .pointer_mut("/spec/ports")
        .and_then(Value::as_array_mut)
    {
        for p in ports {
            let target = p
                .get("targetPort")
                .or_else(|| p.get("port"))
                .and_then(Value::as_u64);
            if target == Some(u64::from(pods.app_port)) {
                p["targetPort"] = pods.inbound_port.into();
                changed = true;
            }
        }
    }
    changed
}

/// Adds the sidecar to one pod template (`metadata` and `spec`).
fn inject_template(template: &mut Value, s: &Settings) -> Outcome {
    let Some(t) = template.as_object_mut() else {
        return Outcome::Skipped("the pod template is not an object".into());
    };
    let annotations: Map<String, Value> = t
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if annotations.get(INJECT).and_then(Value::as_str) == Some("disabled") {
        return Outcome::Skipped(format!("{INJECT}: disabled"));
    }
    let Some(spec) = t.get("spec") else {
        return Outcome::Skipped("the pod template has no spec".into());
    };
    let has_sidecar = ["initContainers", "containers"].iter().any(|list| {
        spec.get(*list)
            .and_then(Value::as_array)
            .is_some_and(|cs| cs.iter().any(|c| c["name"] == CONTAINER))
    });
    if has_sidecar {
        // Ours only when the injection was recorded: a container of that
        // name that warden did not add is not a sidecar it can vouch for.
        if annotations.contains_key(INJECTED) {
            return Outcome::AlreadyInjected;
        }
        return Outcome::Skipped(format!(
            "it already has a container named {CONTAINER} that warden did not inject (no {INJECTED} annotation): rename it"
        ));
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Outcome::Skipped(
            "hostNetwork: the pod shares the node's network, its ports are the node's".into(),
        );
    }
    if spec.pointer("/os/name").and_then(Value::as_str) == Some("windows") {
        return Outcome::Skipped("a Windows pod: the sidecar runs on Linux nodes only".into());
    }
    for list in ["initContainers", "volumes"] {
        if !spec.get(list).is_none_or(|v| v.is_array() || v.is_null()) {
            return Outcome::Invalid(format!("{list} is not a list"));
        }
    }
    let container = match sidecar::container(s, &annotations, spec) {
        Ok(c) => c,
        Err(why) => return Outcome::Invalid(why),
    };
    let Some(spec) = t.get_mut("spec").and_then(Value::as_object_mut) else {
        return Outcome::Skipped("the pod template's spec is not an object".into());
    };
    // First in the list: init containers start in order, and the app's own
    // init containers may already need the network. (`null`, as Helm
    // writes it, is an empty list.)
    let mut list = |key: &str| {
        let v = spec.entry(key).or_insert(Value::Null);
        if v.is_null() {
            *v = Value::Array(Vec::new());
        }
        v.as_array_mut().map(std::mem::take).unwrap_or_default()
    };
    let mut inits = list("initContainers");
    inits.insert(0, container);
    let mut volumes = list("volumes");
    volumes.push(sidecar::token_volume());
    spec.insert("initContainers".into(), Value::Array(inits));
    spec.insert("volumes".into(), Value::Array(volumes));
    let metadata = t
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(m) = metadata.as_object_mut() {
        let a = m
            .entry("annotations")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(a) = a.as_object_mut() {
            a.insert(INJECTED.into(), env!("CARGO_PKG_VERSION").into());
        }
    }
    Outcome::Injected
}

/// Why a document could not be read.
#[derive(Debug, thiserror::Error)]
#[error("document {index} (from line {line}): {message}")]
pub struct DocumentError {
    /// Which document (1-based).
    pub index: usize,
    /// The line it starts at.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Injects into every document of a multi-document YAML (or JSON) stream.
/// Documents without a workload pass through as they were written, byte
/// for byte and in order; injected ones are written out again as YAML.
/// With `services`, a Service that selects injected pods is pointed at
/// their sidecar (see [`point_service`]).
pub fn inject_stream(
    text: &str,
    s: &Settings,
    services: bool,
) -> Result<(String, Vec<Report>), DocumentError> {
    let mut reports = Vec::new();
    // (original text, parsed value, changed)
    let mut docs: Vec<(&str, Option<Value>, bool)> = Vec::new();
    for (index, (line, doc)) in documents(text).into_iter().enumerate() {
        let content = doc
            .lines()
            .filter(|l| {
                !l.trim_start().starts_with('#') && !l.trim().is_empty() && !l.starts_with("---")
            })
            .count();
        if content == 0 {
            docs.push((doc, None, false));
            continue;
        }
        let body = doc.strip_prefix("---").map_or(doc, |rest| {
            // `--- # comment` or `---` alone: the separator line itself.
            rest.split_once('\n').map_or("", |(_, b)| b)
        });
        let mut value: Value = parse_yaml(body).map_err(|e| DocumentError {
            index: index + 1,
            line,
            message: e.to_string(),
        })?;
        let r = inject(&mut value, s);
        let changed = r.iter().any(|r| r.outcome == Outcome::Injected);
        reports.extend(r);
        docs.push((doc, Some(value), changed));
    }
    if services {
        let injected: Vec<Pods> = reports.iter().filter_map(|r| r.pods.clone()).collect();
        for (_, value, changed) in &mut docs {
            if let Some(v) = value.as_mut()
                && point_service(v, &injected)
            {
                *changed = true;
            }
        }
    }
    let mut out = String::with_capacity(text.len() * 2);
    for (index, (doc, value, changed)) in docs.iter().enumerate() {
        let (true, Some(value)) = (*changed, value) else {
            out.push_str(doc);
            continue;
        };
        let yaml = serde_saphyr::to_string(value).map_err(|e| DocumentError {
            index: index + 1,
            line: 0,
            message: e.to_string(),
        })?;
        if doc.starts_with("---") {
            out.push_str("---\n");
        }
        out.push_str(&yaml);
        if !yaml.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok((out, reports))
}

/// Parses one document as kubectl does: YAML 1.1 octal numbers included
/// (`defaultMode: 0644` is 420, never the decimal 644).
fn parse_yaml(body: &str) -> Result<Value, serde_saphyr::Error> {
    let mut options = serde_saphyr::Options::default();
    options.legacy_octal_numbers = true;
    serde_saphyr::from_str_with_options(body, options)
}

/// Splits a stream at its `---` lines: (first line number, text) per
/// document, each with its separator line, so that joining them gives the
/// input back.
fn documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let separator =
            line.starts_with("---") && line[3..].chars().next().is_none_or(|c| c.is_whitespace());
        if separator && offset > start {
            docs.push((start_line, &text[start..offset]));
            start = offset;
            start_line = i + 1;
        }
        offset += line.len();
    }
    if start < text.len() {
        docs.push((start_line, &text[start..]));
    }
    docs
}
