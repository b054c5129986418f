//! Config errors that point at the offending place: `file:line:column: message`.
//!
//! Every config problem, from a YAML syntax error to a TTL that exceeds its
//! cap, becomes a [`Diagnostic`]; a load returns all of them at once so a user
//! fixes a file in one pass.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_saphyr::{Location, Spanned};

/// One problem in a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line (0 when the problem is about the file as a whole).
    pub line: u64,
    /// 1-based column (0 when unknown).
    pub column: u64,
    /// What is wrong, in a short sentence.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// All the problems found in one config file; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Problems that do not stop a config from loading, such as a rule that can
/// never match. `warden check` prints them (`file:line:column: warning: ...`)
/// and still exits 0; nothing else reads them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Warnings(pub Vec<Diagnostic>);

impl fmt::Display for Warnings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}:{}:{}: warning: {}",
                d.file.display(),
                d.line,
                d.column,
                d.message
            )?;
        }
        Ok(())
    }
}

/// Collects semantic errors (and warnings) found after parsing, each tied
/// to a spanned value.
#[derive(Debug)]
pub struct Collector<'a> {
    file: &'a Path,
    found: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl<'a> Collector<'a> {
    /// Starts an empty collection for `file`.
    pub fn new(file: &'a Path) -> Self {
        Self {
            file,
            found: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// The file being checked (paths in it are relative to its directory).
    pub fn file(&self) -> &Path {
        self.file
    }

    /// Records `message` at the place `value` was written.
    pub fn at<T>(&mut self, value: &Spanned<T>, message: impl Into<String>) {
        self.at_location(value.referenced, message);
    }

    /// Records `message` at a raw location.
    pub fn at_location(&mut self, loc: Location, message: impl Into<String>) {
        let d = self.diagnostic(loc, message.into());
        self.found.push(d);
    }

    /// Records a warning at the place `value` was written.
    pub fn warn<T>(&mut self, value: &Spanned<T>, message: impl Into<String>) {
        self.warn_location(value.referenced, message);
    }

    /// Records a warning at a raw location.
    pub fn warn_location(&mut self, loc: Location, message: impl Into<String>) {
        let d = self.diagnostic(loc, message.into());
        self.warnings.push(d);
    }

    fn diagnostic(&self, loc: Location, message: String) -> Diagnostic {
        Diagnostic {
            file: self.file.to_path_buf(),
            line: loc.line(),
            column: loc.column(),
            message,
        }
    }

    /// Takes in what another collection found: a value read from
    /// elsewhere (an environment variable), whose places are its own.
    pub fn absorb(&mut self, other: Collector<'_>) {
        self.found.extend(other.found);
        self.warnings.extend(other.warnings);
    }

    /// Records problems found elsewhere (a parse of another text), as they are.
    pub fn extend(&mut self, problems: Diagnostics) {
        self.found.extend(problems.0);
    }

    /// `Ok(v)` when no error was recorded, else every recorded error
    /// (warnings are dropped).
    pub fn finish<T>(self, v: T) -> Result<T, Diagnostics> {
        self.finish_with_warnings(v).map(|(v, _)| v)
    }

    /// Like [`Collector::finish`], and also the warnings, in file order.
    pub fn finish_with_warnings<T>(self, v: T) -> Result<(T, Warnings), Diagnostics> {
        if self.found.is_empty() {
            let mut w = self.warnings;
            w.sort_by_key(|d| (d.line, d.column));
            Ok((v, Warnings(w)))
        } else {
            Err(Diagnostics(self.found))
        }
    }
}

/// Largest config file we read; far above any real one, and it bounds memory.
pub(crate) const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Reads and parses `path` as YAML into `T`, turning every failure into a
/// diagnostic that names the file, line and column.
pub fn load_yaml<T: DeserializeOwned>(path: &Path) -> Result<T, Diagnostics> {
    let whole_file = |message: String| {
        Diagnostics(vec![Diagnostic {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            message,
        }])
    };
    let meta = std::fs::metadata(path).map_err(|e| whole_file(format!("cannot read: {e}")))?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(whole_file(format!(
            "file is {} bytes, more than the limit of {MAX_CONFIG_BYTES}",
            meta.len()
        )));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| whole_file(format!("cannot read: {e}")))?;
    parse_yaml(path, &text)
}

/// Parses YAML `text` (read from `path`) into `T`.
pub fn parse_yaml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, Diagnostics> {
    serde_saphyr::from_str::<T>(text).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        Diagnostics(vec![Diagnostic {
            file: path.to_path_buf(),
            line,
            column,
            message: plain_message(&e),
        }])
    })
}

/// The error's text without the location suffix and source snippet that
/// serde-saphyr adds, since our prefix already says where.
fn plain_message(e: &serde_saphyr::Error) -> String {
    let opts = serde_saphyr::render_options! { snippets: serde_saphyr::SnippetMode::Off };
    let text = e.without_snippet().render_with_options(opts);
    let first = text.lines().next().unwrap_or("invalid yaml").trim();
    match first.rfind(" at line ") {
        Some(i) => first[..i].to_owned(),
        None => first.to_owned(),
    }
}
