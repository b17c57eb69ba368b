//! Request-target normalization: the one place that turns what a client sent into the path that
//! is both authorized and forwarded, byte for byte.
//!
//! Rules, chosen so that no upstream can read the path differently from keygate:
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - _ ~`) are decoded, every other escape is
//!   kept with upper-case hex, so `/v1/%75sers` is authorized and forwarded as `/v1/users`;
//! - encoded `/`, `\`, `.` and `%` (double encoding) are rejected, as are `.` and `..` segments,
//!   backslashes, `;` path parameters, NUL and other control bytes, and escapes that do not decode
//!   to valid UTF-8 (overlong forms included);
//! - runs of `/` are merged and a trailing `/` is dropped.

use std::borrow::Cow;

use crate::error::Rejection;

/// Normalizes the path part of an origin-form target (no query). Allocates only when the path
/// changes.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, Rejection> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(Rejection::BadTarget("the path must start with /"));
    }
    match scan(bytes) {
        Scan::Normal { dots: false } => return Ok(Cow::Borrowed(raw)),
        Scan::Normal { dots: true } => {
            check_segments(raw)?;
            return Ok(Cow::Borrowed(raw));
        }
        Scan::Changes => {}
    }

    let mut out = String::with_capacity(raw.len());
    // Bytes decoded from a run of consecutive %XX escapes >= 0x80; validated as UTF-8 when the run ends.
    let mut utf8_run: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let value = decode_escape(bytes, i)?;
            i += 3;
            if value >= 0x80 {
                utf8_run.push(value);
                push_escape(&mut out, value);
                continue;
            }
            end_utf8_run(&mut utf8_run)?;
            match value {
                b'/' | b'\\' => return Err(Rejection::BadTarget("encoded slash")),
                b'.' => return Err(Rejection::BadTarget("encoded dot")),
                b'%' => return Err(Rejection::BadTarget("double percent-encoding")),
                0..=0x1f | 0x7f => return Err(Rejection::BadTarget("encoded control byte")),
                v if is_unreserved(v) => out.push(v as char),
                v => push_escape(&mut out, v),
            }
            continue;
        }
        end_utf8_run(&mut utf8_run)?;
        check_raw_byte(b)?;
        if b == b'/' && out.ends_with('/') {
            i += 1;
            continue;
        }
        out.push(b as char);
        i += 1;
    }
    end_utf8_run(&mut utf8_run)?;
    if out.len() > 1 && out.ends_with('/') {
        out.pop();
    }
    check_segments(&out)?;
    Ok(Cow::Owned(out))
}

enum Scan {
    /// Normalization would not change the path; `dots`: it has a `.` (maybe a dot segment).
    Normal { dots: bool },
    /// The path has an escape, a byte to refuse, `//` or a trailing `/`.
    Changes,
}

/// Bytes a path may carry as they are: printable ASCII but `%` and what [`check_raw_byte`]
/// refuses.
static PLAIN: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0x21;
    while b < 0x7f {
        table[b] = !matches!(
            b as u8,
            b'%' | b'\\'
                | b';'
                | b'"'
                | b'<'
                | b'>'
                | b'^'
                | b'`'
                | b'{'
                | b'|'
                | b'}'
                | b'#'
                | b'?'
        );
        b += 1;
    }
    table
};

/// One pass over the path: would normalization change it?
fn scan(bytes: &[u8]) -> Scan {
    let mut prev = 0u8;
    let mut dots = false;
    for &b in bytes {
        if !PLAIN[usize::from(b)] || (b == b'/' && prev == b'/') {
            return Scan::Changes;
        }
        dots |= b == b'.';
        prev = b;
    }
    if bytes.len() == 1 || prev != b'/' {
        Scan::Normal { dots }
    } else {
        Scan::Changes
    }
}

fn check_raw_byte(b: u8) -> Result<(), Rejection> {
    match b {
        0..=0x1f | 0x7f => Err(Rejection::BadTarget("control byte in path")),
        b'\\' => Err(Rejection::BadTarget("backslash in path")),
        b';' => Err(Rejection::BadTarget("path parameters are not accepted")),
        0x80.. => Err(Rejection::BadTarget("raw non-ASCII byte in path")),
        b' ' | b'"' | b'<' | b'>' | b'^' | b'`' | b'{' | b'|' | b'}' | b'#' | b'?' => {
            Err(Rejection::BadTarget("character not allowed in a path"))
        }
        _ => Ok(()),
    }
}

fn check_segments(path: &str) -> Result<(), Rejection> {
    for segment in path.split('/') {
        if segment == "." || segment == ".." {
            return Err(Rejection::BadTarget("dot segment"));
        }
    }
    Ok(())
}

fn decode_escape(bytes: &[u8], at: usize) -> Result<u8, Rejection> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    match (
        bytes.get(at + 1).and_then(|b| hex(*b)),
        bytes.get(at + 2).and_then(|b| hex(*b)),
    ) {
        (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
        _ => Err(Rejection::BadTarget("malformed percent-encoding")),
    }
}

fn end_utf8_run(run: &mut Vec<u8>) -> Result<(), Rejection> {
    if run.is_empty() {
        return Ok(());
    }
    let valid = std::str::from_utf8(run).is_ok();
    run.clear();
    if valid {
        Ok(())
    } else {
        Err(Rejection::BadTarget("percent-encoding is not valid UTF-8"))
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~')
}

fn push_escape(out: &mut String, value: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(HEX[usize::from(value >> 4)] as char);
    out.push(HEX[usize::from(value & 0xf)] as char);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes_are_those_kept_as_they_are() {
        for b in 0..=255u8 {
            assert_eq!(
                PLAIN[usize::from(b)],
                b != b'%' && check_raw_byte(b).is_ok(),
                "byte {b:#04x}"
            );
        }
    }

    fn ok(raw: &str) -> String {
        normalize_path(raw)
            .unwrap_or_else(|e| panic!("{raw}: {e}"))
            .into_owned()
    }

    fn rejected(raw: &str) -> bool {
        normalize_path(raw).is_err()
    }

    #[test]
    fn plain_paths_are_borrowed() {
        assert!(matches!(
            normalize_path("/v1/users").unwrap(),
            Cow::Borrowed(_)
        ));
        assert!(matches!(normalize_path("/").unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn normalizes_unambiguous_forms() {
        assert_eq!(ok("/v1/%75sers"), "/v1/users");
        assert_eq!(ok("/v1//users"), "/v1/users");
        assert_eq!(ok("/v1/users/"), "/v1/users");
        assert_eq!(ok("//"), "/");
        assert_eq!(ok("/v1/files/a%20b"), "/v1/files/a%20b");
        assert_eq!(ok("/v1/files/a%3ab"), "/v1/files/a%3Ab");
        assert_eq!(ok("/v1/files/%C3%A9"), "/v1/files/%C3%A9");
        assert_eq!(ok("/v1/files/a.b..c"), "/v1/files/a.b..c");
    }

    #[test]
    fn rejects_ambiguous_forms() {
        for raw in [
            "v1/users",
            "/v1/users%2Fx",
            "/v1/users%2fx",
            "/v1/%2e%2e/keys",
            "/v1/%2E/keys",
            "/v1/./users",
            "/v1/../users",
            "/v1/users/..",
            "/v1\\users",
            "/v1/users%5Cx",
            "/v1/users;x=1",
            "/v1/users%00",
            "/v1/users\0",
            "/v1/users%0a",
            "/v1/users%7f",
            "/v1/%252e%252e/keys",
            "/v1/%C0%AE%C0%AE/keys",
            "/v1/%C3",
            "/v1/%E2%82",
            "/v1/%ZZ",
            "/v1/%4",
            "/v1/us ers",
        ] {
            assert!(rejected(raw), "{raw:?} should be rejected");
        }
    }
}
