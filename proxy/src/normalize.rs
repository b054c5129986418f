//! Path normalization before authorization, so that the path a rule is
//! matched on is the path the app serves, whatever the spelling.
//!
//! The rules (RFC 3986 section 6.2.2 plus what proxies learned the hard way):
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//!   decoded; other escapes are kept, hex upper-cased;
//! - an escape that would change the path's structure or its meaning to
//!   some servers (`%2F` `/`, `%5C` `\`, `%00`), a raw `\`, a bad escape or a
//!   control character makes the path unsafe: the request gets 400;
//! - repeated slashes collapse to one;
//! - `.` and `..` segments are resolved; `..` above the root is unsafe;
//! - the query is left as it is and not matched.
//!
//! The app receives the normalized path, exactly the one that was authorized.

use std::borrow::Cow;

/// Why a path cannot be normalized safely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an origin-form path (`/...`).
    #[error("path must start with '/'")]
    NotAbsolute,
    /// `%` not followed by two hex digits.
    #[error("path has an invalid percent-escape")]
    BadEscape,
    /// An escaped `/`, `\` or NUL, a raw `\`, or a control character.
    #[error("path has an encoded slash, backslash, NUL or a control character")]
    Ambiguous,
    /// `..` would climb above `/`.
    #[error("path climbs above the root")]
    AboveRoot,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// True when `raw` (starting with `/`) is already normal: no escapes, no
/// backslash or control or non-ASCII byte, no empty, `.` or `..` segment but
/// a trailing `/`. Most paths are; they are then used as they are.
fn is_normal(raw: &[u8]) -> bool {
    for (i, &b) in raw.iter().enumerate() {
        if b == b'%' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            return false;
        }
        if b == b'/' {
            let rest = &raw[i + 1..];
            let seg = &rest[..rest.iter().position(|&c| c == b'/').unwrap_or(rest.len())];
            if (seg.is_empty() && !rest.is_empty()) || seg == b"." || seg == b".." {
                return false;
            }
        }
    }
    true
}

/// Normalizes an origin-form path (without the query). Borrows when the
/// path is already normal.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let raw = path.as_bytes();
    if raw.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(raw) {
        return Ok(Cow::Borrowed(path));
    }
    // Pass 1: escapes and forbidden characters.
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        match b {
            b'%' => {
                let (h, l) = match (
                    raw.get(i + 1).copied().and_then(hex),
                    raw.get(i + 2).copied().and_then(hex),
                ) {
                    (Some(h), Some(l)) => (h, l),
                    _ => return Err(PathError::BadEscape),
                };
                let v = h * 16 + l;
                if v == b'/' || v == b'\\' || v < 0x20 || v == 0x7f {
                    return Err(PathError::Ambiguous);
                }
                if unreserved(v) {
                    decoded.push(v as char);
                } else {
                    decoded.push('%');
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(h)]));
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(l)]));
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Ambiguous),
            b if b < 0x20 || b == 0x7f => return Err(PathError::Ambiguous),
            _ => {
                // Non-ASCII bytes cannot occur in a valid http::Uri; keep the
                // char whole if they ever do.
                let ch_len = path[i..].chars().next().map_or(1, char::len_utf8);
                decoded.push_str(&path[i..i + ch_len]);
                i += ch_len;
                continue;
            }
        }
        if b != b'%' {
            i += 1;
        }
    }
    // Pass 2: segments.
    let mut out: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for seg in decoded.split('/').skip(1) {
        match seg {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if trailing || out.is_empty() {
        result.push('/');
    }
    Ok(Cow::Owned(result))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed_and_others_rebuilt() {
        for p in ["/", "/api/v1/items", "/a/b/", "/..a/b.", "/a-b_c.d~e"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
        for p in ["//a", "/a//b", "/a/./b", "/a/..", "/a/.", "/%61", "/a\\b"] {
            assert!(!matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn plain_paths_are_unchanged() {
        for p in [
            "/",
            "/api/v1/items",
            "/a/b/",
            "/a-b_c.d~e",
            "/x%20y",
            "/q%3Fz",
        ] {
            assert_eq!(n(p).unwrap(), p);
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_uppercased() {
        assert_eq!(n("/%61dmin").unwrap(), "/admin");
        assert_eq!(n("/%41%2d%5F%7e").unwrap(), "/A-_~");
        assert_eq!(n("/a%3fb").unwrap(), "/a%3Fb");
    }

    #[test]
    fn dot_segments_and_repeated_slashes_are_resolved() {
        assert_eq!(n("/a/./b").unwrap(), "/a/b");
        assert_eq!(n("/a/b/../c").unwrap(), "/a/c");
        assert_eq!(n("//admin").unwrap(), "/admin");
        assert_eq!(n("/api//../admin").unwrap(), "/admin");
        assert_eq!(n("/a/%2e%2e/admin").unwrap(), "/admin");
        assert_eq!(n("/a/%2E/b").unwrap(), "/a/b");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/a/.").unwrap(), "/a/");
        assert_eq!(n("/..a/b").unwrap(), "/..a/b");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        assert_eq!(n("/.."), Err(PathError::AboveRoot));
        assert_eq!(n("/a/../../b"), Err(PathError::AboveRoot));
        assert_eq!(n("/%2e%2e/x"), Err(PathError::AboveRoot));
        assert_eq!(n("/a%2fb"), Err(PathError::Ambiguous));
        assert_eq!(n("/a%2Fb"), Err(PathError::Ambiguous));
        assert_eq!(n("/a%5cb"), Err(PathError::Ambiguous));
        assert_eq!(n("/a\\b"), Err(PathError::Ambiguous));
        assert_eq!(n("/a%00b"), Err(PathError::Ambiguous));
        assert_eq!(n("/a%0ab"), Err(PathError::Ambiguous));
        assert_eq!(n("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(n("/a%2"), Err(PathError::BadEscape));
        assert_eq!(n("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(n("*"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for p in ["/a/./b/../c//d/", "/%61/%2e/x", "/x%3a"] {
            let once = n(p).unwrap();
            assert_eq!(n(&once).unwrap(), once);
        }
    }
}
