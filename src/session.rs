//! Finding the session id in the command's output (SPEC item 7): the kept tail of
//! stdout is parsed as one JSON document when it is the whole output, otherwise (or if
//! that fails) its last non-empty line is (JSON Lines). The id is the string at the
//! `--session-key` JSON pointer, unless that document says `"is_error": true`.

use serde_json::Value;

/// The longest id chan-run will store and pass on as an argument.
const MAX_ID_BYTES: usize = 1024;

pub fn find(tail: &[u8], whole: bool, pointer: &str) -> Option<String> {
    let doc = whole
        .then(|| serde_json::from_slice::<Value>(tail).ok())
        .flatten()
        .or_else(|| serde_json::from_slice(last_line(tail)?).ok())?;
    if doc.get("is_error") == Some(&Value::Bool(true)) {
        return None;
    }
    let id = doc.pointer(pointer)?.as_str()?;
    let usable = !id.is_empty() && id.len() <= MAX_ID_BYTES && !id.chars().any(char::is_control);
    usable.then(|| id.to_owned())
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
    fn whole_document_pretty_printed() {
        let out = b"{\n  \"result\": \"hi\",\n  \"session_id\": \"abc\"\n}\n";
        assert_eq!(find(out, true, P).as_deref(), Some("abc"));
    }

    #[test]
    fn json_lines_take_the_last_non_empty_line() {
        let out =
            b"{\"type\":\"init\",\"session_id\":\"old\"}\n{\"type\":\"result\",\"session_id\":\"new\"}\n\n";
        assert_eq!(find(out, true, P).as_deref(), Some("new"));
        // Cut at the front (not whole): the last line still decides.
        assert_eq!(find(&out[10..], false, P).as_deref(), Some("new"));
    }

    #[test]
    fn errors_and_non_json_give_nothing() {
        assert_eq!(find(b"{\"is_error\":true,\"session_id\":\"x\"}", true, P), None);
        assert_eq!(find(b"plain text\n", true, P), None);
        assert_eq!(find(b"{\"session_id\":42}", true, P), None);
        assert_eq!(find(b"{\"session_id\":\"\"}", true, P), None);
        assert_eq!(find(b"", true, P), None);
    }

    #[test]
    fn custom_pointer() {
        let out = br#"{"meta":{"conv/id":"c-1"}}"#;
        assert_eq!(find(out, true, "/meta/conv~1id").as_deref(), Some("c-1"));
        assert!(parse_pointer("session_id").is_err());
        assert!(parse_pointer("/a/b").is_ok());
    }
}
