//! A predict route's reference traffic: natural inputs the operator
//! supplies (a sample of the training data, or requests recorded from
//! honest callers), so that extraction detection knows what natural looks
//! like from its first query, and never learns it from the callers it is
//! judging.
//!
//! The file holds one natural input per line: for a predict route a feature
//! vector, as a JSON array of numbers; for an embeddings route a text, as a
//! JSON string (blank lines and lines starting with `#` are skipped). A
//! relative path is taken from the config file's directory.

use std::path::{Path, PathBuf};

/// Most vectors read from a reference.
pub const MAX_ROWS: usize = 100_000;
/// Largest reference file read.
pub const MAX_BYTES: u64 = 64 << 20;
/// Fewest vectors a reference must hold to say anything.
pub const MIN_ROWS: usize = 32;
/// Vectors per compared coordinate that the detector's outlier test needs
/// to fit the reference's covariance (inputs are compared in at most
/// [`COMPARED`] coordinates).
pub const ROWS_PER_COORDINATE: usize = 8;
/// Coordinates the detector compares inputs in at most (wider ones are
/// folded into this many).
pub const COMPARED: usize = 32;

/// `path` as written in the config file `config`: a relative one is taken
/// from the config file's directory (as every file a route names).
pub fn beside(config: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_relative() {
        config.parent().unwrap_or(Path::new(".")).join(p)
    } else {
        p.to_path_buf()
    }
}

/// Natural inputs of one route: feature vectors all of one width, or texts.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// Where they were read from.
    pub path: PathBuf,
    /// The vectors (empty for texts).
    pub rows: Vec<Vec<f64>>,
    /// The texts (empty for vectors).
    pub texts: Vec<String>,
}

impl Reference {
    /// Reads `path` (relative to `config`'s directory when relative); the
    /// error says what is wrong, with the line of the file where it is.
    pub fn load(config: &Path, path: &str) -> Result<Self, String> {
        let path = beside(config, path);
        let shown = path.display();
        let size = std::fs::metadata(&path)
            .map_err(|e| format!("cannot read reference {shown}: {e}"))?
            .len();
        if size > MAX_BYTES {
            return Err(format!(
                "reference {shown} is larger than {MAX_BYTES} bytes"
            ));
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read reference {shown}: {e}"))?;
        let mut rows: Vec<Vec<f64>> = Vec::new();
        let mut texts: Vec<String> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("reference {shown}:{}", i + 1);
            if rows.len() + texts.len() == MAX_ROWS {
                return Err(format!(
                    "reference {shown} holds more than {MAX_ROWS} inputs"
                ));
            }
            if line.starts_with('"') {
                let t: String = serde_json::from_str(line)
                    .map_err(|e| format!("{}: not a JSON string: {e}", at()))?;
                if !rows.is_empty() {
                    return Err(format!(
                        "{}: a text, where the reference holds vectors (one kind per file)",
                        at()
                    ));
                }
                texts.push(t);
                continue;
            }
            let row: Vec<f64> = serde_json::from_str(line).map_err(|e| {
                format!(
                    "{}: neither a JSON array of numbers nor a JSON string: {e}",
                    at()
                )
            })?;
            if !texts.is_empty() {
                return Err(format!(
                    "{}: a vector, where the reference holds texts (one kind per file)",
                    at()
                ));
            }
            if row.is_empty() || row.iter().any(|v| !v.is_finite()) {
                return Err(format!("{}: a vector of finite numbers is needed", at()));
            }
            if let Some(first) = rows.first()
                && first.len() != row.len()
            {
                return Err(format!(
                    "{}: {} values, where the first vector has {}",
                    at(),
                    row.len(),
                    first.len()
                ));
            }
            rows.push(row);
        }
        let n = rows.len() + texts.len();
        if n < MIN_ROWS {
            return Err(format!(
                "reference {shown} holds {n} inputs; at least {MIN_ROWS} are needed"
            ));
        }
        Ok(Self { path, rows, texts })
    }

    /// Whether it holds texts (for an embeddings route).
    pub fn is_texts(&self) -> bool {
        !self.texts.is_empty()
    }

    /// The vectors' width (0 for texts).
    pub fn width(&self) -> usize {
        self.rows.first().map_or(0, Vec::len)
    }

    /// Vectors the outlier test needs for this reference's width.
    pub fn outlier_rows(&self) -> usize {
        ROWS_PER_COORDINATE * self.width().min(COMPARED)
    }
}
