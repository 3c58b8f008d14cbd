//! Channel names and their file names. A name is 1 to 256 bytes of UTF-8 without
//! control characters, compared as bytes. Its file stem is an injective encoding in
//! `[a-z0-9._~-]` (no uppercase, so case-insensitive filesystems cannot merge two
//! channels; no `/`, and never `.` or `..`), shortened by a SHA-256 suffix when long:
//! a shortened stem holds `~`, which the plain encoding never produces, and the full
//! name is stored in the lock file and checked, so even a collision cannot merge two.

use sha2::{Digest, Sha256};
use std::fmt;

pub const MAX_NAME_BYTES: usize = 256;
/// Longest stem; leaves room under the 255-byte name limit for suffixes (`.lock`).
const MAX_STEM: usize = 200;
/// How much of the encoded name a shortened stem keeps before `~` and the hash.
const KEPT_PREFIX: usize = MAX_STEM - 1 - 32;

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Channel {
    name: String,
    stem: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("the channel name is empty; pass a name such as -c discord:1234")]
    Empty,
    #[error("the channel name is {0} bytes long; the limit is {MAX_NAME_BYTES} bytes")]
    TooLong(usize),
    #[error("the channel name has a control character ({0}) at byte {1}; names are printable text")]
    Control(String, usize),
}

impl Channel {
    pub fn new(name: &str) -> Result<Channel, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(NameError::TooLong(name.len()));
        }
        if let Some((at, ch)) = name.char_indices().find(|(_, c)| c.is_control()) {
            return Err(NameError::Control(format!("U+{:04X}", ch as u32), at));
        }
        Ok(Channel { name: name.to_owned(), stem: stem_of(name) })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file-name stem shared by this channel's lock file and queue folder.
    pub fn stem(&self) -> &str {
        &self.stem
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Channel({:?})", self.name)
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

fn stem_of(name: &str) -> String {
    let mut stem = String::with_capacity(name.len());
    for (i, b) in name.bytes().enumerate() {
        let literal = b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (b == b'.' && i > 0);
        if literal {
            stem.push(b as char);
        } else {
            stem.push('_');
            stem.push(char::from(HEX[usize::from(b >> 4)]));
            stem.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
    if stem.len() <= MAX_STEM {
        return stem;
    }
    // Cut at an escape boundary so the kept prefix is itself a valid encoding.
    let mut cut = KEPT_PREFIX;
    while stem.as_bytes()[cut - 1] == b'_' || (cut >= 2 && stem.as_bytes()[cut - 2] == b'_') {
        cut -= 1;
    }
    let digest = Sha256::digest(name.as_bytes());
    let mut short = stem[..cut].to_owned();
    short.push('~');
    for b in &digest[..16] {
        short.push(char::from(HEX[usize::from(b >> 4)]));
        short.push(char::from(HEX[usize::from(b & 15)]));
    }
    short
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn stem(name: &str) -> String {
        Channel::new(name).unwrap().stem().to_owned()
    }

    #[test]
    fn readable_and_safe() {
        assert_eq!(stem("discord:1234"), "discord_3a1234");
        assert_eq!(stem("a/b"), "a_2fb");
        assert_eq!(stem("a_b"), "a_5fb");
        assert_eq!(stem(".."), "_2e.");
        assert_eq!(stem("../x"), "_2e._2fx");
        assert_eq!(stem("A"), "_41");
        assert_eq!(stem("é"), "_c3_a9");
    }

    #[test]
    fn distinct_names_distinct_stems_even_case_folded() {
        let names = ["a", "A", "a/b", "a_b", "a_2fb", "x.", ".x", "é", "e\u{301}", "~", "_7e"];
        let stems: HashSet<String> = names.iter().map(|n| stem(n).to_lowercase()).collect();
        assert_eq!(stems.len(), names.len());
    }

    #[test]
    fn long_names_are_bounded_and_distinct() {
        let a = "Ä".repeat(128); // 256 bytes, 768 encoded
        let b = format!("{}Ö", "Ä".repeat(127));
        for name in [&a, &b] {
            let s = stem(name);
            assert!(s.len() <= MAX_STEM, "{}", s.len());
            assert!(s.contains('~'));
            assert!(s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.~-".contains(&c)));
        }
        assert_ne!(stem(&a), stem(&b));
        let just_fits = "x".repeat(MAX_STEM);
        assert_eq!(stem(&just_fits), just_fits);
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(Channel::new(""), Err(NameError::Empty));
        assert_eq!(Channel::new(&"x".repeat(257)), Err(NameError::TooLong(257)));
        assert!(Channel::new(&"x".repeat(256)).is_ok());
        for bad in ["a\nb", "tab\t", "\u{7f}", "\u{85}", "\0"] {
            assert!(matches!(Channel::new(bad), Err(NameError::Control(..))), "{bad:?}");
        }
    }
}
