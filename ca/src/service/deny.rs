//! Deny reports (`POST /v1/deny`): a workload listed in the CA's
//! `deny_reporters` (a proxy that caught an identity extracting a model, say)
//! asks the CA to deny another identity, so its certificate is not renewed.
//! The effect is exactly `warden ca deny`'s, recorded in the same audit
//! transaction together with the reporter and its reason.
//!
//! Denying an identity that is already denied succeeds and is audited again
//! (`changed: false`): the trail keeps every report a reporter made, and only
//! configured reporters can write these lines.

use time::OffsetDateTime;

use warden_config::SpiffeId;

use super::{CaService, Caller, Refusal, denied_event, unix};
use crate::authority::CaError;
use crate::store;

/// Longest reason a deny reporter may give, in bytes (printable ASCII only).
pub const MAX_DENY_REASON_LEN: usize = 200;

/// A deny report as the client sent it; [`CaService::report_deny`] checks both parts.
#[derive(Debug, Clone, Default)]
pub struct DenyReport {
    /// The identity to deny.
    pub spiffe_id: String,
    /// Why, in 1 to [`MAX_DENY_REASON_LEN`] printable ASCII characters.
    pub reason: String,
}

/// An accepted deny report.
#[derive(Debug, Clone)]
pub struct Denial {
    /// The identity that is now denied.
    pub spiffe_id: SpiffeId,
    /// True when it was denied before this report.
    pub already_denied: bool,
}

/// The detail of a [`Refusal::NotReporter`].
pub(super) fn not_reporter(caller: Option<&SpiffeId>) -> String {
    match caller {
        None => "no client certificate: only identities listed in the CA's deny_reporters may ask it to deny an identity".to_owned(),
        Some(id) => format!("{id} is not listed in the CA's deny_reporters"),
    }
}

impl CaService {
    /// Handles `POST /v1/deny`: a caller with a current SVID whose ID matches
    /// `deny_reporters` asks the CA to deny another workload of its trust
    /// domain. `report` is the parsed body, or why it could not be parsed:
    /// the caller is checked first, so only reporters learn what is wrong
    /// with a body. Refusals are counted, logged and, when the caller
    /// presented a certificate, audited.
    pub fn report_deny(
        &self,
        caller: Caller,
        report: Result<DenyReport, Refusal>,
        now: OffsetDateTime,
    ) -> Result<Denial, Refusal> {
        let mut reporter = None;
        let result = self.try_report_deny(caller, report, now, &mut reporter);
        match &result {
            Ok(d) => {
                let label = if d.already_denied {
                    "already_denied"
                } else {
                    "denied"
                };
                self.metrics.deny_reports.with_label_values(&[label]).inc();
            }
            Err(refusal) => {
                self.metrics
                    .deny_reports
                    .with_label_values(&["refused"])
                    .inc();
                self.note_refusal("deny", refusal, reporter.as_ref(), now);
            }
        }
        result
    }

    fn try_report_deny(
        &self,
        caller: Caller,
        report: Result<DenyReport, Refusal>,
        now: OffsetDateTime,
        reporter: &mut Option<SpiffeId>,
    ) -> Result<Denial, Refusal> {
        let id = match caller {
            // Deny reports come over mTLS only, never with a pod's token.
            Caller::Anonymous | Caller::Pod(_) => return Err(Refusal::NotReporter(None)),
            Caller::Svid { id, not_after, .. } => {
                *reporter = Some(id.clone());
                if not_after <= now {
                    return Err(Refusal::SvidExpired);
                }
                id
            }
        };
        let reporters = &self.authority.config.deny_reporters;
        if !reporters.iter().any(|p| p.matches(&id)) {
            return Err(Refusal::NotReporter(Some(id)));
        }
        let report = report?;
        // The answer does not echo the input: it may be 16 KiB of anything.
        let target = SpiffeId::parse(&report.spiffe_id).map_err(|e| {
            Refusal::BadTarget(format!("spiffe_id is not a workload SPIFFE ID: {e}"))
        })?;
        self.check_issuable(&target)
            .map_err(|r| Refusal::BadTarget(r.to_string()))?;
        // Reporters cannot silence each other: only an operator denies one.
        if reporters.iter().any(|p| p.matches(&target)) {
            return Err(Refusal::BadTarget(
                "a deny reporter can only be denied by an operator (warden ca deny)".into(),
            ));
        }
        check_reason(&report.reason)?;
        let changed = self.write(
            now,
            |tx| {
                // Inside the write lock, as certify checks it: once a reporter
                // is denied, it can deny nobody.
                if store::is_denied(tx, &id).map_err(CaError::from)? {
                    return Err(Refusal::Denied(id.clone()));
                }
                store::set_denied(tx, &target, true, unix(now)).map_err(|e| CaError::from(e).into())
            },
            |changed| {
                denied_event(&target, true, *changed)
                    .with("reporter", id.as_str())
                    .with("reason", report.reason.as_str())
            },
        )?;
        tracing::warn!(reporter = %id, spiffe_id = %target, reason = %report.reason, changed, "denied at a reporter's request");
        Ok(Denial {
            spiffe_id: target,
            already_denied: !changed,
        })
    }
}

/// A reason goes into the audit trail and the logs: short, printable ASCII.
fn check_reason(reason: &str) -> Result<(), Refusal> {
    let printable = reason.bytes().all(|b| (b' '..=b'~').contains(&b));
    if reason.is_empty() || reason.len() > MAX_DENY_REASON_LEN || !printable {
        return Err(Refusal::BadRequest(format!(
            "reason must be 1 to {MAX_DENY_REASON_LEN} printable ASCII characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_1_to_200_printable_ascii_characters() {
        for ok in ["x", "suspicion 0.93 over 5m", &"a".repeat(200), " ~"] {
            assert!(check_reason(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            &"a".repeat(201),
            "line\nbreak",
            "tab\t",
            "caf\u{e9}",
            "\u{7f}",
        ] {
            assert!(check_reason(bad).is_err(), "{bad:?}");
        }
    }
}
