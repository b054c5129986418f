//! The X.509-SVID leaf profile, checked in one place for every side: the
//! server's client verifier, the client's server verifier (the outbound and
//! the CA client), and anything that loads a certificate as an identity.
//!
//! Rules (SPIFFE X509-SVID spec; each refusal is its own [`PeerIdError`]):
//! - exactly one URI SAN, a valid SPIFFE ID with a path (2, 3.1, 5.2);
//!   a non-critical SAN needs a non-empty subject (3.1, RFC 5280 4.1.2.6);
//! - basicConstraints present with `CA:FALSE` (4.1, 5.2). The spec's
//!   validators "ensure the CA field in the basic constraints extension is
//!   set to false"; a leaf without the extension does not say so, and every
//!   issuer we know of (warden, SPIRE) writes it, so its absence is refused;
//! - keyUsage present and critical, with digitalSignature and without
//!   keyCertSign or cRLSign (4.3, 5.2);
//! - extendedKeyUsage, when present, lists serverAuth or clientAuth. The
//!   spec (4.4) has issuers list both, and warden's CA does; as a validator
//!   warden asks, like webpki, rustls and Envoy, for the purpose of the
//!   side in use (clientAuth from a client, serverAuth from a server:
//!   `wrong_key_usage` otherwise), so single-purpose certificates from
//!   other issuers (openssl, cert-manager) work where they are used as
//!   meant, and a leaf fit for neither side is refused the same on both.
//!
//! The verifiers run this before the chain check: webpki only checks the
//! purpose of the side in use, and checking the profile first means both
//! sides refuse a bad leaf for the same reason.

use warden_config::{SpiffeId, SpiffeIdError};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::peer::{KeyUsageBits, PeerIdError};

/// The SPIFFE ID of an X.509-SVID leaf, after checking the leaf profile.
/// This does not verify the chain; see [`super::VerifiedPeer`].
pub fn peer_id(der: &[u8]) -> Result<SpiffeId, PeerIdError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| PeerIdError::Unparsable)?;
    let id = spiffe_id(&cert)?;
    basic_constraints(&cert)?;
    key_usage(&cert)?;
    extended_key_usage(&cert)?;
    Ok(id)
}

fn spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, PeerIdError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|_| PeerIdError::Unparsable)?;
    let mut uris = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        });
    let uri = match (uris.next(), uris.next()) {
        (Some(uri), None) => uri,
        (None, _) => return Err(PeerIdError::UriSanCount(0)),
        (Some(_), Some(_)) => return Err(PeerIdError::UriSanCount(2 + uris.count())),
    };
    let id = SpiffeId::parse(uri).map_err(|e| match e {
        SpiffeIdError::MissingPath => match warden_config::TrustDomain::parse(uri) {
            Ok(td) => PeerIdError::IdWithoutPath(td),
            Err(e) => PeerIdError::BadId(e),
        },
        e => PeerIdError::BadId(e),
    })?;
    let subject_empty = cert.subject().iter().next().is_none();
    if subject_empty && san.is_some_and(|s| !s.critical) {
        return Err(PeerIdError::SanNotCritical);
    }
    Ok(id)
}

fn basic_constraints(cert: &X509Certificate<'_>) -> Result<(), PeerIdError> {
    let bc = cert
        .basic_constraints()
        .map_err(|_| PeerIdError::Unparsable)?
        .ok_or(PeerIdError::NoBasicConstraints)?;
    if bc.value.ca {
        return Err(PeerIdError::LeafIsCa {
            path_len: bc.value.path_len_constraint,
        });
    }
    Ok(())
}

fn key_usage(cert: &X509Certificate<'_>) -> Result<(), PeerIdError> {
    let ku = cert
        .key_usage()
        .map_err(|_| PeerIdError::Unparsable)?
        .ok_or(PeerIdError::NoKeyUsage)?;
    let bits = KeyUsageBits(ku.value.flags);
    if !ku.critical {
        return Err(PeerIdError::KeyUsageNotCritical(bits));
    }
    if !bits.has(KeyUsageBits::DIGITAL_SIGNATURE) {
        return Err(PeerIdError::NoDigitalSignature(bits));
    }
    if bits.0 & (KeyUsageBits::KEY_CERT_SIGN | KeyUsageBits::CRL_SIGN) != 0 {
        return Err(PeerIdError::SigningKeyUsage(bits));
    }
    Ok(())
}

fn extended_key_usage(cert: &X509Certificate<'_>) -> Result<(), PeerIdError> {
    let Some(eku) = cert
        .extended_key_usage()
        .map_err(|_| PeerIdError::Unparsable)?
    else {
        return Ok(()); // spec 4.4: leaves SHOULD include it; absence is allowed
    };
    let (server_auth, client_auth) = (eku.value.server_auth, eku.value.client_auth);
    if !(server_auth || client_auth) {
        return Err(PeerIdError::EkuMissingPurpose {
            server_auth,
            client_auth,
        });
    }
    Ok(())
}

/// The trust domain a bundle names: the `spiffe://<trust domain>` URI SAN of
/// its first certificate that has one (warden's roots and intermediates
/// carry it, as the X.509-SVID spec allows for signing certificates).
pub fn bundle_trust_domain(
    bundle: &[rustls_pki_types::CertificateDer<'_>],
) -> Option<warden_config::TrustDomain> {
    bundle.iter().find_map(|der| {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|n| match n {
            GeneralName::URI(u) if !u.trim_start_matches("spiffe://").contains('/') => {
                warden_config::TrustDomain::parse(u).ok()
            }
            _ => None,
        })
    })
}
