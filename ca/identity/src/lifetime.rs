//! Certificate lifetimes as pure functions of `now`, so tests need no sleeps.

use std::time::Duration;

use time::OffsetDateTime;

/// How far NotBefore is set into the past, so a peer whose clock runs a little
/// behind still accepts a certificate issued a moment ago.
pub const BACKDATE: Duration = Duration::from_secs(30);

/// A certificate's validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// NotBefore (already backdated).
    pub not_before: OffsetDateTime,
    /// NotAfter.
    pub not_after: OffsetDateTime,
}

/// The validity of a new leaf: `ttl` from `now`, capped at `max_ttl` and at
/// the issuing CA's own NotAfter (a leaf must never outlive its issuer).
/// NotBefore is backdated by [`BACKDATE`] but never before the issuer's NotBefore.
pub fn cap_lifetime(
    ttl: Duration,
    max_ttl: Duration,
    issuer: Validity,
    now: OffsetDateTime,
) -> Validity {
    // Certificates carry whole seconds; so do the values we report.
    let now = now.replace_nanosecond(0).unwrap_or(now);
    let ttl = Duration::from_secs(ttl.min(max_ttl).as_secs());
    let not_after = (now + ttl).min(issuer.not_after);
    let not_before = (now - BACKDATE).max(issuer.not_before);
    Validity {
        not_before,
        not_after,
    }
}

/// When to renew a certificate valid over `[not_before, not_after]`: at half
/// of its life, moved by `jitter` (a fraction in `-0.1..=0.1` picked at random
/// by the caller) so a fleet that started together does not renew together.
pub fn renew_at(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    jitter: f64,
) -> OffsetDateTime {
    let life = (not_after - not_before).as_seconds_f64().max(0.0);
    let fraction = 0.5 + jitter.clamp(-0.1, 0.1);
    not_before + Duration::from_secs_f64(life * fraction)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const HOUR: Duration = Duration::from_secs(3600);

    fn issuer() -> Validity {
        Validity {
            not_before: datetime!(2026-01-01 0:00 UTC),
            not_after: datetime!(2027-01-01 0:00 UTC),
        }
    }

    #[test]
    fn leaf_gets_its_ttl_and_a_backdated_start() {
        let now = datetime!(2026-06-01 12:00 UTC);
        let v = cap_lifetime(HOUR, 24 * HOUR, issuer(), now);
        assert_eq!(v.not_after, now + HOUR);
        assert_eq!(v.not_before, now - BACKDATE);
    }

    #[test]
    fn ttl_is_capped_at_the_maximum() {
        let now = datetime!(2026-06-01 12:00 UTC);
        let v = cap_lifetime(100 * HOUR, 24 * HOUR, issuer(), now);
        assert_eq!(v.not_after, now + 24 * HOUR);
    }

    #[test]
    fn leaf_never_outlives_its_issuer() {
        let now = datetime!(2026-12-31 23:30 UTC);
        let v = cap_lifetime(HOUR, 24 * HOUR, issuer(), now);
        assert_eq!(v.not_after, issuer().not_after);
    }

    #[test]
    fn backdate_stops_at_the_issuers_start() {
        let now = datetime!(2026-01-01 0:00:10 UTC);
        let v = cap_lifetime(HOUR, 24 * HOUR, issuer(), now);
        assert_eq!(v.not_before, issuer().not_before);
    }

    #[test]
    fn renewal_is_at_half_life_with_bounded_jitter() {
        let nb = datetime!(2026-06-01 12:00 UTC);
        let na = nb + HOUR;
        assert_eq!(renew_at(nb, na, 0.0), nb + HOUR / 2);
        assert_eq!(renew_at(nb, na, 0.1), nb + Duration::from_secs(36 * 60));
        assert_eq!(renew_at(nb, na, 5.0), nb + Duration::from_secs(36 * 60));
        assert_eq!(renew_at(nb, na, -5.0), nb + Duration::from_secs(24 * 60));
        assert_eq!(
            renew_at(na, nb, 0.0),
            na,
            "an inverted window renews at once"
        );
    }
}
