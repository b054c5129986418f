//! DNS names as certificates and Kubernetes carry them: checked the same
//! way wherever a name comes in (a CA's grant in `ca.yaml`, a token's
//! claims, `warden ca issue --dns-name`).

/// Whether `name` is a DNS name a certificate may carry (and a Kubernetes
/// object name may be): lowercase RFC 1123 labels, at most 253 bytes, no
/// wildcard.
pub fn valid_dns_name(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(valid_dns_label)
}

/// An RFC 1123 label: 1-63 of `a-z0-9-`, starting and ending alphanumeric
/// (a Kubernetes namespace).
pub fn valid_dns_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}
