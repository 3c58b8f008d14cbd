//! Finding the session id in the command's output (SPEC item 7): the kept tail of
//! stdout is parsed as one JSON document when it is the whole output, otherwise (or if
//! that fails) its last non-empty line is (JSON Lines). The id is the string at the
//! `--session-key` JSON pointer, unless that document says `"is_error": true`.
//!
//! An id is passed to the next command as an argument, so it is trusted no further
//! than an argument can be: one that starts with `-` (a CLI whose flag value is
//! optional would read it as a flag), holds a control character, or is longer than
//! [`MAX_ID_BYTES`] is refused, with a reason the run's record keeps.

use serde_json::Value;

/// The longest id chan-run will store and pass on as an argument.
pub const MAX_ID_BYTES: usize = 1024;

/// What the command's output says about the session.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// No id there (or an error result): the stored one is kept.
    Nothing,
    Id(String),
    /// An id chan-run will not pass on: why.
    Refused(String),
}

pub fn find(tail: &[u8], whole: bool, pointer: &str) -> Found {
    let Some(doc) = last_document(tail, whole) else { return Found::Nothing };
    if doc.get("is_error") == Some(&Value::Bool(true)) {
        return Found::Nothing;
    }
    match doc.pointer(pointer).and_then(Value::as_str) {
        None | Some("") => Found::Nothing,
        Some(id) => match refusal(id) {
            None => Found::Id(id.to_owned()),
            Some(why) => Found::Refused(why),
        },
    }
}

/// The output's last JSON document: the kept tail as one document when it is the whole
/// output, otherwise (or if that fails) its last non-empty line.
pub fn last_document(tail: &[u8], whole: bool) -> Option<Value> {
    whole.then(|| json(tail)).flatten().or_else(|| json(last_line(tail)?))
}

/// `bytes` as one JSON document, if they are one. Output that cannot begin a JSON value
/// (nothing, blank lines, plain text) is turned away before the parser sees it: the
/// parser's error for it would ask memchr for the error's line number, and memchr's
/// first call probes the CPU's features (7 `cpuid` instructions, each a trap to the
/// hypervisor in a VM: ~35 µs, measured with callgrind and perf on a run of `true`).
pub fn json(bytes: &[u8]) -> Option<Value> {
    let first = *bytes.trim_ascii_start().first()?;
    let can_begin = matches!(first, b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n');
    can_begin.then(|| serde_json::from_slice(bytes).ok()).flatten()
}

/// Why `id` cannot be passed on as an argument, if it cannot.
pub fn refusal(id: &str) -> Option<String> {
    if id.len() > MAX_ID_BYTES {
        return Some(format!("it is {} bytes long; the most chan-run passes on is {MAX_ID_BYTES}", id.len()));
    }
    if id.starts_with('-') {
        return Some("it starts with '-', which a command may read as a flag".to_owned());
    }
    if let Some(c) = id.chars().find(|&c| c.is_control() || c == '\u{2028}' || c == '\u{2029}') {
        return Some(format!("it holds the control character U+{:04X}", c as u32));
    }
    None
}

fn last_line(tail: &[u8]) -> Option<&[u8]> {
    tail.split(|&b| b == b'\n').rev().find(|line| !line.trim_ascii().is_empty())
}

/// `--session-key` must be an RFC 6901 pointer: empty, or starting with `/`.
pub fn parse_pointer(text: &str) -> Result<String, String> {
    if text.is_empty() || text.starts_with('/') {
        Ok(text.to_owned())
    } else {
        Err(format!("'{text}' is not a JSON pointer; write it as /session_id or /result/session"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/session_id";

    #[test]
    fn only_what_can_begin_a_json_value_is_parsed() {
        assert_eq!(json(b""), None);
        assert_eq!(json(b" \n\t\n"), None);
        assert_eq!(json(b"Hello, world\n"), None);
        assert_eq!(json(b"{\"a\":1"), None); // begins as JSON, is not
        assert_eq!(json(b" {\"a\":1}\n"), Some(serde_json::json!({"a": 1})));
        for doc in ["[1]", "\"s\"", "-1", "0", "true", "false", "null"] {
            assert!(json(doc.as_bytes()).is_some(), "{doc}");
        }
    }

    fn id(s: &str) -> Found {
        Found::Id(s.to_owned())
    }

    #[test]
    fn whole_document_pretty_printed() {
        let out = b"{\n  \"result\": \"hi\",\n  \"session_id\": \"abc\"\n}\n";
        assert_eq!(find(out, true, P), id("abc"));
    }

    #[test]
    fn json_lines_take_the_last_non_empty_line() {
        let out =
            b"{\"type\":\"init\",\"session_id\":\"old\"}\n{\"type\":\"result\",\"session_id\":\"new\"}\n\n";
        assert_eq!(find(out, true, P), id("new"));
        // Cut at the front (not whole): the last line still decides.
        assert_eq!(find(&out[10..], false, P), id("new"));
    }

    #[test]
    fn errors_and_non_json_give_nothing() {
        assert_eq!(find(b"{\"is_error\":true,\"session_id\":\"x\"}", true, P), Found::Nothing);
        assert_eq!(find(b"plain text\n", true, P), Found::Nothing);
        assert_eq!(find(b"{\"session_id\":42}", true, P), Found::Nothing);
        assert_eq!(find(b"{\"session_id\":\"\"}", true, P), Found::Nothing);
        assert_eq!(find(b"", true, P), Found::Nothing);
    }

    #[test]
    fn ids_that_an_argument_cannot_carry_safely_are_refused() {
        let refused = |out: &str| matches!(find(out.as_bytes(), true, P), Found::Refused(_));
        assert!(refused(r#"{"session_id":"--dangerously-skip-permissions"}"#));
        assert!(refused(r#"{"session_id":"a\nb"}"#));
        assert!(refused(r#"{"session_id":"a\u0007"}"#));
        assert!(refused(&format!(r#"{{"session_id":"{}"}}"#, "x".repeat(MAX_ID_BYTES + 1))));
        assert_eq!(
            find(format!(r#"{{"session_id":"{}"}}"#, "x".repeat(MAX_ID_BYTES)).as_bytes(), true, P),
            id(&"x".repeat(MAX_ID_BYTES))
        );
        assert_eq!(find(r#"{"session_id":"a-b é"}"#.as_bytes(), true, P), id("a-b é"));
    }

    #[test]
    fn custom_pointer() {
        let out = br#"{"meta":{"conv/id":"c-1"}}"#;
        assert_eq!(find(out, true, "/meta/conv~1id"), id("c-1"));
        assert!(parse_pointer("session_id").is_err());
        assert!(parse_pointer("/a/b").is_ok());
    }
}
