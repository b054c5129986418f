//! `warden install`: the control plane's manifests, built as the typed
//! Kubernetes objects of k8s-openapi (never string templates), for
//! `kubectl apply -f -`.
//!
//! The CA runs as a StatefulSet: its keys and settings in a projected,
//! read-only volume (the intermediate in a Secret of cert-manager's
//! `tls.crt`/`tls.key`/`ca.crt` layout, `ca.yaml` and the bundle in a
//! ConfigMap), its store and audit trail on a PersistentVolumeClaim. The
//! admission webhook runs as a Deployment behind a Service; it attests to
//! the same CA with its projected ServiceAccount token for a serving
//! certificate with the Service's DNS names (granted in `ca.yaml`), and
//! renews it at half-life. RBAC is what the CA uses and nothing else:
//! create TokenReviews, get pods.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    WebhookClientConfig,
};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapProjection, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, Namespace, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, Secret, SecretKeySelector, SecretProjection,
    SecurityContext, Service, ServiceAccount, ServiceAccountTokenProjection, ServicePort,
    ServiceSpec, Volume, VolumeMount, VolumeProjection, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use crate::sidecar::{INJECT, UID};

/// The CA's port, in the pod and on its Service.
pub const CA_PORT: i32 = 8443;
/// The admin port of every control-plane pod.
pub const ADMIN_PORT: i32 = 9901;
/// The webhook's port in its pod.
pub const WEBHOOK_PORT: i32 = 8443;

/// What the control plane is made of (the keys made by the caller).
#[derive(Debug, Clone)]
pub struct Install {
    /// The control plane's namespace.
    pub namespace: String,
    /// The trust domain.
    pub trust_domain: String,
    /// The image of every warden container.
    pub image: String,
    /// Webhook replicas.
    pub webhook_replicas: i32,
    /// `ca.yaml`.
    pub ca_yaml: String,
    /// The trust bundle (PEM).
    pub bundle_pem: String,
    /// The root (PEM).
    pub root_pem: String,
    /// The intermediate and its key (PEM).
    pub intermediate_pem: String,
    /// The intermediate's key.
    pub intermediate_key_pem: String,
    /// CA replicas (more than one only with `store_secret`).
    pub ca_replicas: i32,
    /// The Secret (key `url`) holding the PostgreSQL URL the replicas
    /// share; `None`: one replica on its embedded store.
    pub store_secret: Option<String>,
    /// `store.key`: seals rotation's keys for the other replicas.
    pub store_key: String,
    /// The root's key when `install` made the root, so the CA rotates its
    /// intermediates by itself; `None` for a root brought from elsewhere.
    pub root_key_pem: Option<String>,
}

/// The Opaque Secret beside the intermediate's: `store.key` and, when the
/// root was made here, `root-key.pem`. Its items are optional in the pod:
/// an operator who wants the root off the cluster deletes that key, and the
/// CA then says (a metric, a log line) that it cannot rotate by itself.
fn ca_secrets(i: &Install) -> Secret {
    let mut data = BTreeMap::from([(
        "store.key".to_owned(),
        ByteString(i.store_key.as_bytes().to_vec()),
    )]);
    if let Some(k) = &i.root_key_pem {
        data.insert("root-key.pem".to_owned(), ByteString(k.as_bytes().to_vec()));
    }
    Secret {
        metadata: meta("warden-ca-secrets", Some(&i.namespace), "ca"),
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    }
}

/// The webhook's identity: its ServiceAccount in the control plane's
/// namespace. The CA's `kubernetes.dns_names` grants it
/// [`webhook_dns_names`].
pub fn webhook_id(trust_domain: &str, namespace: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/warden-webhook")
}

/// `warden-webhook.<namespace>.svc` and its longer forms: the names the
/// webhook's certificate carries (the API server calls it by the first).
pub fn webhook_dns_names(namespace: &str) -> Vec<String> {
    vec![
        format!("warden-webhook.{namespace}.svc"),
        format!("warden-webhook.{namespace}.svc.cluster.local"),
    ]
}

fn meta(name: &str, namespace: Option<&str>, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: Some(labels(component)),
        ..ObjectMeta::default()
    }
}

fn labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "warden".to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            component.to_owned(),
        ),
    ])
}

fn selector(component: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels(component)),
        ..LabelSelector::default()
    }
}

fn quantity(s: &str) -> Quantity {
    Quantity(s.to_owned())
}

/// Non-root, read-only root filesystem, no privilege escalation, every
/// capability dropped, RuntimeDefault seccomp.
fn hardened() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(UID),
        run_as_group: Some(UID),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}

fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(UID),
        run_as_group: Some(UID),
        fs_group: Some(UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

fn probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("admin".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    }
}

fn resources(cpu: &str, memory: &str, memory_limit: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), quantity(cpu)),
            ("memory".to_owned(), quantity(memory)),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            quantity(memory_limit),
        )])),
        ..ResourceRequirements::default()
    }
}

fn port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

fn tls_secret(name: &str, ns: &str, component: &str, crt: &str, key: &str, ca: &str) -> Secret {
    Secret {
        metadata: meta(name, Some(ns), component),
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(crt.as_bytes().to_vec())),
            ("tls.key".to_owned(), ByteString(key.as_bytes().to_vec())),
            ("ca.crt".to_owned(), ByteString(ca.as_bytes().to_vec())),
        ])),
        ..Secret::default()
    }
}

fn service(name: &str, ns: &str, component: &str, port: i32, target: &str) -> Service {
    Service {
        metadata: meta(name, Some(ns), component),
        spec: Some(ServiceSpec {
            selector: Some(labels(component)),
            ports: Some(vec![ServicePort {
                name: Some("https".to_owned()),
                port,
                target_port: Some(IntOrString::String(target.to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn pdb(
    name: &str,
    ns: &str,
    component: &str,
    min: Option<i32>,
    max: Option<i32>,
) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(name, Some(ns), component),
        spec: Some(PodDisruptionBudgetSpec {
            selector: Some(selector(component)),
            min_available: min.map(IntOrString::Int),
            max_unavailable: max.map(IntOrString::Int),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

fn ca_statefulset(i: &Install) -> StatefulSet {
    let ns = i.namespace.as_str();
    let key = |k: &str, p: &str| KeyToPath {
        key: k.to_owned(),
        path: p.to_owned(),
        ..KeyToPath::default()
    };
    let container = Container {
        name: "ca".to_owned(),
        image: Some(i.image.clone()),
        args: Some(
            [
                "ca",
                "serve",
                "--dir",
                "/etc/warden-ca",
                "--state-dir",
                "/var/lib/warden",
                "--listen",
                "[::]:8443",
                "--admin",
                "[::]:9901",
            ]
            .map(str::to_owned)
            .to_vec(),
        ),
        // Also in the environment, so that `kubectl exec warden-ca-0 --
        // warden ca deny ...` (allow, audit verify) finds the same CA.
        env: Some(
            [
                EnvVar {
                    name: "WARDEN_CA_DIR".to_owned(),
                    value: Some("/etc/warden-ca".to_owned()),
                    ..EnvVar::default()
                },
                EnvVar {
                    name: "WARDEN_CA_STATE_DIR".to_owned(),
                    value: Some("/var/lib/warden".to_owned()),
                    ..EnvVar::default()
                },
            ]
            .into_iter()
            // Replicas: the shared store's URL (with its password) from a Secret.
            .chain(i.store_secret.as_ref().map(|name| EnvVar {
                name: "WARDEN_CA_STORE".to_owned(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: name.clone(),
                        key: "url".to_owned(),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            }))
            .collect(),
        ),
        ports: Some(vec![port("https", CA_PORT), port("admin", ADMIN_PORT)]),
        readiness_probe: Some(probe("/ready", 5)),
        liveness_probe: Some(probe("/live", 10)),
        resources: Some(resources("50m", "64Mi", "256Mi")),
        security_context: Some(hardened()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "ca".to_owned(),
                mount_path: "/etc/warden-ca".to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "state".to_owned(),
                mount_path: "/var/lib/warden".to_owned(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let volume = Volume {
        name: "ca".to_owned(),
        projected: Some(ProjectedVolumeSource {
            // The key readable by the CA's group only (fsGroup).
            default_mode: Some(0o440),
            sources: Some(vec![
                VolumeProjection {
                    secret: Some(SecretProjection {
                        name: "warden-ca-keys".to_owned(),
                        items: Some(vec![
                            key("tls.crt", "intermediate.pem"),
                            key("tls.key", "intermediate-key.pem"),
                            key("ca.crt", "root.pem"),
                        ]),
                        ..SecretProjection::default()
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    secret: Some(SecretProjection {
                        name: "warden-ca-secrets".to_owned(),
                        items: Some(vec![
                            key("store.key", "store.key"),
                            key("root-key.pem", "root-key.pem"),
                        ]),
                        optional: Some(true),
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: "warden-ca-config".to_owned(),
                        items: Some(vec![
                            key("ca.yaml", "ca.yaml"),
                            key("bundle.pem", "bundle.pem"),
                        ]),
                        ..ConfigMapProjection::default()
                    }),
                    ..VolumeProjection::default()
                },
            ]),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    };
    StatefulSet {
        metadata: meta("warden-ca", Some(ns), "ca"),
        spec: StatefulSetSpec {
            // One writer of an embedded store; replicas share PostgreSQL.
            replicas: Some(if i.store_secret.is_some() {
                i.ca_replicas
            } else {
                1
            }),
            service_name: Some("warden-ca".to_owned()),
            selector: selector("ca"),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels("ca")),
                    annotations: Some(BTreeMap::from([(INJECT.to_owned(), "disabled".to_owned())])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some("warden-ca".to_owned()),
                    security_context: Some(pod_security()),
                    containers: vec![container],
                    volumes: Some(vec![volume]),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("state".to_owned()),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([("storage".to_owned(), quantity("1Gi"))])),
                        ..VolumeResourceRequirements::default()
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            }]),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    }
}

/// Where the webhook's pod finds the CA's bundle and its projected token.
const WEBHOOK_SECRETS: &str = "/var/run/secrets/warden";

fn webhook_deployment(i: &Install) -> Deployment {
    let ns = i.namespace.as_str();
    let mut args: Vec<String> = [
        "webhook",
        "--listen",
        &format!("[::]:{WEBHOOK_PORT}"),
        "--admin",
        &format!("[::]:{ADMIN_PORT}"),
        // Its certificate from the CA, attested like a sidecar and renewed
        // at half-life, for the names the CA grants it.
        "--k8s-token",
        &format!("{WEBHOOK_SECRETS}/token"),
        "--bundle",
        &format!("{WEBHOOK_SECRETS}/bundle.pem"),
        "--ca-url",
        &format!("https://warden-ca.{ns}.svc:{CA_PORT}"),
        // The CA's longest leaf (its default max_ttl): renewed at 40-60% of
        // its life, a certificate then outlasts a CA outage of at least
        // about 9.5 h, during which the Fail policy would otherwise block
        // pod creation.
        "--ttl",
        "24h",
        "--image",
        &i.image,
        "--trust-domain",
        &i.trust_domain,
    ]
    .map(str::to_owned)
    .to_vec();
    for name in webhook_dns_names(ns) {
        args.extend(["--dns-name".to_owned(), name]);
    }
    let container = Container {
        name: "webhook".to_owned(),
        image: Some(i.image.clone()),
        args: Some(args),
        ports: Some(vec![port("https", WEBHOOK_PORT), port("admin", ADMIN_PORT)]),
        readiness_probe: Some(probe("/ready", 5)),
        liveness_probe: Some(probe("/live", 10)),
        resources: Some(resources("20m", "32Mi", "256Mi")),
        security_context: Some(hardened()),
        volume_mounts: Some(vec![VolumeMount {
            name: "warden".to_owned(),
            mount_path: WEBHOOK_SECRETS.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    // The bundle from the CA's ConfigMap and a token with warden's
    // audience, in one read-only volume.
    let volume = Volume {
        name: "warden".to_owned(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o440),
            sources: Some(vec![
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: "warden-ca-config".to_owned(),
                        items: Some(vec![KeyToPath {
                            key: "bundle.pem".to_owned(),
                            path: "bundle.pem".to_owned(),
                            ..KeyToPath::default()
                        }]),
                        ..ConfigMapProjection::default()
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some("warden".to_owned()),
                        expiration_seconds: Some(3600),
                        path: "token".to_owned(),
                        ..ServiceAccountTokenProjection::default()
                    }),
                    ..VolumeProjection::default()
                },
            ]),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    };
    Deployment {
        metadata: meta("warden-webhook", Some(ns), "webhook"),
        spec: DeploymentSpec {
            replicas: Some(i.webhook_replicas),
            selector: selector("webhook"),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels("webhook")),
                    annotations: Some(BTreeMap::from([(INJECT.to_owned(), "disabled".to_owned())])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some("warden-webhook".to_owned()),
                    automount_service_account_token: Some(false),
                    security_context: Some(pod_security()),
                    containers: vec![container],
                    volumes: Some(vec![volume]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

fn mutating_webhooks(i: &Install) -> MutatingWebhookConfiguration {
    let ns = i.namespace.as_str();
    let not_system = |extra: Vec<LabelSelectorRequirement>| {
        let mut exprs = vec![LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".to_owned(),
            operator: "NotIn".to_owned(),
            values: Some(vec!["kube-system".to_owned(), ns.to_owned()]),
        }];
        exprs.extend(extra);
        LabelSelector {
            match_expressions: Some(exprs),
            ..LabelSelector::default()
        }
    };
    let labelled = |op: &str| LabelSelectorRequirement {
        key: INJECT.to_owned(),
        operator: op.to_owned(),
        values: Some(vec!["enabled".to_owned()]),
    };
    let hook = |name: &str, path: &str, namespaces: LabelSelector, pods: Option<LabelSelector>| {
        MutatingWebhook {
            name: name.to_owned(),
            admission_review_versions: vec!["v1".to_owned()],
            client_config: WebhookClientConfig {
                ca_bundle: Some(ByteString(i.bundle_pem.as_bytes().to_vec())),
                service: Some(ServiceReference {
                    name: "warden-webhook".to_owned(),
                    namespace: ns.to_owned(),
                    path: Some(path.to_owned()),
                    port: Some(443),
                }),
                url: None,
            },
            // Fail, scoped: see README ("Failure policy").
            failure_policy: Some("Fail".to_owned()),
            side_effects: "None".to_owned(),
            timeout_seconds: Some(5),
            reinvocation_policy: Some("IfNeeded".to_owned()),
            namespace_selector: Some(namespaces),
            object_selector: pods,
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![String::new()]),
                api_versions: Some(vec!["v1".to_owned()]),
                operations: Some(vec!["CREATE".to_owned()]),
                resources: Some(vec!["pods".to_owned()]),
                scope: Some("Namespaced".to_owned()),
            }]),
            ..MutatingWebhook::default()
        }
    };
    MutatingWebhookConfiguration {
        metadata: meta("warden-injector", None, "webhook"),
        webhooks: Some(vec![
            hook(
                "namespace.inject.warden.dev",
                "/inject/namespace",
                not_system(vec![labelled("In")]),
                None,
            ),
            // Elsewhere only pods labelled for it are sent: a webhook
            // outage never blocks pods that did not ask.
            hook(
                "pod.inject.warden.dev",
                "/inject/pod",
                not_system(vec![labelled("NotIn")]),
                Some(LabelSelector {
                    match_expressions: Some(vec![labelled("In")]),
                    ..LabelSelector::default()
                }),
            ),
        ]),
    }
}

/// Every object, in the order `kubectl apply` needs them.
pub fn objects(i: &Install) -> Result<Vec<Value>, serde_json::Error> {
    let ns = i.namespace.as_str();
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(ns.to_owned()),
            labels: Some(BTreeMap::from([
                (INJECT.to_owned(), "disabled".to_owned()),
                (
                    "pod-security.kubernetes.io/enforce".to_owned(),
                    "restricted".to_owned(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    let account = |name: &str, component: &str| ServiceAccount {
        metadata: meta(name, Some(ns), component),
        ..ServiceAccount::default()
    };
    let role = ClusterRole {
        metadata: meta("warden-ca", None, "ca"),
        rules: Some(vec![
            PolicyRule {
                api_groups: Some(vec!["authentication.k8s.io".to_owned()]),
                resources: Some(vec!["tokenreviews".to_owned()]),
                verbs: vec!["create".to_owned()],
                ..PolicyRule::default()
            },
            PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["pods".to_owned()]),
                verbs: vec!["get".to_owned()],
                ..PolicyRule::default()
            },
        ]),
        ..ClusterRole::default()
    };
    let binding = ClusterRoleBinding {
        metadata: meta("warden-ca", None, "ca"),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "ClusterRole".to_owned(),
            name: "warden-ca".to_owned(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: "warden-ca".to_owned(),
            namespace: Some(ns.to_owned()),
            ..Subject::default()
        }]),
    };
    let config = ConfigMap {
        metadata: meta("warden-ca-config", Some(ns), "ca"),
        data: Some(BTreeMap::from([
            ("ca.yaml".to_owned(), i.ca_yaml.clone()),
            ("bundle.pem".to_owned(), i.bundle_pem.clone()),
        ])),
        ..ConfigMap::default()
    };
    fn v<T: serde::Serialize>(o: &T) -> Result<Value, serde_json::Error> {
        serde_json::to_value(o)
    }
    Ok(vec![
        v(&namespace)?,
        v(&account("warden-ca", "ca"))?,
        v(&account("warden-webhook", "webhook"))?,
        v(&role)?,
        v(&binding)?,
        v(&tls_secret(
            "warden-ca-keys",
            ns,
            "ca",
            &i.intermediate_pem,
            &i.intermediate_key_pem,
            &i.root_pem,
        ))?,
        v(&ca_secrets(i))?,
        v(&config)?,
        v(&service("warden-ca", ns, "ca", CA_PORT, "https"))?,
        v(&ca_statefulset(i))?,
        v(&pdb("warden-ca", ns, "ca", None, Some(1)))?,
        v(&service("warden-webhook", ns, "webhook", 443, "https"))?,
        v(&webhook_deployment(i))?,
        // One replica must not block node drains forever.
        v(&if i.webhook_replicas > 1 {
            pdb("warden-webhook", ns, "webhook", Some(1), None)
        } else {
            pdb("warden-webhook", ns, "webhook", None, Some(1))
        })?,
        v(&mutating_webhooks(i))?,
    ])
}

/// The objects as one multi-document YAML stream.
pub fn manifests(i: &Install) -> Result<String, String> {
    let mut out = String::new();
    for o in objects(i).map_err(|e| e.to_string())? {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&o).map_err(|e| e.to_string())?);
    }
    Ok(out)
}
