//! Identity patterns: which SPIFFE IDs a rule or a destination accepts.
//!
//! Three shapes, written as SPIFFE IDs so they read like what they match:
//! - `spiffe://td/ns/prod/web`: exactly that ID;
//! - `spiffe://td/ns/prod/*`: every ID whose path continues below `/ns/prod/`
//!   (whole segments only: `/ns/production` does not match);
//! - `spiffe://td/*`: every workload in trust domain `td`.
//!
//! `*` is only allowed as the whole last segment; anything else is an error,
//! so a typo can never widen a rule silently.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

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
