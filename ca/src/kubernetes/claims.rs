//! A projected ServiceAccount token's header and claims, and the checks
//! every mode applies to them once the signature is known to be the
//! cluster's: issuer, audience, lifetime, and that `sub` and the
//! `kubernetes.io` claims name the same pod-bound ServiceAccount.

use base64::Engine;
use serde::Deserialize;

use super::Refused;
use crate::profile::{valid_dns_label, valid_dns_name};

/// Signature algorithms a cluster signs tokens with. Never `none`, never
/// HMAC (a shared secret is not the cluster's key).
pub const ALGORITHMS: [jsonwebtoken::Algorithm; 6] = [
    jsonwebtoken::Algorithm::RS256,
    jsonwebtoken::Algorithm::RS384,
    jsonwebtoken::Algorithm::RS512,
    jsonwebtoken::Algorithm::ES256,
    jsonwebtoken::Algorithm::ES384,
    jsonwebtoken::Algorithm::PS256,
];

/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
pub const LEEWAY_S: i64 = 30;

/// Largest token accepted (a real one is about 1 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// What the header says.
#[derive(Debug)]
pub struct Header {
    /// The algorithm, one of [`ALGORITHMS`].
    pub alg: jsonwebtoken::Algorithm,
    /// The signing key's ID.
    pub kid: Option<String>,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
}

/// Reads the header, refusing an algorithm that is not a public-key one
/// before anything else looks at the token.
pub fn header(token: &str) -> Result<Header, Refused> {
    if token.len() > MAX_TOKEN_BYTES || token.split('.').count() != 3 {
        return Err(Refused::Malformed("not a JWS compact token".into()));
    }
    let part = token.split('.').next().unwrap_or("");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| Refused::Malformed("header is not base64url".into()))?;
    let raw: RawHeader =
        serde_json::from_slice(&bytes).map_err(|e| Refused::Malformed(format!("header: {e}")))?;
    let alg = ALGORITHMS
        .iter()
        .find(|a| format!("{a:?}") == raw.alg)
        .copied()
        .ok_or(Refused::Algorithm(raw.alg.chars().take(16).collect()))?;
    Ok(Header { alg, kid: raw.kid })
}

/// `aud`: a string or an array of strings (RFC 7519 section 4.1.3).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// One audience.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, a: &str) -> bool {
        match self {
            Audience::One(s) => s == a,
            Audience::Many(v) => v.iter().any(|s| s == a),
        }
    }
}

/// A name and UID in the `kubernetes.io` claim.
#[derive(Debug, Clone, Deserialize)]
pub struct Bound {
    /// Object name.
    pub name: String,
    /// Object UID.
    pub uid: String,
}

/// The `kubernetes.io` claim.
#[derive(Debug, Clone, Deserialize)]
pub struct KubernetesClaim {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod the token is bound to (absent for `kubectl create token`
    /// without `--bound-object-kind Pod`).
    pub pod: Option<Bound>,
    /// The ServiceAccount.
    pub serviceaccount: Option<Bound>,
    /// The node (Kubernetes 1.30+).
    pub node: Option<Bound>,
}

/// The claims warden reads.
#[derive(Debug, Deserialize)]
pub struct Claims {
    /// Issuer.
    pub iss: Option<String>,
    /// `system:serviceaccount:<namespace>:<name>`.
    pub sub: Option<String>,
    /// Audience(s).
    pub aud: Option<Audience>,
    /// Expiry (seconds since the epoch).
    pub exp: Option<i64>,
    /// Issued at.
    pub iat: Option<i64>,
    /// Not before.
    pub nbf: Option<i64>,
    /// The pod, ServiceAccount and namespace.
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: Option<KubernetesClaim>,
}

/// What the checks establish: the pod-bound ServiceAccount.
#[derive(Debug, Clone)]
pub struct Subject {
    /// Namespace.
    pub namespace: String,
    /// ServiceAccount name.
    pub service_account: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's UID.
    pub pod_uid: String,
}

/// The claims as the token states them, unverified (its signature is
/// checked by whoever calls this, or by the API server).
pub fn unverified(token: &str) -> Result<Claims, Refused> {
    jsonwebtoken::dangerous::insecure_decode_claims::<Claims>(token)
        .map_err(|e| Refused::Malformed(format!("claims: {e}")))
}

/// The settings the claims are checked against.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    /// Required `iss`, when configured.
    pub issuer: Option<&'a str>,
    /// Required member of `aud`.
    pub audience: &'a str,
    /// Longest `exp - iat`, in seconds.
    pub max_lifetime_s: i64,
}

/// Checks the claims at `now` (seconds since the epoch).
pub fn check(c: &Claims, expect: &Expect<'_>, now: i64) -> Result<Subject, Refused> {
    if let Some(want) = expect.issuer
        && c.iss.as_deref().map(|i| i.trim_end_matches('/')) != Some(want)
    {
        return Err(Refused::Issuer(c.iss.clone().unwrap_or_default()));
    }
    if !c.aud.as_ref().is_some_and(|a| a.contains(expect.audience)) {
        return Err(Refused::Audience(expect.audience.to_owned()));
    }
    let exp = c.exp.ok_or(Refused::Malformed("no exp".into()))?;
    let iat = c.iat.ok_or(Refused::Malformed("no iat".into()))?;
    if exp <= now - LEEWAY_S {
        return Err(Refused::Expired);
    }
    if c.nbf.unwrap_or(iat) > now + LEEWAY_S || iat > now + LEEWAY_S {
        return Err(Refused::NotYetValid);
    }
    let lifetime = exp
        .checked_sub(iat)
        .ok_or(Refused::Malformed("exp and iat out of range".into()))?;
    if lifetime > expect.max_lifetime_s {
        return Err(Refused::Lifetime(lifetime, expect.max_lifetime_s));
    }
    let k = c
        .kubernetes
        .as_ref()
        .ok_or(Refused::Subject("no kubernetes.io claim".into()))?;
    let sa = k.serviceaccount.as_ref().ok_or(Refused::Subject(
        "no kubernetes.io.serviceaccount claim".into(),
    ))?;
    let want_sub = format!("system:serviceaccount:{}:{}", k.namespace, sa.name);
    if c.sub.as_deref() != Some(want_sub.as_str()) {
        return Err(Refused::Subject(format!(
            "sub {:?} is not {want_sub:?}",
            c.sub.as_deref().unwrap_or("")
        )));
    }
    let pod = k.pod.as_ref().ok_or(Refused::NoPod)?;
    Subject::new(&k.namespace, &sa.name, &pod.name, &pod.uid)
}

impl Subject {
    /// A subject whose names are what Kubernetes allows (a namespace is a
    /// DNS label, a ServiceAccount or pod name a DNS subdomain), so that no
    /// name can add segments to the SPIFFE ID or to an API path.
    pub fn new(
        namespace: &str,
        service_account: &str,
        pod: &str,
        pod_uid: &str,
    ) -> Result<Self, Refused> {
        let bad = |what: &str, v: &str| {
            Refused::Subject(format!(
                "{what} {:?} is not a Kubernetes name",
                v.chars().take(64).collect::<String>()
            ))
        };
        if !valid_dns_label(namespace) {
            return Err(bad("namespace", namespace));
        }
        if !valid_dns_name(service_account) {
            return Err(bad("ServiceAccount", service_account));
        }
        if !valid_dns_name(pod) {
            return Err(bad("pod", pod));
        }
        if pod_uid.is_empty()
            || pod_uid.len() > 64
            || !pod_uid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(bad("pod UID", pod_uid));
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod: pod.to_owned(),
            pod_uid: pod_uid.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn b64(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn token(header: serde_json::Value, claims: serde_json::Value) -> String {
        format!("{}.{}.c2ln", b64(&header), b64(&claims))
    }

    fn claims(now: i64) -> serde_json::Value {
        serde_json::json!({
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": "system:serviceaccount:shop:cart",
            "aud": ["warden"],
            "exp": now + 3600, "iat": now, "nbf": now,
            "kubernetes.io": {
                "namespace": "shop",
                "pod": {"name": "cart-7d9", "uid": "3f1c"},
                "serviceaccount": {"name": "cart", "uid": "9a2b"}
            }
        })
    }

    const EXPECT: Expect<'static> = Expect {
        issuer: Some("https://kubernetes.default.svc.cluster.local"),
        audience: "warden",
        max_lifetime_s: 86_400,
    };

    #[test]
    fn none_and_hmac_are_refused_by_the_header() {
        for alg in ["none", "HS256", "HS512", "EdDSA"] {
            let t = token(serde_json::json!({"alg": alg}), claims(0));
            assert!(matches!(header(&t), Err(Refused::Algorithm(_))), "{alg}");
        }
        let t = token(serde_json::json!({"alg": "RS256", "kid": "k"}), claims(0));
        assert_eq!(header(&t).unwrap().kid.as_deref(), Some("k"));
    }

    #[test]
    fn each_claim_rule_refuses() {
        let now = 1_700_000_000;
        let ok = |c: serde_json::Value| {
            check(
                &unverified(&token(serde_json::json!({"alg": "RS256"}), c)).unwrap(),
                &EXPECT,
                now,
            )
        };
        let s = ok(claims(now)).unwrap();
        assert_eq!(
            (
                s.namespace.as_str(),
                s.service_account.as_str(),
                s.pod.as_str()
            ),
            ("shop", "cart", "cart-7d9")
        );
        let mut one = claims(now);
        one["aud"] = "warden".into();
        assert!(ok(one).is_ok(), "aud may be a string");
        let with = |k: &str, v: serde_json::Value| {
            let mut c = claims(now);
            c[k] = v;
            ok(c)
        };
        assert!(matches!(
            with("aud", serde_json::json!(["https://kubernetes.default.svc"])),
            Err(Refused::Audience(_))
        ));
        assert!(matches!(
            with("iss", "https://evil".into()),
            Err(Refused::Issuer(_))
        ));
        assert!(matches!(
            with("exp", (now - 60).into()),
            Err(Refused::Expired)
        ));
        assert!(matches!(
            with("nbf", (now + 600).into()),
            Err(Refused::NotYetValid)
        ));
        assert!(matches!(
            with("exp", (now + 3 * 86_400).into()),
            Err(Refused::Lifetime(..))
        ));
        assert!(matches!(
            with("sub", "system:serviceaccount:shop:admin".into()),
            Err(Refused::Subject(_))
        ));
        let mut unbound = claims(now);
        unbound["kubernetes.io"]
            .as_object_mut()
            .unwrap()
            .remove("pod");
        assert!(matches!(ok(unbound), Err(Refused::NoPod)));
    }
}
