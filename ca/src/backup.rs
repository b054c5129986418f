//! `warden ca backup --to DIR`: a consistent copy of everything a CA needs
//! to come back, taken while it runs. The store is copied with SQLite's
//! online backup (one snapshot, whatever other processes write meanwhile);
//! the audit trail is copied up to the length that snapshot records, so the
//! copy verifies as one chain; keys and settings are copied as they are.
//! Restoring is copying the directory back with the CA stopped.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use crate::authority::{CaError, files};
use crate::service::CaService;
use crate::store;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Copies `len` bytes (all, if `None`) of `from` to `to`, created with `mode`.
fn copy(from: &Path, to: &Path, len: Option<u64>, mode: u32) -> Result<(), CaError> {
    let mut src = fs::File::open(from).map_err(io(from))?;
    let mut bytes = Vec::new();
    match len {
        Some(n) => (&mut src).take(n).read_to_end(&mut bytes),
        None => src.read_to_end(&mut bytes),
    }
    .map_err(io(from))?;
    let mut dst = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(to)
        .map_err(io(to))?;
    dst.write_all(&bytes).map_err(io(to))?;
    dst.sync_all().map_err(io(to))
}

impl CaService {
    /// Writes the backup into `to` (a new directory, 0700). Returns the
    /// number of audit lines it holds.
    pub fn backup(&self, to: &Path) -> Result<i64, CaError> {
        if to.exists() {
            return Err(CaError::AlreadyExists(to.to_path_buf()));
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(to)
            .map_err(io(to))?;
        let db = to.join(files::STATE);
        // Private from the start: it holds token hashes and the deny list.
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&db)
            .map_err(io(&db))?;
        {
            let conn = self.store.lock_exclusive();
            let store::Db::Sqlite(conn) = &conn.db else {
                return Err(CaError::Setup(
                    "backup copies the embedded store; back a PostgreSQL store up with pg_dump (README: Operations)".into(),
                ));
            };
            let mut dst = rusqlite::Connection::open(&db)?;
            let backup = rusqlite::backup::Backup::new(conn, &mut dst)?;
            // One step copies the whole database under one read lock: a snapshot.
            backup.run_to_completion(i32::MAX, std::time::Duration::ZERO, None)?;
        }
        let head = store::read_audit_head(&mut rusqlite::Connection::open(&db)?)?;
        let state = &self.authority.state_dir;
        if head.len > 0 {
            copy(
                &state.join(files::AUDIT),
                &to.join(files::AUDIT),
                Some(head.len as u64),
                0o600,
            )?;
        }
        let dir = &self.authority.dir;
        for (name, secret) in [
            (files::CONFIG, false),
            (files::ROOT_CERT, false),
            (files::ROOT_KEY, true),
            (files::INTERMEDIATE_CERT, false),
            (files::INTERMEDIATE_KEY, true),
            (files::BUNDLE, false),
            (files::STORE_KEY, true),
        ] {
            let from = dir.join(name);
            if from.exists() {
                copy(
                    &from,
                    &to.join(name),
                    None,
                    if secret { 0o600 } else { 0o644 },
                )?;
            }
        }
        let keys = state.join(files::KEYS);
        if keys.is_dir() {
            let out = to.join(files::KEYS);
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&out)
                .map_err(io(&out))?;
            for entry in fs::read_dir(&keys).map_err(io(&keys))? {
                let entry = entry.map_err(io(&keys))?;
                copy(&entry.path(), &out.join(entry.file_name()), None, 0o600)?;
            }
        }
        fs::File::open(to)
            .and_then(|d| d.sync_all())
            .map_err(io(to))?;
        Ok(head.seq)
    }
}
