//! `active.idx`: where each channel's lines are in `active.json`, so that finding a
//! record (a new channel's absence included) costs a few reads whatever the file's
//! size. Its `flock` is the *append lock*: every change of `active.json`'s structure
//! (a line added, moved, removed, the end moved) and every change of the index is made
//! holding it; lookups without it are hints, checked against the line they name.
//!
//! Binary, little-endian: a 64-byte header (magic, the `epoch` of the `active.json` it
//! indexes, the offset of that file's closing `}}`, the table's capacity and use, a
//! "being rewritten" flag, a count of rewrites) and an open-addressing table of 16-byte entries (FNV-1a hash
//! of the name, never 0; the line's offset, or `u64::MAX` once removed). An entry is
//! written before the line it names (and synced), so the index never misses a line; it
//! may name lines that are gone, which a lookup skips. A table rewritten in place (to
//! grow, or to rebuild from `active.json`) is flagged first: killed midway, the next
//! holder of the append lock sees the flag and rebuilds it. A lookup without the append
//! lock reads the header before and after: if neither was flagged and no rewrite came
//! between, no entry it needed moved (entries only fill empty places), so even its
//! "absent" holds for the channel whose holder asks (nobody else adds its lines).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

pub const NAME: &str = "active.idx";
const MAGIC: &[u8; 8] = b"CRIDX\x00\x00\x01";
const HEADER: u64 = 64;
const ENTRY: u64 = 16;
const FIRST_CAP: u64 = 1024;
const GONE: u64 = u64::MAX;

/// The index, opened read-write under the append lock (its own `flock`).
pub struct Index {
    pub file: File,
    pub head: Head,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Head {
    pub epoch: u64,
    /// Where `active.json`'s closing `}}` starts.
    pub end: u64,
    cap: u64,
    used: u64,
    dirty: bool,
    rewrites: u64,
}

fn hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// Reads the header; `None` if the file is not a whole, clean index.
fn read_head(file: &File) -> Option<Head> {
    let mut buf = [0u8; HEADER as usize];
    file.read_exact_at(&mut buf, 0).ok()?;
    let word = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
    let head = Head {
        epoch: word(8),
        end: word(16),
        cap: word(24),
        used: word(32),
        dirty: word(40) != 0,
        rewrites: word(48),
    };
    let whole = &buf[..8] == MAGIC && head.cap.is_power_of_two() && !head.dirty;
    let len = file.metadata().ok()?.len();
    (whole && len >= HEADER + head.cap * ENTRY).then_some(head)
}

/// The offsets the index names for `name`, valid or not (the caller checks each line).
pub fn lookup(file: &File, head: &Head, name: &str) -> Vec<u64> {
    let h = hash(name);
    let mut found = Vec::new();
    let mut i = h & (head.cap - 1);
    for _ in 0..head.cap {
        let Some((eh, offset)) = entry(file, i) else { break };
        if eh == 0 {
            break;
        }
        if eh == h && offset != GONE {
            found.push(offset);
        }
        i = (i + 1) & (head.cap - 1);
    }
    found
}

fn entry(file: &File, i: u64) -> Option<(u64, u64)> {
    let mut buf = [0u8; ENTRY as usize];
    file.read_exact_at(&mut buf, HEADER + i * ENTRY).ok()?;
    Some((
        u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(buf[8..].try_into().expect("8 bytes")),
    ))
}

/// Without the append lock: the lines the index names for `name`, if the index is
/// whole, describes the file of `epoch`, and was not rewritten while it was read.
pub fn peek(file: &File, epoch: u64, name: &str) -> Option<Vec<u64>> {
    let head = read_head(file).filter(|h| h.epoch == epoch && epoch != 0)?;
    let found = lookup(file, &head, name);
    let after = read_head(file)?;
    (after.rewrites == head.rewrites && after.cap == head.cap).then_some(found)
}

impl Index {
    /// The locked index file as found: `head` is `None`-like (default, `cap` 0) when it
    /// is new, torn or flagged: then it must be rebuilt before use.
    pub fn new(file: File) -> Index {
        let head = read_head(&file).unwrap_or_default();
        Index { file, head }
    }

    /// Whether this index describes the `active.json` of `epoch`.
    pub fn is_for(&self, epoch: u64) -> bool {
        self.head.cap != 0 && self.head.epoch == epoch
    }

    pub fn lookup(&self, name: &str) -> Vec<u64> {
        lookup(&self.file, &self.head, name)
    }

    /// Adds `name` at `offset`, growing the table first when it is three-quarters used.
    /// Not synced: call `sync` before writing the line it names.
    pub fn insert(&mut self, name: &str, offset: u64) -> io::Result<()> {
        if (self.head.used + 1) * 4 > self.head.cap * 3 {
            let live = self.entries()?;
            self.rewrite(self.head.epoch, self.head.end, self.head.cap * 2, live)?;
        }
        let h = hash(name);
        let mut i = h & (self.head.cap - 1);
        loop {
            let (eh, _) = entry(&self.file, i).ok_or_else(|| io::Error::other("the index is cut short"))?;
            if eh == 0 {
                break;
            }
            i = (i + 1) & (self.head.cap - 1);
        }
        self.put(i, h, offset)?;
        self.head.used += 1;
        self.write_head()
    }

    /// Marks `name`'s entry for `offset` as gone.
    pub fn remove(&mut self, name: &str, offset: u64) -> io::Result<()> {
        let h = hash(name);
        let mut i = h & (self.head.cap - 1);
        for _ in 0..self.head.cap {
            let Some((eh, at)) = entry(&self.file, i) else { break };
            if eh == 0 {
                break;
            }
            if eh == h && at == offset {
                return self.put(i, h, GONE);
            }
            i = (i + 1) & (self.head.cap - 1);
        }
        Ok(())
    }

    pub fn set_end(&mut self, end: u64) -> io::Result<()> {
        self.head.end = end;
        self.write_head()
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Replaces the whole index with `lines` (name, offset) of the `active.json` of
    /// `epoch` whose closing `}}` is at `end`; synced.
    pub fn rebuild(&mut self, epoch: u64, end: u64, lines: Vec<(String, u64)>) -> io::Result<()> {
        let live: Vec<(u64, u64)> = lines.into_iter().map(|(name, at)| (hash(&name), at)).collect();
        let mut cap = FIRST_CAP;
        while (live.len() as u64 + 1) * 2 > cap {
            cap *= 2;
        }
        self.rewrite(epoch, end, cap, live)?;
        self.sync()
    }

    /// The live entries (hash, offset).
    fn entries(&self) -> io::Result<Vec<(u64, u64)>> {
        let mut table = vec![0u8; (self.head.cap * ENTRY) as usize];
        self.file.read_exact_at(&mut table, HEADER)?;
        Ok(table
            .chunks_exact(ENTRY as usize)
            .map(|e| {
                (
                    u64::from_le_bytes(e[..8].try_into().expect("8 bytes")),
                    u64::from_le_bytes(e[8..].try_into().expect("8 bytes")),
                )
            })
            .filter(|&(h, at)| h != 0 && at != GONE)
            .collect())
    }

    /// Writes a table of `cap` entries holding `live`, flagged while it is rewritten.
    fn rewrite(&mut self, epoch: u64, end: u64, cap: u64, live: Vec<(u64, u64)>) -> io::Result<()> {
        self.head.dirty = true;
        self.write_head()?;
        self.file.sync_data()?;
        let mut table = vec![0u8; (cap * ENTRY) as usize];
        for (h, at) in &live {
            let mut i = h & (cap - 1);
            while table[(i * ENTRY) as usize..][..8] != [0; 8] {
                i = (i + 1) & (cap - 1);
            }
            let e = &mut table[(i * ENTRY) as usize..][..ENTRY as usize];
            e[..8].copy_from_slice(&h.to_le_bytes());
            e[8..].copy_from_slice(&at.to_le_bytes());
        }
        self.file.set_len(HEADER + cap * ENTRY)?;
        self.file.write_all_at(&table, HEADER)?;
        self.file.sync_data()?;
        let rewrites = self.head.rewrites + 1;
        self.head = Head { epoch, end, cap, used: live.len() as u64, dirty: false, rewrites };
        self.write_head()
    }

    fn put(&self, i: u64, h: u64, offset: u64) -> io::Result<()> {
        let mut e = [0u8; ENTRY as usize];
        e[..8].copy_from_slice(&h.to_le_bytes());
        e[8..].copy_from_slice(&offset.to_le_bytes());
        self.file.write_all_at(&e, HEADER + i * ENTRY)
    }

    fn write_head(&self) -> io::Result<()> {
        let mut buf = [0u8; HEADER as usize];
        buf[..8].copy_from_slice(MAGIC);
        for (i, word) in [
            self.head.epoch,
            self.head.end,
            self.head.cap,
            self.head.used,
            u64::from(self.head.dirty),
            self.head.rewrites,
        ]
        .iter()
        .enumerate()
        {
            buf[8 + i * 8..16 + i * 8].copy_from_slice(&word.to_le_bytes());
        }
        self.file.write_all_at(&buf, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_find_every_copy_across_growth_and_removal() {
        let file = tempfile::tempfile().unwrap();
        let mut index = Index::new(file);
        assert!(!index.is_for(7));
        index.rebuild(7, 4096, vec![("a".into(), 4096), ("b".into(), 8192)]).unwrap();
        assert!(index.is_for(7) && !index.is_for(8));
        for i in 0..2000u64 {
            index.insert(&format!("c{i}"), 10_000 + i * 512).unwrap();
        }
        index.insert("a", 99_999).unwrap();
        assert_eq!(index.lookup("a"), [4096, 99_999]);
        assert_eq!(index.lookup("c1999"), [10_000 + 1999 * 512]);
        assert!(index.lookup("nobody").is_empty());
        index.remove("a", 4096).unwrap();
        assert_eq!(index.lookup("a"), [99_999]);
        index.set_end(123).unwrap();
        let again = Index::new(index.file.try_clone().unwrap());
        assert_eq!((again.head.end, again.head.epoch), (123, 7));
        assert_eq!(again.lookup("c5"), [10_000 + 5 * 512]);
    }

    #[test]
    fn a_flagged_or_torn_index_reads_as_none() {
        let file = tempfile::tempfile().unwrap();
        let mut index = Index::new(file.try_clone().unwrap());
        index.rebuild(1, 0, vec![("a".into(), 512)]).unwrap();
        assert_eq!(peek(&file, 1, "a"), Some(vec![512]));
        assert_eq!(peek(&file, 2, "a"), None, "another file's index");
        index.head.dirty = true;
        index.write_head().unwrap();
        assert_eq!(peek(&file, 1, "a"), None);
        file.set_len(10).unwrap();
        assert_eq!(peek(&file, 1, "a"), None);
    }
}
