//! Rotation of the CA's own certificates, with nothing restarted anywhere.
//!
//! Intermediates rotate by themselves, on SPIRE's schedule: at half of the
//! active one's life the next is prepared under the active root (and shows
//! in `warden ca status`); from five sixths on, once it has been known for
//! `rotation_overlap`, it signs; the old one stops counting once its last
//! leaf expired plus that margin. Leaves are capped at their intermediate's
//! NotAfter, so none outlives the CA that signed it. A new intermediate
//! under the same root needs nothing from proxies: each leaf's chain carries
//! its intermediate, and the root verifies both.
//!
//! Roots rotate when an operator says so: `root add` puts a new root in the
//! bundle that the trust feed pushes to every proxy; `root activate` (only
//! after `rotation_overlap`) makes an intermediate under it that signs from
//! then on, while the old root stays trusted; `root retire` takes the old
//! root out of the bundle, and is refused while any certificate signed
//! under it is still valid. Every step is one store transaction with its
//! audit line and a move of the trust sequence, so `ca serve` (and every
//! replica) picks it up within a poll.

use std::path::Path;
use std::time::Duration;

use rcgen::{Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
use time::OffsetDateTime;

use crate::audit::Event;
use crate::authority::{CaError, cert_id, certs_pem, parse_certs, read_certs, validity_of};
use crate::lifetime::{BACKDATE, Validity, cap_lifetime};
use crate::profile;
use crate::service::{CaService, Refusal};
use crate::store::chain::{self, AuthorityRecord, Kind, State};
use crate::store::{self, WriteTx};

/// What one step of automatic rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Made the next intermediate (id).
    Prepared(String),
    /// The prepared intermediate (id) now signs.
    Activated(String),
    /// An old intermediate (id) no longer counts.
    Retired(String),
}

/// The first 16 characters of an id, as `status` shows it.
fn short(id: &str) -> &str {
    id.get(..16).unwrap_or(id)
}

fn unix(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

fn record(
    der: &[u8],
    pem: String,
    kind: Kind,
    parent: Option<String>,
    state: State,
    v: Validity,
    now: i64,
) -> AuthorityRecord {
    AuthorityRecord {
        id: cert_id(der),
        kind,
        parent,
        cert_pem: pem,
        not_before: unix(v.not_before),
        not_after: unix(v.not_after),
        state,
        created_at: now,
        changed_at: now,
        mac: None,
    }
}

fn event(kind: &'static str, a: &AuthorityRecord) -> Event {
    Event::new(kind)
        .with("id", a.id.as_str())
        .with("not_after", a.not_after)
}

impl CaService {
    /// The first time a store is opened, records the chain `init` left in
    /// files (its roots, the intermediate that signs); then loads whatever
    /// the store records.
    pub(crate) fn adopt_chain(&self, now: OffsetDateTime) -> Result<(), CaError> {
        if chain::authorities(&mut *self.store.lock())?.is_empty() {
            let files = self.authority.chain();
            let t = unix(now);
            let int = &files.intermediate;
            let int_issuer = x509_parser::parse_x509_certificate(int)
                .map(|(_, c)| c.issuer().as_raw().to_vec())
                .unwrap_or_default();
            let mut roots = Vec::new();
            for r in &files.roots {
                let v = validity_of(r).map_err(CaError::Corrupt)?;
                let signs = x509_parser::parse_x509_certificate(r)
                    .is_ok_and(|(_, c)| c.subject().as_raw() == int_issuer.as_slice());
                let state = if signs {
                    State::Active
                } else {
                    State::Published
                };
                roots.push(self.vouch(record(
                    r,
                    certs_pem(std::slice::from_ref(r)),
                    Kind::Root,
                    None,
                    state,
                    v,
                    t,
                )));
            }
            let parent = roots
                .iter()
                .find(|r| r.state == State::Active)
                .map(|r| r.id.clone());
            let intermediate = self.vouch(record(
                int,
                certs_pem(std::slice::from_ref(int)),
                Kind::Intermediate,
                parent,
                State::Active,
                files.intermediate_validity,
                t,
            ));
            self.change(now, |tx| {
                if !chain::authorities(tx)?.is_empty() {
                    return Ok(None); // another process was first
                }
                for r in &roots {
                    chain::insert_authority(tx, r)?;
                }
                chain::insert_authority(tx, &intermediate)?;
                chain::adopt_leaves(tx, &intermediate.id)?;
                Ok(Some(
                    event("chain_recorded", &intermediate).with("roots", roots.len()),
                ))
            })?;
        }
        self.reload_chain()
    }

    /// Tags a new record under `store.key` (see [`crate::sealed`]).
    fn vouch(&self, mut a: AuthorityRecord) -> AuthorityRecord {
        a.mac = self
            .authority
            .store_key
            .as_ref()
            .map(|k| k.tag(&a.vouched()));
        a
    }

    /// On a shared store, puts the key of a new CA certificate there,
    /// sealed, for the other replicas (see [`crate::sealed`]).
    fn share_key(&self, id: &str, key: &KeyPair) -> Result<(), CaError> {
        if !self.store.is_postgres() {
            return Ok(());
        }
        let Some(sealer) = &self.authority.store_key else {
            return Err(CaError::Setup(format!(
                "no store.key in the CA directory (nor WARDEN_CA_STORE_KEY): the key of {id} cannot be shared with the other replicas, so nothing is rotated"
            )));
        };
        let sealed = sealer.seal(id, &key.serialize_pem())?;
        let mut conn = self.store.lock_exclusive();
        let mut tx = store::begin_write(&mut conn)?;
        store::insert_sealed_key(&mut tx, id, &sealed)?;
        tx.commit()?;
        Ok(())
    }

    /// Unseals into this replica's `keys/` the keys of `records` that
    /// another replica made and shared.
    fn fetch_keys(&self, records: &[AuthorityRecord]) -> Result<(), CaError> {
        let Some(sealer) = &self.authority.store_key else {
            return Ok(());
        };
        for a in records.iter().filter(|a| a.state != State::Retired) {
            let der = parse_certs(&a.cert_pem)
                .map_err(CaError::Corrupt)?
                .swap_remove(0);
            if !matches!(
                self.authority.key_of(&a.id, &der),
                Err(CaError::KeyNotHeld(_))
            ) {
                continue;
            }
            let Some(sealed) = store::sealed_key(&mut *self.store.lock(), &a.id)? else {
                continue;
            };
            let pem = sealer.open(&a.id, &sealed)?;
            let key = KeyPair::from_pem(&pem)
                .map_err(|e| CaError::Corrupt(format!("sealed key {}: {e}", a.id)))?;
            self.authority.keep_key(&a.id, &key)?;
            tracing::info!(id = %a.id, "unsealed a key another replica made");
        }
        Ok(())
    }

    /// Loads the chain the store records, and exports every level's expiry.
    pub(crate) fn reload_chain(&self) -> Result<(), CaError> {
        let records = chain::authorities(&mut *self.store.lock())?;
        // Most moves of the trust sequence are denies: nothing to reload.
        if records == self.authority.chain().records {
            return Ok(());
        }
        if self.store.is_postgres() {
            self.fetch_keys(&records)?;
        }
        self.authority.reload(records)?;
        let chain = self.authority.chain();
        let m = &self.metrics;
        m.chain_expiry.reset();
        for a in chain.records.iter().filter(|a| a.state != State::Retired) {
            m.chain_expiry
                .with_label_values(&[a.kind.as_str(), a.state.as_str(), short(&a.id)])
                .set(a.not_after as f64);
        }
        m.cert_expiry
            .with_label_values(&["intermediate"])
            .set(unix(chain.intermediate_validity.not_after) as f64);
        let first_root = chain
            .roots
            .iter()
            .filter_map(|r| validity_of(r).ok())
            .map(|v| unix(v.not_after))
            .min();
        if let Some(t) = first_root {
            m.cert_expiry.with_label_values(&["root"]).set(t as f64);
        }
        Ok(())
    }

    /// One write transaction of a rotation step: `f` says what it did (an
    /// audit event) or `None` when there was nothing to do; the trust
    /// sequence moves with it, so every server reloads.
    fn change(
        &self,
        now: OffsetDateTime,
        f: impl FnOnce(&mut WriteTx<'_>) -> crate::store::sql::Result<Option<Event>>,
    ) -> Result<bool, CaError> {
        let mut conn = self.store.lock_exclusive();
        let mut tx = store::begin_write(&mut conn)?;
        let Some(event) = f(&mut tx)? else {
            return Ok(false);
        };
        store::bump_trust_sequence(&mut tx)?;
        crate::audit::append(&mut tx, self.audit_path(), event, now)?;
        tx.commit()?;
        Ok(true)
    }

    /// A new intermediate under `root`, in `state`: lives `intermediate_ttl`
    /// (default: as long as the active one), capped at the root's NotAfter.
    fn make_intermediate(
        &self,
        root: &AuthorityRecord,
        state: State,
        now: OffsetDateTime,
    ) -> Result<AuthorityRecord, CaError> {
        let root_der = parse_certs(&root.cert_pem)
            .map_err(CaError::Corrupt)?
            .swap_remove(0);
        let root_key = self.authority.key_of(&root.id, &root_der)?;
        let root_validity = validity_of(&root_der).map_err(CaError::Corrupt)?;
        let active = self.authority.intermediate_validity();
        let ttl = self.authority.config.intermediate_ttl.unwrap_or_else(|| {
            (active.not_after - active.not_before - BACKDATE)
                .max(time::Duration::MINUTE)
                .unsigned_abs()
        });
        let validity = cap_lifetime(ttl, ttl, root_validity, now);
        if validity.not_after <= now + Duration::from_secs(1) {
            return Err(CaError::IssuerExpired {
                not_after: root_validity.not_after,
            });
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let issuer = Issuer::from_ca_cert_der(&root_der, root_key)?;
        let cert = profile::intermediate(self.authority.trust_domain(), validity)?
            .signed_by(&key, &issuer)?;
        let id = cert_id(cert.der());
        self.authority.keep_key(&id, &key)?;
        self.share_key(&id, &key)?;
        Ok(self.vouch(record(
            cert.der(),
            cert.pem(),
            Kind::Intermediate,
            Some(root.id.clone()),
            state,
            validity,
            unix(now),
        )))
    }

    /// Moves automatic intermediate rotation on, as its schedule says at `now`.
    pub fn rotate(&self, now: OffsetDateTime) -> Result<Vec<Step>, CaError> {
        let chain = self.authority.chain();
        let records = &chain.records;
        let t = unix(now);
        let overlap = self.authority.config.rotation_overlap.as_secs() as i64;
        let mut steps = Vec::new();
        let Some(active) = records
            .iter()
            .find(|a| a.kind == Kind::Intermediate && a.state == State::Active)
        else {
            return Ok(steps);
        };
        let life = active.not_after - active.not_before;
        let prepared = records
            .iter()
            .find(|a| a.kind == Kind::Intermediate && a.state == State::Published);
        match prepared {
            None if t >= active.not_before + life / 2 => {
                let root = records
                    .iter()
                    .find(|a| Some(&a.id) == active.parent.as_ref())
                    .ok_or_else(|| {
                        CaError::Corrupt("the active intermediate has no root".into())
                    })?;
                let next = self.make_intermediate(root, State::Published, now)?;
                let done = self.change(now, |tx| {
                    // Under the lock, the premises again: the same intermediate
                    // signs, its root is still the active one, none is prepared.
                    let current = chain::authorities(tx)?;
                    let still = |id: &str, kind, state| {
                        current
                            .iter()
                            .any(|a| a.id == id && a.kind == kind && a.state == state)
                    };
                    if !still(&active.id, Kind::Intermediate, State::Active)
                        || !still(&root.id, Kind::Root, State::Active)
                        || current
                            .iter()
                            .any(|a| a.kind == Kind::Intermediate && a.state == State::Published)
                    {
                        return Ok(None);
                    }
                    chain::insert_authority(tx, &next)?;
                    Ok(Some(
                        event("intermediate_prepared", &next).with("root", root.id.as_str()),
                    ))
                })?;
                if done {
                    steps.push(Step::Prepared(next.id));
                }
            }
            Some(p)
                if t >= active.not_before + life * 5 / 6
                    && (t >= p.created_at + overlap || t >= active.not_after) =>
            {
                let (old, new) = (active.id.clone(), p.id.clone());
                let done = self.change(now, |tx| {
                    // Both moves or neither (returning None rolls back):
                    // never two active intermediates.
                    if !chain::move_authority(tx, &old, State::Active, State::Previous, t)?
                        || !chain::move_authority(tx, &new, State::Published, State::Active, t)?
                    {
                        return Ok(None);
                    }
                    Ok(Some(
                        event("intermediate_activated", p).with("previous", old.as_str()),
                    ))
                })?;
                if done {
                    steps.push(Step::Activated(new));
                }
            }
            _ => {}
        }
        for q in records
            .iter()
            .filter(|a| a.kind == Kind::Intermediate && a.state == State::Previous)
        {
            let last = chain::last_leaf_expiry(&mut *self.store.lock(), &q.id)?;
            let until = last
                .unwrap_or(q.changed_at)
                .max(q.changed_at)
                .min(q.not_after);
            if t < until + overlap {
                continue;
            }
            let done = self.change(now, |tx| {
                if !chain::move_authority(tx, &q.id, State::Previous, State::Retired, t)? {
                    return Ok(None);
                }
                Ok(Some(event("intermediate_retired", q)))
            })?;
            if done {
                steps.push(Step::Retired(q.id.clone()));
            }
        }
        if !steps.is_empty() {
            self.reload_chain()?;
        }
        Ok(steps)
    }

    /// The root or intermediate whose id starts with `prefix` (at least 8
    /// hex characters, unique).
    fn find(&self, prefix: &str) -> Result<AuthorityRecord, Refusal> {
        let prefix = prefix.to_ascii_lowercase();
        if prefix.len() < 8 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Refusal::Rotation(
                "name a root by at least 8 hex characters of its id (warden ca status lists them)"
                    .into(),
            ));
        }
        let records = chain::authorities(&mut *self.store.lock()).map_err(CaError::from)?;
        let found: Vec<_> = records
            .into_iter()
            .filter(|a| a.id.starts_with(&prefix))
            .collect();
        match <[_; 1]>::try_from(found) {
            Ok([a]) => Ok(a),
            Err(v) if v.is_empty() => Err(Refusal::Rotation(format!(
                "no root or intermediate {prefix}"
            ))),
            Err(_) => Err(Refusal::Rotation(format!(
                "{prefix} names more than one certificate"
            ))),
        }
    }

    /// The root `id` names, if it is in the bundle and not signing;
    /// otherwise a refusal that says what it is, then `why`.
    fn published_root(&self, id: &str, why: &str) -> Result<AuthorityRecord, Refusal> {
        let root = self.find(id)?;
        if root.kind != Kind::Root || root.state != State::Published {
            return Err(Refusal::Rotation(format!(
                "{} is a {} {}: {why}",
                short(&root.id),
                root.state.as_str(),
                root.kind.as_str()
            )));
        }
        Ok(root)
    }

    /// `warden ca root add`: a new root in the bundle, not signing yet.
    /// `brought`: an existing CA certificate and its key (made elsewhere);
    /// else a new self-signed root that lives `ttl`.
    pub fn add_root(
        &self,
        brought: Option<(&Path, &Path)>,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<AuthorityRecord, Refusal> {
        let (der, key, validity) = match brought {
            Some((cert, key_path)) => {
                let der = read_certs(cert)?.swap_remove(0);
                let key =
                    KeyPair::from_pem(&crate::authority::read_text(key_path)?).map_err(|e| {
                        Refusal::Rotation(format!(
                            "{}: not a usable private key: {e}",
                            key_path.display()
                        ))
                    })?;
                crate::authority::check_external_root(cert, &der, &key)?;
                let v = validity_of(&der)
                    .map_err(|what| Refusal::Rotation(format!("{}: {what}", cert.display())))?;
                (der, key, v)
            }
            None => {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::from)?;
                let v = Validity {
                    not_before: now - BACKDATE,
                    not_after: now + ttl,
                };
                let cert = profile::root(self.authority.trust_domain(), v)
                    .and_then(|p| p.self_signed(&key))
                    .map_err(CaError::from)?;
                (cert.der().clone(), key, v)
            }
        };
        if validity.not_after <= now {
            return Err(Refusal::Rotation("that root has expired".into()));
        }
        let root = self.vouch(record(
            &der,
            certs_pem(std::slice::from_ref(&der)),
            Kind::Root,
            None,
            State::Published,
            validity,
            unix(now),
        ));
        self.authority.keep_key(&root.id, &key)?;
        self.share_key(&root.id, &key)?;
        let added = self.change(now, |tx| {
            if chain::authorities(tx)?.iter().any(|a| a.id == root.id) {
                return Ok(None);
            }
            chain::insert_authority(tx, &root)?;
            Ok(Some(event("root_added", &root)))
        })?;
        if !added {
            return Err(Refusal::Rotation(format!(
                "root {} is already known",
                short(&root.id)
            )));
        }
        self.reload_chain()?;
        Ok(root)
    }

    /// `warden ca root activate`: an intermediate under root `id` signs from
    /// now on; the old root stays in the bundle. Refused until the root has
    /// been in the bundle for `rotation_overlap`, so every proxy trusts it
    /// before the first leaf under it exists.
    pub fn activate_root(&self, id: &str, now: OffsetDateTime) -> Result<AuthorityRecord, Refusal> {
        let root = self.published_root(id, "not a root waiting in the bundle")?;
        let overlap = self.authority.config.rotation_overlap;
        let ready = OffsetDateTime::from_unix_timestamp(root.created_at)
            .map_err(|e| CaError::Corrupt(e.to_string()))?
            + overlap;
        if now < ready {
            return Err(Refusal::Rotation(format!(
                "root {} has been in the bundle since {}; it can sign from {ready} on (rotation_overlap {}), once every proxy trusts it",
                short(&root.id),
                root.created_at,
                warden_config::HumanDuration(overlap)
            )));
        }
        let intermediate = self.make_intermediate(&root, State::Active, now)?;
        let t = unix(now);
        let done = self.change(now, |tx| {
            if !chain::move_authority(tx, &root.id, State::Published, State::Active, t)? {
                return Ok(None);
            }
            for a in chain::authorities(tx)? {
                match (a.kind, a.state) {
                    (Kind::Root, State::Active) if a.id != root.id => {
                        chain::move_authority(tx, &a.id, State::Active, State::Published, t)?;
                    }
                    (Kind::Intermediate, State::Active) => {
                        chain::move_authority(tx, &a.id, State::Active, State::Previous, t)?;
                    }
                    // A prepared intermediate under the old root will never sign.
                    (Kind::Intermediate, State::Published) => {
                        chain::move_authority(tx, &a.id, State::Published, State::Retired, t)?;
                    }
                    _ => {}
                }
            }
            chain::insert_authority(tx, &intermediate)?;
            Ok(Some(
                event("root_activated", &root).with("intermediate", intermediate.id.as_str()),
            ))
        })?;
        if !done {
            return Err(Refusal::Rotation(format!(
                "root {} changed meanwhile; try again",
                short(&root.id)
            )));
        }
        self.reload_chain()?;
        Ok(root)
    }

    /// `warden ca root retire`: takes a root out of the bundle. Refused for
    /// the active root, and while any certificate signed under it is valid.
    pub fn retire_root(&self, id: &str, now: OffsetDateTime) -> Result<AuthorityRecord, Refusal> {
        let root = self.published_root(
            id,
            "only a root that no longer signs can be retired (activate another first)",
        )?;
        let t = unix(now);
        let mut live = 0;
        let done = self.change(now, |tx| {
            live = chain::live_leaves_under_root(tx, &root.id, t)?;
            if live > 0 {
                return Ok(None);
            }
            if !chain::move_authority(tx, &root.id, State::Published, State::Retired, t)? {
                return Ok(None);
            }
            let children = chain::authorities(tx)?;
            if children
                .iter()
                .any(|a| a.parent.as_deref() == Some(root.id.as_str()) && a.state == State::Active)
            {
                return Ok(None); // it signs after all (rolled back)
            }
            for a in children {
                if a.parent.as_deref() == Some(root.id.as_str()) && a.state != State::Retired {
                    chain::move_authority(tx, &a.id, a.state, State::Retired, t)?;
                }
            }
            Ok(Some(event("root_retired", &root)))
        })?;
        if !done {
            let last = self.last_leaf_under(&root.id)?;
            return Err(Refusal::Rotation(format!(
                "{live} certificates signed under root {} are still valid (the last until {}): retiring it now would break them",
                short(&root.id),
                last.map_or("?".to_owned(), |l| l.to_string())
            )));
        }
        self.reload_chain()?;
        Ok(root)
    }

    fn last_leaf_under(&self, root: &str) -> Result<Option<i64>, CaError> {
        let mut conn = self.store.lock();
        let mut last = None;
        for a in chain::authorities(&mut *conn)?
            .iter()
            .filter(|a| a.parent.as_deref() == Some(root))
        {
            last = last.max(chain::last_leaf_expiry(&mut *conn, &a.id)?);
        }
        Ok(last)
    }
}

impl CaService {
    /// `warden ca status`: every root and intermediate with its state and
    /// expiry, the trust feed's sequence, the last rotation step, and counts.
    pub fn status(&self, now: OffsetDateTime) -> Result<String, CaError> {
        use std::fmt::Write as _;
        let t = unix(now);
        let mut conn = self.store.lock();
        let records = chain::authorities(&mut *conn)?;
        let counts = store::counts(&mut *conn, t)?;
        let sequence = store::trust_sequence(&mut *conn)?;
        let live = store::replicas(&mut *conn, t - 3 * crate::trust::HEARTBEAT.as_secs() as i64)?;
        drop(conn);
        let when = |u: i64| {
            OffsetDateTime::from_unix_timestamp(u)
                .ok()
                .and_then(|d| {
                    d.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_else(|| u.to_string())
        };
        let left = |u: i64| {
            let d = u - t;
            if d <= 0 {
                "expired".to_owned()
            } else {
                format!(
                    "in {}",
                    warden_config::HumanDuration(Duration::from_secs(d as u64))
                )
            }
        };
        let mut out = String::new();
        let _ = writeln!(out, "trust domain    {}", self.authority.trust_domain());
        let _ = writeln!(out, "trust sequence  {sequence}");
        if let Some(last) = records.iter().map(|a| a.changed_at).max() {
            let _ = writeln!(out, "last rotation   {}", when(last));
        }
        let _ = writeln!(out, "replicas        {} serving", live.len());
        for (name, started, seen) in &live {
            let _ = writeln!(
                out,
                "  {name}  up since {}, seen {} s ago",
                when(*started),
                t - seen
            );
        }
        let _ = writeln!(out, "chain:");
        for a in &records {
            let _ = writeln!(
                out,
                "  {:<12} {:<9} {}  not after {} ({}){}",
                a.kind.as_str(),
                a.state.as_str(),
                short(&a.id),
                when(a.not_after),
                left(a.not_after),
                a.parent
                    .as_ref()
                    .map(|p| format!("  under {}", short(p)))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(
            out,
            "certificates    {} issued, {} still valid",
            counts.issued, counts.valid
        );
        let _ = writeln!(
            out,
            "join tokens     {} unused and unexpired",
            counts.tokens
        );
        let _ = writeln!(out, "denied          {}", counts.denied);
        Ok(out)
    }
}
