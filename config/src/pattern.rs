//! What a rule matches on: identity patterns (which SPIFFE IDs a rule or a
//! destination accepts), path patterns over normalized paths, and method names.
//!
//! Identity patterns have three shapes, written as SPIFFE IDs so they read
//! like what they match:
//! - `spiffe://td/ns/prod/web`: exactly that ID;
//! - `spiffe://td/ns/prod/*`: every ID whose path continues below `/ns/prod/`
//!   (whole segments only: `/ns/production` does not match);
//! - `spiffe://td/*`: every workload in trust domain `td`.
//!
//! `*` is only allowed as the whole last segment; anything else is an error,
//! so a typo can never widen a rule silently.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// A path matcher: `/exact` or `/prefix/*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// The normalized path equals this.
    Exact(String),
    /// The normalized path starts with this (which ends in `/`), or equals it without the slash.
    Prefix(String),
}

impl PathMatch {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err(format!("path {s:?} must start with '/'"));
        }
        let body = s.strip_suffix('*').unwrap_or(s);
        if body.contains('*') || (s.ends_with('*') && !body.ends_with('/')) {
            return Err(format!(
                "path {s:?}: '*' is only allowed at the end, after '/', as in /api/*"
            ));
        }
        // Requests are matched in their normal form; a rule in any other
        // spelling could never match (a deny that never fires).
        match crate::normalize::normalize(body) {
            Ok(Cow::Borrowed(_)) => {}
            Ok(Cow::Owned(canonical)) => {
                return Err(format!(
                    "path {s:?} is not in normal form: requests are matched as {canonical:?}"
                ));
            }
            Err(e) => {
                return Err(format!("path {s:?} can never match a request: {e}"));
            }
        }
        Ok(if s.ends_with('*') {
            Self::Prefix(body.to_owned())
        } else {
            Self::Exact(s.to_owned())
        })
    }

    /// True when the normalized `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => p == path,
            Self::Prefix(p) => path.starts_with(p.as_str()) || path == &p[..p.len() - 1],
        }
    }

    /// The wide reading, for matches that refuse (a deny rule's `paths`, an
    /// allow rule's `not_paths`): ASCII case is ignored and an exact path
    /// also matches with a trailing `/`, since apps that fold case (Express,
    /// IIS) or route `/x/` like `/x` serve those spellings the same. A match
    /// that allows stays strict ([`PathMatch::matches`]): either way a
    /// respelled path fails closed.
    pub fn matches_widely(&self, path: &str) -> bool {
        let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        match self {
            Self::Exact(p) => eq(p, path) || path.strip_suffix('/').is_some_and(|q| eq(p, q)),
            Self::Prefix(p) => {
                path.get(..p.len()).is_some_and(|head| eq(head, p)) || eq(&p[..p.len() - 1], path)
            }
        }
    }

    /// True when every path `other` matches, this matches too.
    pub fn covers(&self, other: &PathMatch) -> bool {
        match (self, other) {
            (Self::Exact(a), Self::Exact(b)) => a == b,
            (Self::Prefix(_), Self::Exact(b)) => self.matches(b),
            // `/a/b/*` also matches `/a/b`, which `/a/*` matches as well.
            (Self::Prefix(a), Self::Prefix(b)) => b.starts_with(a.as_str()),
            (Self::Exact(_), Self::Prefix(_)) => false,
        }
    }

    /// True when some path is matched by both.
    pub fn overlaps(&self, other: &PathMatch) -> bool {
        self.covers(other) || other.covers(self)
    }
}

/// True when a rule listing `listed` is about requests with `method`.
/// HEAD is answered by GET handlers in most frameworks, so a rule about GET
/// is about HEAD too, in `methods` and `not_methods` alike: a deny on GET
/// cannot be bypassed with HEAD, nor can an allow of everything but GET.
pub fn method_covers(listed: &str, method: &str) -> bool {
    listed == method || (method == "HEAD" && listed == "GET")
}

/// Methods defined by RFC 9110, PATCH (RFC 5789) and WebDAV (RFC 4918):
/// a rule naming another is more likely a typo than an extension method.
pub const KNOWN_METHODS: &[&str] = &[
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "PATCH",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
];

/// A pattern over SPIFFE IDs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdentityPattern {
    /// One exact ID.
    Exact(SpiffeId),
    /// IDs in `trust_domain` whose path starts with `prefix` (which ends in `/`).
    Prefix {
        /// Trust domain the ID must be in.
        trust_domain: TrustDomain,
        /// Path prefix, starting and ending with `/`.
        prefix: String,
    },
    /// Every ID in a trust domain.
    TrustDomain(TrustDomain),
}

/// Why a string is not a valid identity pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The part before `*` (or the exact ID) is not valid.
    #[error("{0}")]
    Id(#[from] SpiffeIdError),
    /// `*` somewhere other than the whole last segment.
    #[error("'*' is only allowed as the whole last path segment, as in spiffe://td/ns/*")]
    MisplacedWildcard,
}

impl IdentityPattern {
    /// Parses a pattern (see the module docs for the three shapes).
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        match s.strip_suffix("/*") {
            Some(base) if !base.contains('*') => {
                let rest = base
                    .strip_prefix("spiffe://")
                    .ok_or(SpiffeIdError::WrongScheme)?;
                if rest.contains('/') {
                    let id = SpiffeId::parse(base)?;
                    Ok(Self::Prefix {
                        trust_domain: id.trust_domain(),
                        prefix: format!("{}/", id.path()),
                    })
                } else {
                    Ok(Self::TrustDomain(TrustDomain::parse(base)?))
                }
            }
            _ if s.contains('*') => Err(PatternError::MisplacedWildcard),
            _ => Ok(Self::Exact(SpiffeId::parse(s)?)),
        }
    }

    /// True when every ID this pattern names lies in trust domain `td`.
    pub fn is_in(&self, td: &TrustDomain) -> bool {
        match self {
            Self::Exact(id) => id.is_in(td),
            Self::Prefix { trust_domain, .. } | Self::TrustDomain(trust_domain) => {
                trust_domain == td
            }
        }
    }

    /// True when every ID `other` names is also named by this pattern (used
    /// to find rules that can never match).
    pub fn covers(&self, other: &IdentityPattern) -> bool {
        match (self, other) {
            (Self::TrustDomain(td), o) => o.is_in(td),
            (Self::Prefix { .. }, Self::Exact(id)) => self.matches(id),
            (
                Self::Prefix {
                    trust_domain: a,
                    prefix: p,
                },
                Self::Prefix {
                    trust_domain: b,
                    prefix: q,
                },
            ) => a == b && q.starts_with(p.as_str()),
            (Self::Exact(a), Self::Exact(b)) => a == b,
            _ => false,
        }
    }

    /// True when some ID is named by both patterns.
    pub fn overlaps(&self, other: &IdentityPattern) -> bool {
        self.covers(other) || other.covers(self)
    }

    /// True when `id` is one of the IDs this pattern names.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(want) => want == id,
            Self::Prefix {
                trust_domain,
                prefix,
            } => id.is_in(trust_domain) && id.path().starts_with(prefix.as_str()),
            Self::TrustDomain(td) => id.is_in(td),
        }
    }
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::Prefix {
                trust_domain,
                prefix,
            } => write!(f, "spiffe://{trust_domain}{prefix}*"),
            Self::TrustDomain(td) => write!(f, "spiffe://{td}/*"),
        }
    }
}

impl FromStr for IdentityPattern {
    type Err = PatternError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for IdentityPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn exact_matches_only_itself() {
        let p = IdentityPattern::parse("spiffe://td/ns/prod/web").unwrap();
        assert!(p.matches(&id("spiffe://td/ns/prod/web")));
        assert!(!p.matches(&id("spiffe://td/ns/prod/web2")));
        assert!(!p.matches(&id("spiffe://td/ns/prod/web/x")));
        assert!(!p.matches(&id("spiffe://other/ns/prod/web")));
    }

    #[test]
    fn prefix_matches_whole_segments_below_it() {
        let p = IdentityPattern::parse("spiffe://td/ns/prod/*").unwrap();
        assert!(p.matches(&id("spiffe://td/ns/prod/web")));
        assert!(p.matches(&id("spiffe://td/ns/prod/a/b")));
        assert!(!p.matches(&id("spiffe://td/ns/prod")));
        assert!(!p.matches(&id("spiffe://td/ns/production/web")));
        assert!(!p.matches(&id("spiffe://td2/ns/prod/web")));
    }

    #[test]
    fn trust_domain_matches_every_workload_in_it() {
        let p = IdentityPattern::parse("spiffe://td/*").unwrap();
        assert!(p.matches(&id("spiffe://td/a")));
        assert!(p.matches(&id("spiffe://td/a/b/c")));
        assert!(!p.matches(&id("spiffe://td2/a")));
        assert!(!p.matches(&id("spiffe://td.evil/a")));
    }

    #[test]
    fn is_in_names_the_trust_domain_of_every_shape() {
        let td = TrustDomain::parse("td").unwrap();
        for s in ["spiffe://td/a", "spiffe://td/a/*", "spiffe://td/*"] {
            assert!(IdentityPattern::parse(s).unwrap().is_in(&td), "{s}");
        }
        for s in ["spiffe://td2/a", "spiffe://td.evil/a/*", "spiffe://t/*"] {
            assert!(!IdentityPattern::parse(s).unwrap().is_in(&td), "{s}");
        }
    }

    #[test]
    fn covers_means_every_id_of_the_other_pattern_matches() {
        let p = |s: &str| IdentityPattern::parse(s).unwrap();
        let yes = [
            ("spiffe://td/*", "spiffe://td/a"),
            ("spiffe://td/*", "spiffe://td/a/*"),
            ("spiffe://td/*", "spiffe://td/*"),
            ("spiffe://td/a/*", "spiffe://td/a/b"),
            ("spiffe://td/a/*", "spiffe://td/a/b/*"),
            ("spiffe://td/a/*", "spiffe://td/a/*"),
            ("spiffe://td/a", "spiffe://td/a"),
        ];
        for (a, b) in yes {
            assert!(p(a).covers(&p(b)), "{a} covers {b}");
        }
        let no = [
            ("spiffe://td/a", "spiffe://td/a/*"),
            ("spiffe://td/a/*", "spiffe://td/a"),
            ("spiffe://td/a/*", "spiffe://td/ab/*"),
            ("spiffe://td/a/*", "spiffe://td/*"),
            ("spiffe://td/*", "spiffe://td2/*"),
            ("spiffe://td/a", "spiffe://td/b"),
        ];
        for (a, b) in no {
            assert!(!p(a).covers(&p(b)), "{a} does not cover {b}");
        }
        assert!(p("spiffe://td/a").overlaps(&p("spiffe://td/*")));
        assert!(!p("spiffe://td/a/*").overlaps(&p("spiffe://td/b")));
    }

    #[test]
    fn prefix_paths_match_below_and_at_the_prefix() {
        let p = PathMatch::parse("/api/*").unwrap();
        assert!(p.matches("/api/x") && p.matches("/api/") && p.matches("/api"));
        assert!(!p.matches("/apix") && !p.matches("/ap"));
        for bad in [
            "api", "/a*", "/a/*/b", "/a/../b", "/a//b", "/a%2e/b", "/admin;x", "/x%3a", "/café",
            "/Admin.",
        ] {
            assert!(PathMatch::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_path_pattern_covers_the_paths_of_narrower_ones() {
        let p = |s: &str| PathMatch::parse(s).unwrap();
        for (a, b) in [
            ("/a/*", "/a/*"),
            ("/a/*", "/a/b/*"),
            ("/a/*", "/a"),
            ("/a/*", "/a/b"),
            ("/*", "/a/*"),
            ("/x", "/x"),
        ] {
            assert!(p(a).covers(&p(b)), "{a} covers {b}");
        }
        for (a, b) in [
            ("/a", "/a/*"),
            ("/a/b/*", "/a/*"),
            ("/a/*", "/ab"),
            ("/x", "/y"),
        ] {
            assert!(!p(a).covers(&p(b)), "{a} does not cover {b}");
        }
    }

    #[test]
    fn get_covers_head_but_not_the_other_way() {
        assert!(method_covers("GET", "HEAD") && method_covers("GET", "GET"));
        assert!(!method_covers("HEAD", "GET") && !method_covers("GET", "POST"));
    }

    #[test]
    fn misplaced_wildcards_are_errors() {
        for s in [
            "spiffe://td/ns/*/web",
            "spiffe://td/ns/pr*",
            "spiffe://*/a",
            "*",
        ] {
            assert!(IdentityPattern::parse(s).is_err(), "{s}");
        }
        assert!(IdentityPattern::parse("spiffe://TD/*").is_err());
        assert!(IdentityPattern::parse("spiffe://td/a//*").is_err());
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "spiffe://td/ns/prod/web",
            "spiffe://td/ns/prod/*",
            "spiffe://td/*",
        ] {
            assert_eq!(IdentityPattern::parse(s).unwrap().to_string(), s);
        }
    }
}
