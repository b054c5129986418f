//! The peer's SPIFFE ID, read from a certificate that already verified.

use warden_config::{SpiffeId, SpiffeIdError, TrustDomain};
use x509_parser::extensions::GeneralName;

/// Why a verified certificate still does not carry a usable SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdError {
    /// Not a parsable certificate.
    #[error("certificate does not parse")]
    Unparsable,
    /// No URI SAN, or more than one (the X.509-SVID spec allows exactly one).
    #[error("certificate has {0} URI SANs; an X.509-SVID has exactly one")]
    UriSanCount(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    BadId(SpiffeIdError),
    /// The ID's trust domain is not the one whose bundle verified the chain.
    #[error("SPIFFE ID {id} is not in trust domain {expected}")]
    WrongTrustDomain {
        /// The ID found.
        id: SpiffeId,
        /// The trust domain of the bundle that verified it.
        expected: TrustDomain,
    },
}

impl PeerIdError {
    /// A fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unparsable => "bad_certificate",
            Self::UriSanCount(_) => "uri_san_count",
            Self::BadId(_) => "bad_spiffe_id",
            Self::WrongTrustDomain { .. } => "wrong_trust_domain",
        }
    }
}

/// A peer identity that only the verifiers in this module hand out: holding
/// one means the chain verified against the bundle of the ID's trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPeer(SpiffeId);

impl VerifiedPeer {
    /// Reads the identity from a leaf whose chain already verified against
    /// `td`'s bundle.
    pub(crate) fn from_verified_leaf(leaf: &[u8], td: &TrustDomain) -> Result<Self, PeerIdError> {
        let id = peer_id(leaf)?;
        if !id.is_in(td) {
            return Err(PeerIdError::WrongTrustDomain {
                id,
                expected: td.clone(),
            });
        }
        Ok(Self(id))
    }

    /// The SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.0
    }

    /// Consumes the proof, keeping the ID.
    pub fn into_id(self) -> SpiffeId {
        self.0
    }
}

/// The SPIFFE ID in a certificate: exactly one URI SAN, and a valid ID.
/// This does not verify the certificate; see [`VerifiedPeer`].
pub fn peer_id(der: &[u8]) -> Result<SpiffeId, PeerIdError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| PeerIdError::Unparsable)?;
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
    match (uris.next(), uris.next()) {
        (Some(uri), None) => SpiffeId::parse(uri).map_err(PeerIdError::BadId),
        (None, _) => Err(PeerIdError::UriSanCount(0)),
        (Some(_), Some(_)) => Err(PeerIdError::UriSanCount(2 + uris.count())),
    }
}
