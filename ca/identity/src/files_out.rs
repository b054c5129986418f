//! Writing a workload's credentials: `cert.pem` (leaf then intermediates),
//! `key.pem` (0600) and `bundle.pem`, each replaced atomically and fsynced
//! (the directory too), so a process watching the directory never reads
//! half a file and a crash never leaves one. `warden ca certify` writes
//! them, and so does a proxy into its `state_dir`.
//!
//! The key and the certificate are two renames: both new files are written
//! and synced first, then the key is renamed, then the certificate. A
//! crash between the two leaves the new key beside the old certificate (or
//! beside none, on the first write), with the new certificate still in
//! `cert.tmp`; [`read_credentials`] finishes that write, so the pair read
//! back always belongs together.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// A file that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct WriteError {
    /// The file or directory.
    pub path: std::path::PathBuf,
    /// Why.
    pub source: std::io::Error,
}

/// File names in an output directory.
pub const CERT: &str = "cert.pem";
/// Private key file.
pub const KEY: &str = "key.pem";
/// Where the next certificate waits for its rename (see [`read_credentials`]).
const CERT_TMP: &str = "cert.tmp";
/// Where the next key waits for its rename.
const KEY_TMP: &str = "key.tmp";
/// Trust bundle file.
pub const BUNDLE: &str = "bundle.pem";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError + '_ {
    move |source| WriteError {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `contents` to `path` through a temporary file and a rename.
fn replace(path: &Path, contents: &str, mode: u32) -> Result<(), WriteError> {
    let tmp = path.with_extension("tmp");
    write_new(&tmp, contents, mode)?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// Writes `contents` to a fresh `tmp` (any older one removed), synced.
fn write_new(tmp: &Path, contents: &str, mode: u32) -> Result<(), WriteError> {
    let _ = fs::remove_file(tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)
        .map_err(io(tmp))?;
    f.write_all(contents.as_bytes()).map_err(io(tmp))?;
    f.sync_all().map_err(io(tmp))
}

fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Writes the three credential files into `dir` (created 0700 if missing).
/// The key goes first, so a watcher that sees a new certificate finds its key.
pub fn write_credentials(
    dir: &Path,
    chain_pem: &str,
    key_pem: &str,
    bundle_pem: &str,
) -> Result<(), WriteError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    // Both new files are whole on disk before either rename, so that the
    // certificate a crash leaves behind in `cert.tmp` can be finished.
    write_new(&dir.join(CERT_TMP), chain_pem, 0o644)?;
    write_new(&dir.join(KEY_TMP), key_pem, 0o600)?;
    sync_dir(dir)?;
    fs::rename(dir.join(KEY_TMP), dir.join(KEY)).map_err(io(&dir.join(KEY)))?;
    sync_dir(dir)?;
    fs::rename(dir.join(CERT_TMP), dir.join(CERT)).map_err(io(&dir.join(CERT)))?;
    replace(&dir.join(BUNDLE), bundle_pem, 0o644)?;
    // The renames themselves survive a crash once the directory is synced.
    sync_dir(dir)
}

/// Why [`read_credentials`] found no usable pair.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A file is missing or unreadable.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `cert.pem` and `key.pem` do not belong together (and no interrupted
    /// write explains it).
    #[error("{} and {} do not belong together: {why}", CERT, KEY)]
    Mismatched {
        /// What the check said.
        why: String,
    },
    /// An interrupted write could not be finished.
    #[error(transparent)]
    Finish(#[from] WriteError),
}

/// Reads `cert.pem` and `key.pem` from `dir` as a pair whose key is the
/// certificate's. If a crash stopped [`write_credentials`] between its two
/// renames (the new key beside the old certificate, or beside no
/// certificate on the first write), the new certificate waiting in
/// `cert.tmp` is checked against the key and the write finished. No
/// `key.pem` is [`ReadError::Io`] `NotFound` on it: nothing was stored.
pub fn read_credentials(dir: &Path) -> Result<(String, String), ReadError> {
    let read = |name: &str| {
        let path = dir.join(name);
        fs::read_to_string(&path).map_err(|source| ReadError::Io { path, source })
    };
    let key = read(KEY)?;
    let belong =
        |chain: &str| crate::tls::certified_key(chain, &key, &crate::tls::provider()).map(|_| ());
    // A missing certificate beside a key is a mismatch too: the first
    // write stopped after the key's rename.
    let missing = match read(CERT) {
        Ok(chain) => match belong(&chain) {
            Ok(()) => return Ok((chain, key)),
            Err(e) => Err(e.to_string()),
        },
        Err(ReadError::Io { path, source }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(ReadError::Io { path, source })
        }
        Err(e) => return Err(e),
    };
    // Only a certificate that verifiably goes with this key is taken: a
    // stale `cert.tmp` from an older interrupted write never is.
    match read(CERT_TMP) {
        Ok(pending) if belong(&pending).is_ok() => {
            fs::rename(dir.join(CERT_TMP), dir.join(CERT)).map_err(io(&dir.join(CERT)))?;
            sync_dir(dir)?;
            Ok((pending, key))
        }
        _ => Err(match missing {
            Ok(not_found) => not_found,
            Err(why) => ReadError::Mismatched { why },
        }),
    }
}

/// Replaces one file `name` in `dir` (0600), as atomically and durably as
/// the credentials: the proxy's cached trust feed.
pub fn write_private(dir: &Path, name: &str, contents: &str) -> Result<(), WriteError> {
    replace(&dir.join(name), contents, 0o600)?;
    sync_dir(dir)
}

/// The modification times of `paths` (`None` for one that cannot be
/// read): what a watcher of certificate files compares between two looks
/// (a `stat` each; it follows the symlink swaps of Kubernetes volumes).
pub fn modified_times(paths: &[&Path]) -> Vec<Option<std::time::SystemTime>> {
    paths
        .iter()
        .map(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A self-signed certificate and its key, PEM.
    fn pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["w.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("warden-files-out-{}", rand::random::<u64>()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_crash_between_the_key_and_the_certificate_still_reads_a_pair() {
        let d = dir();
        let (old_cert, old_key) = pair();
        let (new_cert, new_key) = pair();
        write_credentials(&d, &old_cert, &old_key, "b").unwrap();
        assert_eq!(read_credentials(&d).unwrap(), (old_cert.clone(), old_key));
        assert!(!d.join(CERT_TMP).exists() && !d.join(KEY_TMP).exists());

        // Stopped after the key's rename: the new key, the old certificate.
        write_new(&d.join(CERT_TMP), &new_cert, 0o644).unwrap();
        write_new(&d.join(KEY_TMP), &new_key, 0o600).unwrap();
        fs::rename(d.join(KEY_TMP), d.join(KEY)).unwrap();
        assert_eq!(
            read_credentials(&d).unwrap(),
            (new_cert.clone(), new_key.clone()),
            "the interrupted write is finished"
        );
        assert_eq!(fs::read_to_string(d.join(CERT)).unwrap(), new_cert);
        assert!(!d.join(CERT_TMP).exists());

        // Stopped before either rename: the old pair stands.
        let (next_cert, next_key) = pair();
        write_new(&d.join(CERT_TMP), &next_cert, 0o644).unwrap();
        write_new(&d.join(KEY_TMP), &next_key, 0o600).unwrap();
        assert_eq!(read_credentials(&d).unwrap(), (new_cert, new_key));

        // A mismatch nothing explains (a stale cert.tmp is not taken).
        fs::write(d.join(KEY), &next_key).unwrap();
        write_new(&d.join(CERT_TMP), &old_cert, 0o644).unwrap();
        assert!(matches!(
            read_credentials(&d),
            Err(ReadError::Mismatched { .. })
        ));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_crash_after_the_first_key_rename_still_reads_a_pair() {
        let d = dir();
        assert!(matches!(
            read_credentials(&d),
            Err(ReadError::Io { path, source })
                if path == d.join(KEY) && source.kind() == std::io::ErrorKind::NotFound
        ));
        // The first write stopped after the key's rename: no cert.pem yet.
        let (cert, key) = pair();
        write_new(&d.join(CERT_TMP), &cert, 0o644).unwrap();
        write_new(&d.join(KEY_TMP), &key, 0o600).unwrap();
        fs::rename(d.join(KEY_TMP), d.join(KEY)).unwrap();
        assert_eq!(
            read_credentials(&d).unwrap(),
            (cert.clone(), key.clone()),
            "the interrupted first write is finished"
        );
        assert_eq!(fs::read_to_string(d.join(CERT)).unwrap(), cert);
        assert!(!d.join(CERT_TMP).exists());

        // A key alone, with a cert.tmp of another key: not taken, and the
        // missing certificate is named.
        let (other_cert, _) = pair();
        fs::remove_file(d.join(CERT)).unwrap();
        write_new(&d.join(CERT_TMP), &other_cert, 0o644).unwrap();
        assert!(matches!(
            read_credentials(&d),
            Err(ReadError::Io { path, .. }) if path == d.join(CERT)
        ));
        assert!(d.join(CERT_TMP).exists());
        let _ = fs::remove_dir_all(&d);
    }
}
