//! SPIFFE identities, validated as the SPIFFE ID specification says.
//!
//! A `SpiffeId` can only be built through validation, so code that holds one
//! never has to wonder whether it is well formed. The rules (SPIFFE ID spec,
//! sections 2.1-2.3): scheme `spiffe`, a trust domain of lowercase letters,
//! digits, `.`, `-` and `_`; a path of `/`-separated segments of letters,
//! digits, `.`, `-` and `_`, none empty, `.` or `..`; no query, fragment, port
//! or userinfo; at most 2048 bytes in all.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

const SCHEME: &str = "spiffe://";
/// The SPIFFE spec caps a SPIFFE ID, scheme included, at 2048 bytes.
pub const MAX_ID_LEN: usize = 2048;
/// The trust domain is a DNS-like name; the spec caps it at 255 bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// Empty input.
    #[error("spiffe id is empty")]
    Empty,
    /// Longer than the spec's 2048 bytes.
    #[error("spiffe id is {len} bytes, more than the limit of {MAX_ID_LEN}")]
    TooLong {
        /// Length of the rejected input.
        len: usize,
    },
    /// Not the `spiffe://` scheme (the scheme is matched case-sensitively, as in go-spiffe).
    #[error("spiffe id must start with spiffe://")]
    WrongScheme,
    /// Nothing between `spiffe://` and the path.
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain is longer than a DNS name can be.
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    /// A character outside `[a-z0-9._-]` in the trust domain (uppercase, port, userinfo, ...).
    #[error(
        "trust domain has the character {0:?}; only lowercase letters, digits, '.', '-' and '_' are allowed (no port, no userinfo)"
    )]
    BadTrustDomainChar(char),
    /// A character outside `[A-Za-z0-9._-]` in a path segment, `%` included.
    #[error(
        "path has the character {0:?}; only letters, digits, '.', '-' and '_' are allowed (no percent-encoding, query or fragment)"
    )]
    BadPathChar(char),
    /// `//` inside the path, or a trailing `/`.
    #[error("path has an empty segment (a doubled or trailing '/')")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("path has a '.' or '..' segment")]
    DotSegment,
    /// A workload identity must name something inside the trust domain.
    #[error("a workload spiffe id needs a path after the trust domain")]
    MissingPath,
}

/// A SPIFFE trust domain such as `prod.example.org`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`) or its SPIFFE ID form
    /// (`spiffe://example.org`).
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        let name = s.strip_prefix(SCHEME).unwrap_or(s);
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    /// The name, without scheme.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID form, `spiffe://<name>`.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A workload's SPIFFE ID: `spiffe://<trust-domain>/<path>` with a non-empty path.
///
/// Stored as the one canonical string plus the offset where the path starts,
/// so `Display`, comparison and hashing cost nothing extra.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    path_start: usize,
}

impl SpiffeId {
    /// Parses and validates a workload SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: s.len() });
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        if path.is_empty() {
            return Err(SpiffeIdError::MissingPath);
        }
        validate_path(path)?;
        Ok(Self {
            id: s.to_owned(),
            path_start: SCHEME.len() + td.len(),
        })
    }

    /// Builds `spiffe://<td><path>`; `path` must start with `/`.
    pub fn new(td: &TrustDomain, path: &str) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!("{SCHEME}{}{path}", td.as_str()))
    }

    /// The trust domain name (without scheme).
    pub fn trust_domain_str(&self) -> &str {
        &self.id[SCHEME.len()..self.path_start]
    }

    /// The trust domain as its own type.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_owned())
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// True when `self` lies in trust domain `td`.
    pub fn is_in(&self, td: &TrustDomain) -> bool {
        self.trust_domain_str() == td.as_str()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(SpiffeIdError::BadTrustDomainChar(c)),
        None => Ok(()),
    }
}

/// Validates a non-empty path that starts with `/`.
fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    for segment in path.split('/').skip(1) {
        if segment.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(SpiffeIdError::BadPathChar(c));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> SpiffeIdError {
        SpiffeId::parse(s).unwrap_err()
    }

    #[test]
    fn valid_ids_round_trip() {
        for s in [
            "spiffe://example.org/web",
            "spiffe://prod.example-1.org/ns/default/sa/api_v2",
            "spiffe://td/A.b-C_d/e",
            "spiffe://a_b.c/x/...x/y..",
        ] {
            let id = SpiffeId::parse(s).unwrap();
            assert_eq!(id.to_string(), s);
            assert_eq!(id, s.parse().unwrap());
        }
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap();
        assert_eq!(id.trust_domain_str(), "example.org");
        assert_eq!(id.path(), "/ns/prod/sa/web");
        assert!(id.is_in(&TrustDomain::parse("example.org").unwrap()));
        assert!(!id.is_in(&TrustDomain::parse("example.com").unwrap()));
    }

    #[test]
    fn rejects_other_schemes() {
        assert_eq!(err("https://example.org/web"), SpiffeIdError::WrongScheme);
        assert_eq!(err("SPIFFE://example.org/web"), SpiffeIdError::WrongScheme);
        assert_eq!(err("spiffe:/example.org/web"), SpiffeIdError::WrongScheme);
        assert_eq!(err("example.org/web"), SpiffeIdError::WrongScheme);
    }

    #[test]
    fn rejects_empty_input_and_empty_trust_domain() {
        assert_eq!(err(""), SpiffeIdError::Empty);
        assert_eq!(err("spiffe://"), SpiffeIdError::EmptyTrustDomain);
        assert_eq!(err("spiffe:///web"), SpiffeIdError::EmptyTrustDomain);
    }

    #[test]
    fn rejects_uppercase_trust_domain() {
        assert_eq!(
            err("spiffe://Example.org/web"),
            SpiffeIdError::BadTrustDomainChar('E')
        );
    }

    #[test]
    fn rejects_port_and_userinfo() {
        assert_eq!(
            err("spiffe://example.org:8443/web"),
            SpiffeIdError::BadTrustDomainChar(':')
        );
        assert_eq!(
            err("spiffe://user@example.org/web"),
            SpiffeIdError::BadTrustDomainChar('@')
        );
        assert_eq!(
            err("spiffe://user:pw@example.org/web"),
            SpiffeIdError::BadTrustDomainChar(':')
        );
    }

    #[test]
    fn rejects_empty_and_dot_segments_and_trailing_slash() {
        assert_eq!(err("spiffe://example.org/"), SpiffeIdError::EmptySegment);
        assert_eq!(
            err("spiffe://example.org/a//b"),
            SpiffeIdError::EmptySegment
        );
        assert_eq!(err("spiffe://example.org/a/"), SpiffeIdError::EmptySegment);
        assert_eq!(err("spiffe://example.org/a/./b"), SpiffeIdError::DotSegment);
        assert_eq!(err("spiffe://example.org/a/.."), SpiffeIdError::DotSegment);
        assert_eq!(err("spiffe://example.org/."), SpiffeIdError::DotSegment);
    }

    #[test]
    fn rejects_bad_path_characters_and_percent_encoding() {
        assert_eq!(
            err("spiffe://example.org/a%2Fb"),
            SpiffeIdError::BadPathChar('%')
        );
        assert_eq!(
            err("spiffe://example.org/a b"),
            SpiffeIdError::BadPathChar(' ')
        );
        assert_eq!(
            err("spiffe://example.org/caf\u{e9}"),
            SpiffeIdError::BadPathChar('\u{e9}')
        );
        assert_eq!(
            err("spiffe://example.org/a\\b"),
            SpiffeIdError::BadPathChar('\\')
        );
    }

    #[test]
    fn rejects_query_and_fragment() {
        assert_eq!(
            err("spiffe://example.org/web?x=1"),
            SpiffeIdError::BadPathChar('?')
        );
        assert_eq!(
            err("spiffe://example.org/web#frag"),
            SpiffeIdError::BadPathChar('#')
        );
        assert_eq!(
            err("spiffe://example.org?x=1"),
            SpiffeIdError::BadTrustDomainChar('?')
        );
        assert_eq!(
            err("spiffe://example.org#f"),
            SpiffeIdError::BadTrustDomainChar('#')
        );
    }

    #[test]
    fn rejects_missing_path_for_workload_ids() {
        assert_eq!(err("spiffe://example.org"), SpiffeIdError::MissingPath);
        // ...but the trust domain form is fine as a TrustDomain.
        assert_eq!(
            TrustDomain::parse("spiffe://example.org").unwrap().as_str(),
            "example.org"
        );
    }

    #[test]
    fn rejects_ids_over_2048_bytes() {
        let long = format!("spiffe://example.org/{}", "a".repeat(MAX_ID_LEN));
        assert_eq!(err(&long), SpiffeIdError::TooLong { len: long.len() });
        let fits = format!("spiffe://example.org/{}", "a".repeat(MAX_ID_LEN - 21));
        assert_eq!(fits.len(), MAX_ID_LEN);
        assert!(SpiffeId::parse(&fits).is_ok());
    }

    #[test]
    fn trust_domain_rules() {
        assert!(TrustDomain::parse("a-b_c.9").is_ok());
        assert_eq!(TrustDomain::parse(""), Err(SpiffeIdError::EmptyTrustDomain));
        assert_eq!(
            TrustDomain::parse("Example.org"),
            Err(SpiffeIdError::BadTrustDomainChar('E'))
        );
        assert_eq!(
            TrustDomain::parse(&"a".repeat(256)),
            Err(SpiffeIdError::TrustDomainTooLong)
        );
    }
}
