//! Writing a workload's credentials: `cert.pem` (leaf then intermediates),
//! `key.pem` (0600) and `bundle.pem`, each replaced atomically and fsynced
//! (the directory too), so a process watching the directory never reads
//! half a file and a crash never leaves one. `warden ca certify` writes
//! them, and so does a proxy into its `state_dir`.

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
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
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
    replace(&dir.join(KEY), key_pem, 0o600)?;
    replace(&dir.join(CERT), chain_pem, 0o644)?;
    replace(&dir.join(BUNDLE), bundle_pem, 0o644)?;
    // The renames themselves survive a crash once the directory is synced.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Replaces one file `name` in `dir` (0600), as atomically and durably as
/// the credentials: the proxy's cached trust feed.
pub fn write_private(dir: &Path, name: &str, contents: &str) -> Result<(), WriteError> {
    replace(&dir.join(name), contents, 0o600)?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}
