//! The byte layout of `active.json` that lets a run change its one record in place,
//! while the file stays one valid JSON document that any reader can parse:
//!
//! ```text
//! {"version":1,"layout":"chan-run-slots-2","epoch":"…","channels":{   <spaces to 512·n - 1>\n
//!  "discord:1":{"session_id":"…","runs":3,…}                          <spaces to 4096>\n
//! ,"slack:C01":{…}                                                    <spaces to the slot end>\n
//!                                                                     <a filler: spaces>\n
//! }}
//! ```
//!
//! Each record is one line, a *slot* of 512·2^k bytes (at most 4 KiB) aligned to its own
//! size, so a slot never straddles a memory page and a killed process cannot leave one
//! half written; a record that would need more is refused. The first member's slot is
//! always 4 KiB, so it never outgrows its place. The first member's separator is a
//! space, every later one's a comma; fillers are all spaces, and JSON allows whitespace
//! between tokens, so padding and fillers are invisible to readers. A key may appear on
//! more than one line (the first member line may be the placeholder `"K":{}` of a key
//! that appears again further on, and a run killed mid-move leaves an older copy): the
//! line furthest into the file is the record, for chan-run as for any JSON reader (the
//! last of duplicate keys wins). `epoch` names this file's version of the layout for
//! the index (`active.idx`): a file rewritten whole gets a new one.
//!
//! Layout 1 (before the index: no epoch, no placeholders, slots up to 64 KiB) is read as
//! this one; a chan-run that knows only layout 1 reads this one as plain JSON (last key
//! wins) and converts it, so mixing versions loses nothing.

use crate::state::{ChannelRecord, VERSION};
use serde_json::{Map, Value};

pub const UNIT: u64 = 512;
/// The biggest slot: one page.
pub const MAX_SLOT: u64 = 4096;
/// The biggest slot a file written by an earlier chan-run may hold (read, then moved).
pub const MAX_OLD_SLOT: u64 = 64 * 1024;
pub const LAYOUT: &str = "chan-run-slots-2";
/// The layout before the index, read as this one.
const OLD_LAYOUT: &str = "chan-run-slots-1";
pub const TRAILER: &[u8] = b"}}\n";
/// Room left in a new slot, so a record that grows a little still fits in place.
const HEADROOM: usize = 96;

/// The header line, padded to a multiple of `UNIT`.
pub fn header(epoch: u64, extras: &Map<String, Value>) -> Vec<u8> {
    let mut line = format!(r#"{{"version":{VERSION},"layout":"{LAYOUT}","epoch":"{epoch:016x}","#);
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
    /// 0 for a file written before epochs.
    pub epoch: u64,
    pub extras: Map<String, Value>,
}

/// Parses the first line of the file if it is a header of this layout. `None` means
/// "not this layout" (another writer's JSON, or damage): the caller parses it whole.
pub fn parse_header(start: &[u8]) -> Option<Header> {
    // The header is padded with spaces to 4 KiB: its newline is found with memchr, and
    // padding that is all spaces after the line's last `{` is cut with `spaces`, rather
    // than byte by byte and char by char (~20k instructions of every read). Spaces are
    // whitespace to `trim_end` and valid UTF-8, so the line is the same as trimming the
    // whole; any other padding takes that slower way.
    let end = find(b'\n', start)?;
    let len = end as u64 + 1;
    if !len.is_multiple_of(UNIT) {
        return None;
    }
    let line = match rfind(b'{', &start[..end]) {
        Some(at) if spaces(&start[at + 1..end]) => std::str::from_utf8(&start[..=at]).ok()?,
        _ => std::str::from_utf8(&start[..end]).ok()?.trim_end(),
    };
    let open = line.strip_suffix(r#""channels":{"#)?;
    let mut object: Map<String, Value> = serde_json::from_str(&format!(r#"{open}"channels":{{}}}}"#)).ok()?;
    if ![LAYOUT, OLD_LAYOUT].contains(&object.get("layout")?.as_str()?) {
        return None;
    }
    let version = object.get("version")?.as_u64()?;
    let epoch = match object.get("epoch") {
        None => 0,
        Some(e) => u64::from_str_radix(e.as_str()?, 16).ok()?,
    };
    for key in ["version", "layout", "epoch", "channels"] {
        object.remove(key);
    }
    Some(Header { len, version, epoch, extras: object })
}

/// What one slot line (with its newline) holds.
#[derive(Debug, PartialEq)]
pub enum Slot {
    Filler,
    /// A member line; `first` when its separator is the first member's space.
    Member {
        name: String,
        record: Box<ChannelRecord>,
        first: bool,
    },
    Bad,
}

pub fn parse_slot(line: &[u8]) -> Slot {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    // A member ends at its last `}`; everything after it must be padding. (Found from the
    // end with memchr, as a 4 KiB slot is mostly spaces.)
    let Some(end) = rfind(b'}', line).map(|i| i + 1) else {
        return if spaces(line) { Slot::Filler } else { Slot::Bad };
    };
    if !spaces(&line[end..]) {
        return Slot::Bad;
    }
    let Ok(text) = std::str::from_utf8(&line[..end]) else { return Slot::Bad };
    let first = text.starts_with(' ');
    let Some(body) = text.strip_prefix([' ', ',']) else { return Slot::Bad };
    // Straight into the record type, with no intermediate `Value` tree.
    let Ok(map) =
        serde_json::from_str::<std::collections::BTreeMap<String, ChannelRecord>>(&format!("{{{body}}}"))
    else {
        return Slot::Bad;
    };
    let mut entries = map.into_iter();
    match (entries.next(), entries.next()) {
        (Some((name, record)), None) => Slot::Member { name, record: Box::new(record), first },
        _ => Slot::Bad,
    }
}

/// Whether `bytes` are all spaces, eight at a time: the differences are or-ed together
/// with no early exit, which the compiler turns into SIMD (a slot's padding is ~4 KiB).
/// Whether `a` and `b` hold the same bytes: as `a == b`, but eight bytes at a time
/// with no early exit, which the compiler turns into vector instructions. A 4 KiB slot
/// compared with musl's byte-at-a-time `memcmp` (the static build's libc) cost ~28k
/// instructions of every run; this is ~1k.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (x, y) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = x.remainder() == y.remainder();
    let word = |c: &[u8]| u64::from_ne_bytes(c.try_into().expect("8 bytes"));
    tail && x.zip(y).fold(0, |acc, (p, q)| acc | (word(p) ^ word(q))) == 0
}

fn spaces(bytes: &[u8]) -> bool {
    const EIGHT: u64 = u64::from_ne_bytes([b' '; 8]);
    let chunks = bytes.chunks_exact(8);
    let rest = chunks.remainder();
    let diff = chunks.fold(0, |acc, c| acc | (u64::from_ne_bytes(c.try_into().expect("8 bytes")) ^ EIGHT));
    diff == 0 && rest.iter().all(|&b| b == b' ')
}

/// The key of a member line, if at least that much of it is readable.
pub fn key_of(line: &[u8]) -> Option<String> {
    serde_json::Deserializer::from_slice(line.get(1..)?).into_iter::<String>().next()?.ok()
}

/// `"name":` as a member line spells it after its separator.
pub fn key_prefix(name: &str) -> Vec<u8> {
    let mut key = serde_json::to_vec(name).expect("a string serializes");
    key.push(b':');
    key
}

/// The slot line for a record: separator, member, padding to `size`, newline.
pub fn slot(first: bool, name: &str, record: &ChannelRecord, size: u64) -> Vec<u8> {
    pad(member(first, name, record), size)
}

/// The placeholder that keeps the first member line valid JSON when its record goes:
/// `"name":{}` for a key that appears again further on.
pub fn placeholder(name: &str, size: u64) -> Vec<u8> {
    let mut out = vec![b' '];
    out.extend(key_prefix(name));
    out.extend(b"{}");
    pad(out, size)
}

/// The member text alone (separator included), to size its slot.
pub fn member(first: bool, name: &str, record: &ChannelRecord) -> Vec<u8> {
    let mut out = vec![if first { b' ' } else { b',' }];
    out.extend(key_prefix(name));
    out.extend(serde_json::to_vec(record).expect("a record serializes"));
    out
}

/// The slot size for `member_len` bytes with headroom (the first member's is always
/// `MAX_SLOT`); `None` if no slot can hold it.
pub fn size_for(member_len: usize, first: bool) -> Option<u64> {
    if !fits(member_len, MAX_SLOT) {
        return None;
    }
    if first {
        return Some(MAX_SLOT);
    }
    let need = (member_len + 2 + HEADROOM) as u64;
    let mut size = UNIT;
    while size < need && size < MAX_SLOT {
        size *= 2;
    }
    Some(size)
}

/// Whether `member_len` bytes fit a slot of `size` with at least one space of padding
/// and the newline (so only the trailer line ever ends in `}}`).
pub fn fits(member_len: usize, size: u64) -> bool {
    (member_len as u64) + 2 <= size
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

/// The first `byte` in `haystack`. memchr's portable word-at-a-time search rather than
/// its default entry point, whose first call asks the CPU for its features (7 `cpuid`
/// instructions, each a trap to the hypervisor in a VM: ~35 µs of every run measured
/// here, more than the search saves on a 4 KiB slot).
pub fn find(byte: u8, haystack: &[u8]) -> Option<usize> {
    memchr::arch::all::memchr::One::new(byte).find(haystack)
}

/// The last `byte` in `haystack` (see `find`).
pub fn rfind(byte: u8, haystack: &[u8]) -> Option<usize> {
    memchr::arch::all::memchr::One::new(byte).rfind(haystack)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_compares_every_byte() {
        let a: Vec<u8> = (0..4099u32).map(|i| (i % 251) as u8).collect();
        assert!(same(&a, &a.clone()));
        assert!(same(b"", b""));
        assert!(!same(&a, &a[..4098]));
        for at in [0, 7, 8, 2048, 4095, 4096, 4098] {
            let mut b = a.clone();
            b[at] ^= 0x20;
            assert!(!same(&a, &b), "byte {at}");
        }
    }

    #[test]
    fn find_and_rfind_agree_with_a_plain_search() {
        let hay = b"ab\ncd\nef";
        assert_eq!(find(b'\n', hay), Some(2));
        assert_eq!(rfind(b'\n', hay), Some(5));
        assert_eq!(find(b'x', hay), None);
        assert_eq!(rfind(b'x', b""), None);
    }

    fn record(runs: u64) -> ChannelRecord {
        ChannelRecord { runs, session_id: Some("s-1".into()), ..Default::default() }
    }

    #[test]
    fn a_laid_out_file_is_plain_json() {
        let mut extras = Map::new();
        extras.insert("by".into(), Value::from("someone"));
        let mut file = header(0xabc, &extras);
        assert_eq!(file.len() as u64 % UNIT, 0);
        file.extend(placeholder("c", 4096));
        file.extend(slot(false, "a\"b", &record(1), 512));
        file.extend(filler(512));
        file.extend(slot(false, "c", &record(2), 1024));
        file.extend(TRAILER);
        let v: Value = serde_json::from_slice(&file).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["by"], "someone");
        assert_eq!(v["channels"]["a\"b"]["runs"], 1);
        assert_eq!(v["channels"]["c"]["runs"], 2, "the last copy of a key wins");
        let h = parse_header(&file).unwrap();
        assert_eq!((h.len, h.version, h.epoch, h.extras), (512, 1, 0xabc, extras));
    }

    #[test]
    fn slots_parse_back() {
        let line = slot(false, "chan", &record(7), 512);
        assert_eq!(line.len(), 512);
        let member = Slot::Member { name: "chan".into(), record: Box::new(record(7)), first: false };
        assert_eq!(parse_slot(&line), member);
        assert_eq!(parse_slot(&filler(512)), Slot::Filler);
        assert_eq!(parse_slot(&line[..40]), Slot::Bad);
        assert_eq!(parse_slot(b"garbage\n"), Slot::Bad);
        assert_eq!(parse_slot(b" \"a\":{},\"b\":{}\n"), Slot::Bad);
        let hold = Slot::Member { name: "k".into(), record: Box::default(), first: true };
        assert_eq!(parse_slot(&placeholder("k", 4096)), hold);
        assert_eq!(key_of(&line).as_deref(), Some("chan"));
    }

    #[test]
    fn sizes_and_alignment() {
        assert_eq!(size_for(10, false), Some(512));
        assert_eq!(size_for(10, true), Some(4096));
        assert_eq!(size_for(500, false), Some(1024));
        assert_eq!(size_for(4094, false), Some(4096));
        assert_eq!(size_for(4095, false), None);
        assert!(fits(510, 512) && !fits(511, 512));
        assert_eq!((align(512, 1024), align(1024, 1024), align(1536, 512)), (1024, 1024, 1536));
        assert_eq!(fillers(512, 1536).len(), 1024);
    }

    #[test]
    fn foreign_json_is_not_taken_for_this_layout() {
        assert_eq!(parse_header(b"{}\n"), None);
        assert_eq!(parse_header(b"{\n  \"version\": 1,\n"), None);
        let mut other = header(1, &Map::new());
        let at = other.iter().position(|&b| b == b'\n').unwrap();
        other.insert(at, b' '); // no longer a multiple of UNIT
        assert_eq!(parse_header(&other), None);
    }
}
