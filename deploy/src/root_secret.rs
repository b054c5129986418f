//! Bring-your-own root for `warden install --root-secret FILE`: a Secret
//! manifest in cert-manager's layout, as `kubectl get secret NAME -o yaml`
//! (or `-o json`) prints it: `data.tls.crt` the root certificate,
//! `data.tls.key` its key, optionally `data.ca.crt` (for a self-signed
//! root, as cert-manager's SelfSigned and CA issuers write it, the same
//! certificate), each base64. `stringData`, as a hand-written manifest may
//! have it, is read too.

use std::path::Path;

use base64::Engine;
use serde_json::Value;

/// The root read from a Secret: PEM text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    /// `tls.crt`.
    pub cert_pem: String,
    /// `tls.key`.
    pub key_pem: String,
}

/// Why a Secret manifest cannot give the root; each says the file.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        /// Which file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not YAML or JSON, or not a Secret.
    #[error("{file}: {what}")]
    NotASecret {
        /// Which file.
        file: String,
        /// What it is instead.
        what: String,
    },
    /// A key the root needs is not there.
    #[error("{file}: the Secret has no {key} in data (nor in stringData){hint}")]
    Missing {
        /// Which file.
        file: String,
        /// `tls.crt` or `tls.key`.
        key: &'static str,
        /// What the Secret holds instead, to help.
        hint: String,
    },
    /// A key's value is not what it should be.
    #[error("{file}: data.{key}: {what}")]
    Bad {
        /// Which file.
        file: String,
        /// Which key.
        key: &'static str,
        /// What is wrong.
        what: String,
    },
}

/// Reads the root from the Secret manifest in `path`.
pub fn read(path: &Path) -> Result<Root, SecretError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
        file: file.clone(),
        source,
    })?;
    parse(&file, &text)
}

/// Reads the root from the text of a Secret manifest (`file` names it in
/// messages).
pub fn parse(file: &str, text: &str) -> Result<Root, SecretError> {
    let not = |what: String| SecretError::NotASecret {
        file: file.to_owned(),
        what,
    };
    let body = text.trim_start_matches('\u{feff}');
    let body = body
        .strip_prefix("---")
        .map_or(body, |rest| rest.split_once('\n').map_or("", |(_, b)| b));
    let secret: Value = serde_saphyr::from_str(body)
        .map_err(|e| not(format!("not a YAML or JSON manifest: {e}")))?;
    match (secret["apiVersion"].as_str(), secret["kind"].as_str()) {
        (Some("v1"), Some("Secret")) => {}
        (_, Some("List")) => {
            return Err(not(
                "a List, not one Secret: `kubectl get secret NAME -o yaml` prints one".into(),
            ));
        }
        (v, k) => {
            return Err(not(format!(
                "not a v1 Secret (apiVersion {}, kind {})",
                v.unwrap_or("missing"),
                k.unwrap_or("missing")
            )));
        }
    }
    let held: Vec<String> = ["data", "stringData"]
        .iter()
        .filter_map(|f| secret[*f].as_object())
        .flat_map(|m| m.keys().cloned())
        .collect();
    let get = |key: &'static str| -> Result<Option<String>, SecretError> {
        let bad = |what: String| SecretError::Bad {
            file: file.to_owned(),
            key,
            what,
        };
        if let Some(v) = secret["data"].get(key).filter(|v| !v.is_null()) {
            let b64 = v.as_str().ok_or_else(|| bad("not a string".into()))?;
            let cleaned: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(cleaned)
                .map_err(|e| bad(format!("not base64: {e}")))?;
            let pem = String::from_utf8(bytes).map_err(|_| bad("not PEM text".into()))?;
            return Ok(Some(pem));
        }
        match secret["stringData"].get(key).filter(|v| !v.is_null()) {
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_owned()))
                .ok_or_else(|| bad("not a string".into())),
            None => Ok(None),
        }
    };
    let need = |key: &'static str| -> Result<String, SecretError> {
        let pem = get(key)?.ok_or_else(|| SecretError::Missing {
            file: file.to_owned(),
            key,
            hint: if held.is_empty() {
                " (it holds no keys)".into()
            } else {
                format!(" (it holds {})", held.join(", "))
            },
        })?;
        if !pem.contains("-----BEGIN ") {
            return Err(SecretError::Bad {
                file: file.to_owned(),
                key,
                what: "not PEM (no -----BEGIN line)".into(),
            });
        }
        Ok(pem)
    };
    let cert_pem = need("tls.crt")?;
    let key_pem = need("tls.key")?;
    // ca.crt, when there, must be the root itself: warden's root is the
    // trust anchor, and an intermediate under another root is not one.
    if let Some(ca) = get("ca.crt")?
        && !ca.trim().is_empty()
        && first_pem_block(&ca) != first_pem_block(&cert_pem)
    {
        return Err(SecretError::Bad {
            file: file.to_owned(),
            key: "ca.crt",
            what: "differs from tls.crt: the root must be a self-signed CA certificate \
                   (tls.crt) that is its own ca.crt; a certificate issued under another \
                   root cannot be warden's trust anchor"
                .into(),
        });
    }
    Ok(Root { cert_pem, key_pem })
}

/// The first PEM block, whitespace aside.
fn first_pem_block(pem: &str) -> String {
    let start = pem.find("-----BEGIN ").unwrap_or(0);
    let end = pem[start..]
        .find("-----END ")
        .and_then(|e| pem[start + e..].find("\n").map(|n| start + e + n))
        .unwrap_or(pem.len());
    pem[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBroot\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGkey\n-----END PRIVATE KEY-----\n";

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn kubectl_yaml_and_json_both_read() {
        let yaml = format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: root\n  namespace: cert-manager\ntype: kubernetes.io/tls\ndata:\n  ca.crt: {}\n  tls.crt: {}\n  tls.key: {}\n",
            b64(CERT),
            b64(CERT),
            b64(KEY)
        );
        let root = parse("root.yaml", &yaml).unwrap();
        assert_eq!((root.cert_pem.as_str(), root.key_pem.as_str()), (CERT, KEY));
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "root"},
            "data": {"tls.crt": b64(CERT), "tls.key": b64(KEY)},
        });
        assert_eq!(parse("root.json", &json.to_string()).unwrap(), root);
    }

    #[test]
    fn what_is_missing_or_wrong_is_named_with_the_file() {
        let secret = |data: &str| format!("apiVersion: v1\nkind: Secret\ndata: {{{data}}}\n");
        let e = parse("s.yaml", &secret(&format!("tls.crt: {}", b64(CERT)))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "s.yaml: the Secret has no tls.key in data (nor in stringData) (it holds tls.crt)"
        );
        let e = parse("s.yaml", &secret("tls.crt: '%%%', tls.key: x")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("s.yaml: data.tls.crt: not base64"),
            "{e}"
        );
        let other = "-----BEGIN CERTIFICATE-----\nMIIBother\n-----END CERTIFICATE-----\n";
        let e = parse(
            "s.yaml",
            &secret(&format!(
                "tls.crt: {}, tls.key: {}, ca.crt: {}",
                b64(CERT),
                b64(KEY),
                b64(other)
            )),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("data.ca.crt: differs from tls.crt"),
            "{e}"
        );
        let e = parse("cm.yaml", "apiVersion: v1\nkind: ConfigMap\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("not a v1 Secret (apiVersion v1, kind ConfigMap)"),
            "{e}"
        );
        let e = parse("junk", "{not: [yaml").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("junk: not a YAML or JSON manifest"),
            "{e}"
        );
    }
}
