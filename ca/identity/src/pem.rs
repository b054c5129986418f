//! Certificates in PEM text and the facts read from them, for both the CA
//! (which writes them) and the proxy (which loads and renews them).

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::lifetime::Validity;

/// Parses every certificate in PEM text (at least one).
pub fn parse_certs(text: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in file".into());
    }
    Ok(certs)
}

/// The validity window written in a certificate.
pub fn validity_of(der: &CertificateDer<'_>) -> Result<Validity, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("not a certificate: {e}"))?;
    let v = cert.validity();
    Ok(Validity {
        not_before: v.not_before.to_datetime(),
        not_after: v.not_after.to_datetime(),
    })
}

/// PEM text of a list of certificates.
pub fn certs_pem(certs: &[CertificateDer<'_>]) -> String {
    certs
        .iter()
        .map(|c| {
            let block = pem::Pem::new("CERTIFICATE", c.as_ref());
            pem::encode_config(
                &block,
                pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
            )
        })
        .collect()
}
