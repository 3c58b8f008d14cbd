//! The byte layout of `active.json` that lets a run change its one record in place,
//! while the file stays one valid JSON document that any reader can parse:
//!
//! ```text
//! {"version":1,"layout":"chan-run-slots-1","channels":{      <spaces to 512·n - 1>\n
//!  "discord:1":{"session_id":"…","runs":3,…}                 <spaces to the slot end>\n
//! ,"slack:C01":{…}                                           <spaces>\n
//!                                                            <a filler slot: spaces>\n
//! }}
//! ```
//!
//! Each record is one line, a *slot* of 512·2^k bytes aligned to its own size, so a slot
//! of up to 4 KiB never straddles a page (a killed process cannot leave it half written)
//! and a 512-byte one is a single disk sector. The first member's separator is a space,
//! every later one's a comma; fillers are all spaces. JSON allows whitespace between
//! tokens, so padding and fillers are invisible to readers.

use crate::state::{ChannelRecord, VERSION};
use serde_json::{Map, Value};

pub const UNIT: u64 = 512;
/// The biggest slot; a record that needs more is refused.
pub const MAX_SLOT: u64 = 64 * 1024;
pub const LAYOUT: &str = "chan-run-slots-1";
pub const TRAILER: &[u8] = b"}}\n";
/// Room left in a new slot, so a record that grows a little still fits in place.
const HEADROOM: usize = 96;

/// The header line, padded to a multiple of `UNIT`.
pub fn header(extras: &Map<String, Value>) -> Vec<u8> {
    let mut line = format!(r#"{{"version":{VERSION},"layout":"{LAYOUT}","#);
    for (key, value) in extras {
        line.push_str(&format!("{}:{},", Value::String(key.clone()), value));
    }
    line.push_str(r#""channels":{"#);
    pad(line.into_bytes(), UNIT)
}

#[derive(Debug, PartialEq)]
pub struct Header {
    pub len: u64,
    pub version: u64,
    pub extras: Map<String, Value>,
}

/// Parses the first line of the file if it is a header of this layout. `None` means
/// "not this layout" (another writer's JSON, or damage): the caller parses it whole.
pub fn parse_header(start: &[u8]) -> Option<Header> {
    let end = start.iter().position(|&b| b == b'\n')?;
    let len = end as u64 + 1;
    if !len.is_multiple_of(UNIT) {
        return None;
    }
    let line = std::str::from_utf8(&start[..end]).ok()?.trim_end();
    let open = line.strip_suffix(r#""channels":{"#)?;
    let mut object: Map<String, Value> = serde_json::from_str(&format!(r#"{open}"channels":{{}}}}"#)).ok()?;
    if object.get("layout")?.as_str()? != LAYOUT {
        return None;
    }
    let version = object.get("version")?.as_u64()?;
    for key in ["version", "layout", "channels"] {
        object.remove(key);
    }
    Some(Header { len, version, extras: object })
}

/// What one slot line (with its newline) holds.
#[derive(Debug, PartialEq)]
pub enum Slot {
    Filler,
    Member { name: String, record: Box<ChannelRecord> },
    Bad,
}

pub fn parse_slot(line: &[u8]) -> Slot {
    let text = match std::str::from_utf8(line) {
        Ok(t) => t.trim_end_matches(['\n', ' ']),
        Err(_) => return Slot::Bad,
    };
    if text.is_empty() {
        return Slot::Filler;
    }
    let Some(body) = text.strip_prefix([' ', ',']) else { return Slot::Bad };
    // Straight into the record type, with no intermediate `Value` tree.
    let Ok(map) =
        serde_json::from_str::<std::collections::BTreeMap<String, ChannelRecord>>(&format!("{{{body}}}"))
    else {
        return Slot::Bad;
    };
    let mut entries = map.into_iter();
    match (entries.next(), entries.next()) {
        (Some((name, record)), None) => Slot::Member { name, record: Box::new(record) },
        _ => Slot::Bad,
    }
}

/// A cheap check of a slot line's shape, short of parsing it: a filler, or a separator,
/// a key, and a closing brace before the padding.
pub fn looks_whole(line: &[u8]) -> bool {
    let body = line.strip_suffix(b"\n").unwrap_or(line).trim_ascii_end();
    body.is_empty() || (matches!(body, [b' ' | b',', b'"', .., b'}']) && std::str::from_utf8(body).is_ok())
}

/// The key of a member line, if at least that much of it is readable.
pub fn key_of(line: &[u8]) -> Option<String> {
    serde_json::Deserializer::from_slice(line.get(1..)?).into_iter::<String>().next()?.ok()
}

/// The slot line for a record: separator, member, padding to `size`, newline.
pub fn slot(first: bool, name: &str, record: &ChannelRecord, size: u64) -> Vec<u8> {
    pad(member(first, name, record), size)
}

/// The member text alone (separator included), to size its slot.
pub fn member(first: bool, name: &str, record: &ChannelRecord) -> Vec<u8> {
    let mut out = vec![if first { b' ' } else { b',' }];
    out.extend(serde_json::to_vec(name).expect("a string serializes"));
    out.push(b':');
    out.extend(serde_json::to_vec(record).expect("a record serializes"));
    out
}

/// The smallest slot size that holds `member_len` bytes with headroom.
pub fn size_for(member_len: usize) -> Option<u64> {
    let need = (member_len + 1 + HEADROOM) as u64;
    let mut size = UNIT;
    while size < need {
        size *= 2;
    }
    (size <= MAX_SLOT).then_some(size)
}

/// Whether `member_len` bytes fit a slot of `size` (with its newline).
pub fn fits(member_len: usize, size: u64) -> bool {
    (member_len as u64) < size
}

pub fn filler(size: u64) -> Vec<u8> {
    pad(Vec::new(), size)
}

/// `offset` rounded up to a multiple of `size`.
pub fn align(offset: u64, size: u64) -> u64 {
    offset.div_ceil(size) * size
}

/// Filler lines from `from` up to `to` (both multiples of `UNIT`).
pub fn fillers(from: u64, to: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((to - from) as usize);
    for _ in 0..(to - from) / UNIT {
        out.extend(filler(UNIT));
    }
    out
}

/// Pads `bytes` with spaces to the next multiple of `unit`, ending in a newline.
fn pad(mut bytes: Vec<u8>, unit: u64) -> Vec<u8> {
    let total = align(bytes.len() as u64 + 1, unit) as usize;
    bytes.resize(total - 1, b' ');
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(runs: u64) -> ChannelRecord {
        ChannelRecord { runs, session_id: Some("s-1".into()), ..Default::default() }
    }

    #[test]
    fn a_laid_out_file_is_plain_json() {
        let mut extras = Map::new();
        extras.insert("by".into(), Value::from("someone"));
        let mut file = header(&extras);
        assert_eq!(file.len() as u64 % UNIT, 0);
        file.extend(slot(true, "a\"b", &record(1), 512));
        file.extend(filler(512));
        file.extend(slot(false, "c", &record(2), 1024));
        file.extend(TRAILER);
        let v: Value = serde_json::from_slice(&file).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["by"], "someone");
        assert_eq!(v["channels"]["a\"b"]["runs"], 1);
        assert_eq!(v["channels"]["c"]["runs"], 2);
        let h = parse_header(&file).unwrap();
        assert_eq!((h.len, h.version, h.extras), (512, 1, extras));
    }

    #[test]
    fn slots_parse_back() {
        let line = slot(false, "chan", &record(7), 512);
        assert_eq!(line.len(), 512);
        assert_eq!(parse_slot(&line), Slot::Member { name: "chan".into(), record: Box::new(record(7)) });
        assert_eq!(parse_slot(&filler(512)), Slot::Filler);
        assert_eq!(parse_slot(&line[..40]), Slot::Bad);
        assert_eq!(parse_slot(b"garbage\n"), Slot::Bad);
        assert_eq!(parse_slot(b" \"a\":{},\"b\":{}\n"), Slot::Bad);
        assert!(looks_whole(&line) && looks_whole(&filler(512)));
        assert!(!looks_whole(&line[..40]) && !looks_whole(b"garbage\n"));
    }

    #[test]
    fn sizes_and_alignment() {
        assert_eq!(size_for(10), Some(512));
        assert_eq!(size_for(500), Some(1024));
        assert_eq!(size_for(70_000), None);
        assert!(fits(511, 512) && !fits(512, 512));
        assert_eq!((align(512, 1024), align(1024, 1024), align(1536, 512)), (1024, 1024, 1536));
        assert_eq!(fillers(512, 1536).len(), 1024);
    }

    #[test]
    fn foreign_json_is_not_taken_for_this_layout() {
        assert_eq!(parse_header(b"{}\n"), None);
        assert_eq!(parse_header(b"{\n  \"version\": 1,\n"), None);
        let mut other = header(&Map::new());
        let at = other.iter().position(|&b| b == b'\n').unwrap();
        other.insert(at, b' '); // no longer a multiple of UNIT
        assert_eq!(parse_header(&other), None);
    }
}
