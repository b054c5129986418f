//! Refused handshakes, named: a fixed label set for metrics and logs.

use rustls::{CertificateError, Error};

/// The label for a handshake that failed with `err` (as tokio-rustls reports it).
pub fn handshake_failure_reason(err: &std::io::Error) -> &'static str {
    match err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        Some(e) => tls_failure_reason(e),
        None if err.kind() == std::io::ErrorKind::TimedOut => "timeout",
        None if err.kind() == std::io::ErrorKind::UnexpectedEof => "eof",
        None => "io",
    }
}

/// The label for a rustls error, wherever it was found (the outbound digs it
/// out of a connector's error chain).
pub fn tls_failure_reason(e: &Error) -> &'static str {
    match e {
        Error::NoCertificatesPresented => "no_client_cert",
        Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "cert_expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "cert_not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_issuer",
            // Only the deny list pushed by the CA revokes (there is no CRL).
            CertificateError::Revoked => "denied",
            CertificateError::BadSignature => "bad_signature",
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "wrong_identity"
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "wrong_key_usage"
            }
            CertificateError::Other(o) => match o.0.downcast_ref::<super::PeerIdError>() {
                Some(p) => p.reason(),
                None => "bad_certificate",
            },
            _ => "bad_certificate",
        },
        Error::AlertReceived(_) => "alert_received",
        Error::PeerIncompatible(_) | Error::NoApplicationProtocol => "incompatible",
        Error::InvalidMessage(_)
        | Error::InappropriateHandshakeMessage { .. }
        | Error::InappropriateMessage { .. } => "protocol",
        _ => "other",
    }
}
