//! The verified peer, and every way a certificate can fail to be one.

use std::fmt;

use warden_config::{SpiffeId, SpiffeIdError, TrustDomain};

/// Why a certificate does not carry a usable SPIFFE identity: it is not an
/// X.509-SVID leaf (SPIFFE X509-SVID spec, sections 2-5; checked in
/// `profile.rs`), or its ID is in the wrong trust domain. Each variant has
/// its own [`reason`](Self::reason) label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdError {
    /// Not a parsable certificate, or an extension that does not parse or
    /// appears twice.
    #[error("certificate does not parse")]
    Unparsable,
    /// No URI SAN, or more than one (the X.509-SVID spec allows exactly one).
    #[error("certificate has {0} URI SANs; an X.509-SVID has exactly one")]
    UriSanCount(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    BadId(SpiffeIdError),
    /// The URI SAN is a trust domain's own ID (`spiffe://td`), which names a
    /// signing certificate, not a workload (spec 3.1, 5.2).
    #[error("SPIFFE ID {} has no path; a leaf SVID names a workload", .0.id_string())]
    IdWithoutPath(TrustDomain),
    /// The subject is empty and the SAN extension is not critical (spec 3.1,
    /// RFC 5280 4.1.2.6).
    #[error("certificate has an empty subject and a non-critical subjectAltName")]
    SanNotCritical,
    /// No basicConstraints extension, so the leaf does not state `CA:FALSE`
    /// (spec 4.1, 5.2).
    #[error("leaf has no basicConstraints extension; an X.509-SVID leaf states CA:FALSE")]
    NoBasicConstraints,
    /// basicConstraints says `CA:TRUE`: a signing certificate, never an identity (spec 3.2, 5.2).
    #[error("leaf has CA:TRUE; a CA certificate is not an identity")]
    LeafIsCa {
        /// The pathLenConstraint, if any.
        path_len: Option<u32>,
    },
    /// No keyUsage extension (spec 4.3: it MUST be set).
    #[error("leaf has no keyUsage extension")]
    NoKeyUsage,
    /// keyUsage is not marked critical (spec 4.3: it MUST be).
    #[error("leaf keyUsage ({0}) is not marked critical")]
    KeyUsageNotCritical(KeyUsageBits),
    /// keyUsage lacks digitalSignature (spec 4.3: a leaf MUST set it).
    #[error("leaf keyUsage ({0}) lacks digitalSignature")]
    NoDigitalSignature(KeyUsageBits),
    /// keyUsage sets keyCertSign or cRLSign, which only signing certificates
    /// may (spec 4.3, 5.2). Carries the whole keyUsage.
    #[error("leaf keyUsage ({0}) has keyCertSign or cRLSign; a leaf SVID must not sign")]
    SigningKeyUsage(KeyUsageBits),
    /// extendedKeyUsage is present without both serverAuth and clientAuth
    /// (spec 4.4: when included, both MUST be set).
    #[error(
        "leaf extendedKeyUsage lacks {}; an X.509-SVID that has the extension allows both serverAuth and clientAuth",
        missing_purposes(*.server_auth, *.client_auth)
    )]
    EkuMissingPurpose {
        /// serverAuth is listed.
        server_auth: bool,
        /// clientAuth is listed.
        client_auth: bool,
    },
    /// The ID's trust domain is not the one whose bundle verified the chain.
    #[error("SPIFFE ID {id} is not in trust domain {expected}")]
    WrongTrustDomain {
        /// The ID found.
        id: SpiffeId,
        /// The trust domain of the bundle that verified it.
        expected: TrustDomain,
    },
}

fn missing_purposes(server_auth: bool, client_auth: bool) -> &'static str {
    match (server_auth, client_auth) {
        (false, false) => "serverAuth and clientAuth",
        (false, true) => "serverAuth",
        _ => "clientAuth",
    }
}

impl PeerIdError {
    /// A fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unparsable => "bad_certificate",
            Self::UriSanCount(_) => "uri_san_count",
            Self::BadId(_) => "bad_spiffe_id",
            Self::IdWithoutPath(_) => "spiffe_id_without_path",
            Self::SanNotCritical => "san_not_critical",
            Self::NoBasicConstraints => "no_basic_constraints",
            Self::LeafIsCa { .. } => "leaf_is_ca",
            Self::NoKeyUsage => "no_key_usage",
            Self::KeyUsageNotCritical(_) => "key_usage_not_critical",
            Self::NoDigitalSignature(_) => "no_digital_signature",
            Self::SigningKeyUsage(_) => "signing_key_usage",
            Self::EkuMissingPurpose { .. } => "eku_missing_purpose",
            Self::WrongTrustDomain { .. } => "wrong_trust_domain",
        }
    }
}

/// The bits of a keyUsage extension (RFC 5280 4.2.1.3, bit 0 =
/// digitalSignature), shown by their RFC names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyUsageBits(pub u16);

impl KeyUsageBits {
    /// digitalSignature (bit 0).
    pub const DIGITAL_SIGNATURE: u16 = 1 << 0;
    /// keyCertSign (bit 5).
    pub const KEY_CERT_SIGN: u16 = 1 << 5;
    /// cRLSign (bit 6).
    pub const CRL_SIGN: u16 = 1 << 6;

    /// Is every bit of `mask` set?
    pub fn has(self, mask: u16) -> bool {
        self.0 & mask == mask
    }
}

impl fmt::Display for KeyUsageBits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 9] = [
            "digitalSignature",
            "nonRepudiation",
            "keyEncipherment",
            "dataEncipherment",
            "keyAgreement",
            "keyCertSign",
            "cRLSign",
            "encipherOnly",
            "decipherOnly",
        ];
        let mut names = NAMES
            .iter()
            .enumerate()
            .filter(|(bit, _)| self.0 & (1 << bit) != 0)
            .map(|(_, n)| *n);
        match names.next() {
            None => f.write_str("no bits"),
            Some(first) => {
                f.write_str(first)?;
                names.try_for_each(|n| write!(f, ", {n}"))
            }
        }
    }
}

/// A peer identity that only the verifiers in this module hand out: holding
/// one means the leaf has the X.509-SVID profile and its chain verified
/// against the bundle of the ID's trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPeer(SpiffeId);

impl VerifiedPeer {
    /// The identity `id`, read by `profile::peer_id` from a leaf whose chain
    /// then verified against `td`'s bundle.
    pub(crate) fn from_verified_id(id: SpiffeId, td: &TrustDomain) -> Result<Self, PeerIdError> {
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
