//! Bad input (SPEC "State directory", "Durations"): arbitrary channel names, damaged
//! `active.json` files, planted symbolic links, and malformed flag values.

use crate::common::*;
use predicates::prelude::*;
use predicates::str::contains;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

// ---------------------------------------------------------------------------------
// Channel names, as a property.

/// Characters that stress the encoding: case pairs, the escape character and what it
/// escapes to, path characters, combining and invisible marks, controls (C0, DEL, C1).
const TRICKY: &[char] = &[
    'a', 'A', 'z', 'Z', '0', '2', 'f', 'F', '_', '/', '.', '~', '-', ':', ' ', '\\', '%', 'é', 'e',
    '\u{301}', '\u{a0}', '\u{200b}', '\u{feff}', 'ß', 'İ', '🎉', '日',
];
const CONTROLS: &[char] = &['\u{1}', '\n', '\t', '\u{1b}', '\u{7f}', '\u{85}', '\u{9f}'];

/// Names of any length up to a little over the limit, from tricky characters mostly;
/// long ones repeat a unit so that names near 256 bytes share long prefixes (their
/// shortened, hashed file names must still differ). NUL cannot pass through argv and
/// becomes U+0001, another control character.
fn names() -> impl Strategy<Value = String> {
    let tricky = proptest::sample::select(TRICKY);
    let control = proptest::sample::select(CONTROLS);
    let ch = prop_oneof![24 => tricky.clone(), 1 => control, 3 => any::<char>()];
    let short = proptest::collection::vec(ch, 0..16).prop_map(String::from_iter);
    let unit = proptest::sample::select(&["x", "é", "日", "🎉", "A", "_", "a/"][..]);
    let long =
        (unit, 230usize..=262, proptest::collection::vec(tricky, 0..3)).prop_map(|(unit, len, tail)| {
            let mut name = String::new();
            while name.len() + unit.len() <= len {
                name.push_str(unit);
            }
            name.extend(tail);
            name
        });
    prop_oneof![3 => short, 1 => long].prop_map(|n| n.replace('\0', "\u{1}"))
}

/// The SPEC's rule, written independently of chan-run's: 1 to 256 bytes of UTF-8
/// without control characters (Unicode category Cc).
fn is_valid_name(name: &str) -> bool {
    (1..=256).contains(&name.len()) && !name.chars().any(char::is_control)
}

#[test]
fn arbitrary_channel_names_get_distinct_lock_files_inside_locks_or_exit_125() {
    // Invariants, over one state directory shared by every generated name:
    // - a valid name runs (exit 0, CHAN_RUN_CHANNEL is the name, byte for byte), and
    //   maps to exactly one lock file in locks/, the same every time, named in
    //   [a-z0-9._~-] (so distinct on case-insensitive filesystems too), at most 255
    //   bytes, never `.` or `..`, whose first line is the name; two names never share one;
    // - an invalid name exits 125 with a one-line message, runs nothing, creates nothing;
    // - nothing is ever created outside locks/, queue/ and active.json.
    let env = TestEnv::new();
    let file_of: RefCell<BTreeMap<String, String>> = RefCell::default();
    let name_of: RefCell<BTreeMap<String, String>> = RefCell::default();
    let (valid, invalid) = (Cell::new(0), Cell::new(0));
    let cases = scaled(64, 512) as u32;
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let record = sh(r#"printf %s "$CHAN_RUN_CHANNEL" > "$T/seen""#);
    let result = runner.run(&names(), |name| {
        let _ = std::fs::remove_file(env.path("seen"));
        let before = env.lock_files();
        let opt = format!("--channel={name}");
        let out = env.std_run(&[opt.as_str()], &record).output().unwrap();
        let after = env.lock_files();
        if !is_valid_name(&name) {
            invalid.set(invalid.get() + 1);
            prop_assert_eq!(out.status.code(), Some(125), "invalid {:?} was accepted", name);
            let stderr = String::from_utf8_lossy(&out.stderr);
            prop_assert!(stderr.starts_with("chan-run: ") && stderr.lines().count() == 1, "{:?}", stderr);
            prop_assert!(!env.exists("seen"), "the command ran for {:?}", name);
            prop_assert_eq!(after, before, "files were made for the invalid {:?}", name);
            return Ok(());
        }
        valid.set(valid.get() + 1);
        prop_assert_eq!(out.status.code(), Some(0), "{:?}: {}", name, String::from_utf8_lossy(&out.stderr));
        prop_assert_eq!(std::fs::read(env.path("seen")).unwrap(), name.as_bytes());
        let new: Vec<&String> = after.iter().filter(|f| !before.contains(f)).collect();
        let mut file_of = file_of.borrow_mut();
        let mut name_of = name_of.borrow_mut();
        let file = match file_of.get(&name) {
            Some(file) => {
                prop_assert!(new.is_empty(), "{:?} got another lock file: {:?}", name, new);
                file.clone()
            }
            None => {
                prop_assert_eq!(new.len(), 1, "{:?} made lock files {:?}", name, new);
                let file = new[0].clone();
                if let Some(other) = name_of.get(&file) {
                    prop_assert!(false, "{:?} and {:?} share the lock file {}", name, other, file);
                }
                file_of.insert(name.clone(), file.clone());
                name_of.insert(file.clone(), name.clone());
                file
            }
        };
        let stem = file.strip_suffix(".lock").expect("a .lock file");
        prop_assert!(file.len() <= 255 && stem != "." && stem != ".." && !stem.is_empty(), "{}", file);
        prop_assert!(
            stem.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._~-".contains(&b)),
            "unsafe lock file name {:?} for {:?}",
            file,
            name
        );
        let text = std::fs::read(env.locks().join(&file)).unwrap();
        let first = text.split(|&b| b == b'\n').next().unwrap();
        prop_assert_eq!(first, name.as_bytes(), "line 1 of {}", file);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let top: BTreeSet<String> = list(env.state()).into_iter().collect();
    let allowed: BTreeSet<String> =
        ["active.idx", "active.json", "history", "locks", "queue"].iter().map(|s| s.to_string()).collect();
    assert!(top.is_subset(&allowed), "the state directory holds {top:?}");
    assert_eq!(list(env.root()), ["home", "state", "t"], "nothing escaped the state directory");
    let file_of = file_of.into_inner();
    let (valid, invalid) = (valid.get(), invalid.get());
    let stems: BTreeSet<String> = file_of.values().map(|f| f.trim_end_matches(".lock").to_owned()).collect();
    for queue in list(&env.state().join("queue")) {
        assert!(stems.contains(&queue), "queue folder {queue:?} belongs to no channel");
    }
    let folded: BTreeSet<String> = file_of.values().map(|f| f.to_lowercase()).collect();
    assert_eq!(folded.len(), file_of.len(), "two lock files differ only in case");
    eprintln!("names: {valid} valid ({} distinct), {invalid} invalid", file_of.len());
    assert!(valid > 0 && invalid > 0, "both kinds were tried");
}

// ---------------------------------------------------------------------------------
// Damaged active.json.

/// A state directory whose active.json (slot layout) holds channels a (1 run), b (2)
/// and c (with a session id); returns its bytes.
fn good_state(env: &TestEnv) -> Vec<u8> {
    env.run(&["-c", "a"], &["true"]).assert().success();
    env.run(&["-c", "b"], &["true"]).assert().success();
    env.run(&["-c", "b"], &["true"]).assert().success();
    env.run(&["-c", "c"], &sh(r#"echo '{"session_id":"sess-c"}'"#)).assert().success();
    let bytes = std::fs::read(env.state().join("active.json")).unwrap();
    assert_eq!(bytes.len() % 512, 3, "test premise: the slot layout ({} bytes)", bytes.len());
    bytes
}

/// What a damaged file looked like, to compare with its quarantined copy.
enum Damage<'a> {
    Bytes(&'a [u8]),
    /// A directory holding one file `inside` with these bytes.
    Directory(&'a [u8]),
}

fn plant(env: &TestEnv, damage: &Damage) {
    let path = env.state().join("active.json");
    std::fs::create_dir_all(env.state()).unwrap();
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path).unwrap(),
        Ok(_) => std::fs::remove_file(&path).unwrap(),
        Err(_) => {}
    }
    match damage {
        Damage::Bytes(bytes) => std::fs::write(&path, bytes).unwrap(),
        Damage::Directory(bytes) => {
            std::fs::create_dir(&path).unwrap();
            std::fs::write(path.join("inside"), bytes).unwrap();
        }
    }
}

/// Plants `damage`, runs `channel`, and checks: the run proceeds (exit 3 kept), the
/// damaged file was moved to a new `active.json.corrupt-*` with its exact content, a
/// warning naming both went to stderr, and the state started empty.
fn quarantined_on_run(env: &TestEnv, damage: Damage, channel: &str, what: &str) {
    plant(env, &damage);
    let before = quarantined(env);
    let out = env.spawn(&["-c", channel], &sh("echo ran; exit 3")).finish(PATIENCE);
    assert_eq!(out.code(), 3, "{what}: {}", out.stderr());
    assert_eq!(out.stdout(), "ran\n", "{what}");
    let new: Vec<String> = quarantined(env).into_iter().filter(|q| !before.contains(q)).collect();
    assert_eq!(new.len(), 1, "{what}: quarantined copies: {new:?}; stderr: {}", out.stderr());
    let kept = env.state().join(&new[0]);
    match damage {
        Damage::Bytes(bytes) => {
            assert!(std::fs::read(&kept).unwrap() == bytes, "{what}: the quarantined copy differs")
        }
        Damage::Directory(bytes) => {
            assert!(kept.is_dir(), "{what}");
            assert_eq!(std::fs::read(kept.join("inside")).unwrap(), bytes, "{what}");
        }
    }
    let stderr = out.stderr();
    let shown = env.state().join("active.json");
    assert!(
        stderr.contains("chan-run: warning: ")
            && stderr.contains(&format!("{} ", shown.display()))
            && stderr.contains(&kept.display().to_string()),
        "{what}: the warning names both files: {stderr:?}"
    );
    let state = state_json(env).expect("a new active.json");
    let channels = state["channels"].as_object().unwrap();
    assert_eq!(channels.keys().collect::<Vec<_>>(), [channel], "{what}: started from an empty state");
    assert_eq!(channels[channel]["runs"], 1, "{what}");
    assert_eq!(channels[channel]["last_run"]["exit_code"], 3, "{what}");
}

/// A named case of a bug test.
type Case<'a> = (String, Box<dyn FnOnce() + 'a>);

/// Runs every case, then fails listing those that failed (a bug's full extent).
fn every_case(cases: Vec<Case>) {
    let tried = cases.len();
    let failed: Vec<String> = cases
        .into_iter()
        .filter_map(|(what, case)| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(case)).err().map(|_| what)
        })
        .collect();
    assert!(failed.is_empty(), "{} of {tried} cases failed: {failed:#?}", failed.len());
}

/// `good` cut at `at` bytes.
fn cut(good: &[u8], at: usize) -> &[u8] {
    &good[..at.min(good.len())]
}

#[test]
fn truncated_state_files_are_quarantined_byte_exact() {
    // Cut points: empty, inside the header, just before and at its end, inside a's
    // record, at the end of a record (a slot boundary), and with one brace missing.
    // A new channel's run must find the damage (its record is appended at the end), and
    // so must a's run when the cut is at or before a's record.
    let mut tried = 0;
    let probe = TestEnv::new();
    let len = good_state(&probe).len();
    for at in [0, 1, 37, 511, 512, 700, 1024, 1536, len - 2] {
        let env = TestEnv::new();
        let good = good_state(&env);
        quarantined_on_run(
            &env,
            Damage::Bytes(cut(&good, at)),
            "new",
            &format!("cut at {at}, run of a new channel"),
        );
        tried += 1;
        if at <= 700 {
            let env = TestEnv::new();
            let good = good_state(&env);
            quarantined_on_run(&env, Damage::Bytes(cut(&good, at)), "a", &format!("cut at {at}, run of a"));
            tried += 1;
        }
    }
    eprintln!("damaged: {tried} truncations quarantined");
}

#[test]
fn state_file_truncated_after_the_runs_own_record_is_quarantined() {
    let probe = TestEnv::new();
    let len = good_state(&probe).len();
    let cases = [1024, 1100, 1536, len - 2].map(|at| {
        let what = format!("cut at {at}, run of a");
        let case = move || {
            let env = TestEnv::new();
            let good = good_state(&env);
            quarantined_on_run(&env, Damage::Bytes(cut(&good, at)), "a", &format!("cut at {at}, run of a"));
        };
        (what, Box::new(case) as Box<dyn FnOnce()>)
    });
    every_case(cases.into());
}

#[test]
fn wrong_shapes_garbage_and_non_utf8_are_quarantined_byte_exact() {
    let mut garbage = vec![0u8; 4096];
    let mut rng = crate::common::Rng::new(7);
    garbage.iter_mut().for_each(|b| *b = rng.next_u64() as u8);
    let variants: Vec<(&str, Vec<u8>)> = vec![
        ("an array", b"[]".to_vec()),
        ("a string", br#""state""#.to_vec()),
        ("null", b"null".to_vec()),
        ("a number", b"42\n".to_vec()),
        ("version as a string", br#"{"version":"1","channels":{}}"#.to_vec()),
        ("version fractional", br#"{"version":1.5,"channels":{}}"#.to_vec()),
        ("version negative", br#"{"version":-1,"channels":{}}"#.to_vec()),
        ("channels as an array", br#"{"version":1,"channels":[]}"#.to_vec()),
        ("a record as null", br#"{"version":1,"channels":{"a":null}}"#.to_vec()),
        ("runs as a string", br#"{"version":1,"channels":{"a":{"runs":"3"}}}"#.to_vec()),
        ("runs negative", br#"{"version":1,"channels":{"a":{"runs":-1}}}"#.to_vec()),
        ("session id as a number", br#"{"version":1,"channels":{"a":{"session_id":7}}}"#.to_vec()),
        ("last run missing fields", br#"{"version":1,"channels":{"a":{"last_run":{"outcome":"ok"}}}}"#.to_vec()),
        ("unknown outcome", br#"{"version":1,"channels":{"a":{"last_run":{"started_at":"x","finished_at":"y","duration_ms":1,"exit_code":0,"signal":null,"outcome":"exploded"}}}}"#.to_vec()),
        ("a name not UTF-8", b"{\"version\":1,\"channels\":{\"\xff\xfe\":{\"runs\":1}}}".to_vec()),
        ("random bytes", garbage),
        ("nested 100000 deep", [vec![b'['; 100_000], vec![b']'; 100_000]].concat()),
    ];
    let env = TestEnv::new();
    let tried = variants.len();
    for (what, bytes) in &variants {
        quarantined_on_run(&env, Damage::Bytes(bytes), "a", what);
    }
    // The slot layout with its header made invalid UTF-8.
    let env = TestEnv::new();
    let mut bad_header = good_state(&env);
    bad_header[20] = 0xff;
    quarantined_on_run(&env, Damage::Bytes(&bad_header), "a", "a header not UTF-8");
    eprintln!("damaged: {} wrong shapes quarantined", tried + 1);
}

#[test]
fn damaged_record_inside_the_slot_layout_is_quarantined() {
    let mut cases: Vec<Case> = Vec::new();
    for (what, from, to) in [
        ("runs as a string", &br#""runs":1,"#[..], &br#""runs":"1","#[..]),
        ("a record not UTF-8", br#""a":{"#, b"\"\xff\":{"),
    ] {
        // Channel a's own record is damaged: a's next run meets it and moves the file
        // aside. (Another channel's run reads and rewrites only its own slot, so it
        // neither meets nor touches the damage: see the test below.)
        let channel = "a";
        let case = move || {
            let env = TestEnv::new();
            let mut bytes = good_state(&env);
            let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
            bytes.splice(at..at + from.len(), to.iter().copied());
            // Keep the slot's length: take the extra bytes out of its padding.
            let grown = to.len() - from.len();
            let nl = at + bytes[at..].iter().position(|&b| b == b'\n').unwrap();
            bytes.drain(nl - grown..nl);
            quarantined_on_run(&env, Damage::Bytes(&bytes), channel, &format!("{what}, run of {channel}"));
        };
        cases.push((format!("{what}, run of {channel}"), Box::new(case)));
    }
    every_case(cases);
}

/// A run of another channel rewrites only its own slot: the damaged record's bytes
/// stay exactly as they were, `status` names the damage, and the damaged channel's own
/// next run moves the file aside.
#[test]
fn damage_in_another_channels_record_is_left_untouched_until_that_channel_runs() {
    let env = TestEnv::new();
    let mut bytes = good_state(&env);
    let from = br#""runs":1,"#;
    let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
    bytes.splice(at..at + from.len(), br#""runs":"1","#.iter().copied());
    let nl = at + bytes[at..].iter().position(|&b| b == b'\n').unwrap();
    bytes.drain(nl - 2..nl);
    plant(&env, &Damage::Bytes(&bytes));
    let damaged_slot = bytes[..nl - 2].iter().rposition(|&b| b == b'\n').unwrap() + 1..nl - 1;
    env.run(&["-c", "b"], &["true"]).assert().success();
    let after = std::fs::read(env.state().join("active.json")).unwrap();
    assert_eq!(after[damaged_slot.clone()], bytes[damaged_slot], "the damaged record was written over");
    assert!(quarantined(&env).is_empty());
    let status = env.command().args(["status", "--json"]).assert().success();
    let stderr = String::from_utf8(status.get_output().stderr.clone()).unwrap();
    assert!(stderr.contains("damaged") && stderr.contains("channel \"a\""), "{stderr}");
    quarantined_on_run(&env, Damage::Bytes(&after), "a", "a's own run after b's");
}

#[test]
fn valid_json_with_a_disturbed_layout_is_not_damage() {
    type Edit = fn(&mut Vec<u8>);
    let edits: [(&str, Edit); 3] = [
        ("no final newline", |b| {
            b.pop();
        }),
        ("an extra final newline", |b| b.push(b'\n')),
        ("a session id removed by hand", |b| {
            let from = br#""sess-c""#;
            let at = b.windows(from.len()).position(|w| w == from).unwrap();
            b.splice(at..at + from.len(), b"null".iter().copied());
        }),
    ];
    let cases = edits.map(|(what, edit)| {
        let case = move || {
            let env = TestEnv::new();
            let mut bytes = good_state(&env);
            edit(&mut bytes);
            serde_json::from_slice::<serde_json::Value>(&bytes).expect("test premise: still valid JSON");
            std::fs::write(env.state().join("active.json"), &bytes).unwrap();
            let out = env.spawn(&["-c", "new"], &["true"]).finish(PATIENCE);
            out.assert_code(0);
            assert!(quarantined(&env).is_empty(), "{what}: a valid file was quarantined: {}", out.stderr());
            let state = state_json(&env).unwrap();
            assert_eq!(
                (runs_in(Some(&state), "a"), runs_in(Some(&state), "b")),
                (1, 2),
                "{what}: records lost"
            );
            assert_eq!(runs_in(Some(&state), "new"), 1, "{what}");
        };
        (what.to_owned(), Box::new(case) as Box<dyn FnOnce()>)
    });
    every_case(cases.into());
}

#[test]
fn huge_damaged_state_files_are_quarantined_byte_exact() {
    // 50 MB of random bytes, and 50 MB of a JSON document that never ends.
    const SIZE: usize = 50 * 1024 * 1024;
    let mut rng = crate::common::Rng::new(11);
    let mut garbage = vec![0u8; SIZE];
    for chunk in garbage.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes()[..chunk.len()]);
    }
    let mut unending = br#"{"version":1,"channels":{"a":{"session_id":null},"padding":"#.to_vec();
    unending.resize(SIZE, b' ');
    for (what, bytes) in [("50 MB of random bytes", &garbage), ("50 MB of unending JSON", &unending)] {
        let env = TestEnv::new();
        let started = std::time::Instant::now();
        quarantined_on_run(&env, Damage::Bytes(bytes), "a", what);
        assert!(started.elapsed() < secs(15.0), "{what}: took {:?}", started.elapsed());
    }
}

#[test]
fn a_directory_in_place_of_active_json_is_moved_aside() {
    let env = TestEnv::new();
    good_state(&env);
    quarantined_on_run(&env, Damage::Directory(b"kept\n"), "a", "a directory");
    // A second damage within the same second gets a name of its own.
    quarantined_on_run(&env, Damage::Bytes(b"{oops"), "a", "garbage right after");
    quarantined_on_run(&env, Damage::Bytes(b"{oops again"), "a", "garbage again");
    assert_eq!(quarantined(&env).len(), 3);
}

// ---------------------------------------------------------------------------------
// Planted symbolic links.

/// Content, mode and modification time of a file, to show it was not touched.
fn fingerprint(path: &Path) -> (Vec<u8>, u32, i64, i64) {
    let m = std::fs::metadata(path).unwrap();
    (std::fs::read(path).unwrap(), m.mode(), m.mtime(), m.mtime_nsec())
}

#[test]
fn symlink_planted_at_active_json_exits_125_and_leaves_the_target_untouched() {
    // Invariant: chan-run never reads or writes through a symlink at active.json: exit
    // 125, the command does not run, the target and the link stay as they were.
    for target_kind in ["valid state", "slot layout of another state dir", "dangling"] {
        let env = TestEnv::new();
        env.run(&["-c", "x"], &["true"]).assert().success();
        let link = env.state().join("active.json");
        std::fs::remove_file(&link).unwrap();
        let target = env.path("elsewhere.json");
        match target_kind {
            "valid state" => std::fs::write(&target, br#"{"version":1,"channels":{}}"#).unwrap(),
            "slot layout of another state dir" => {
                let other = TestEnv::new();
                good_state(&other);
                std::fs::copy(other.state().join("active.json"), &target).unwrap();
            }
            _ => {}
        }
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let before = target.exists().then(|| fingerprint(&target));
        env.run(&["-c", "x"], &sh("started ran"))
            .assert()
            .code(125)
            .stdout("")
            .stderr(contains("chan-run: ").and(contains("active.json")).and(contains("symbolic link")));
        assert!(!env.exists("ran"), "{target_kind}: the command ran");
        assert_eq!(
            target.exists().then(|| fingerprint(&target)),
            before,
            "{target_kind}: the target changed"
        );
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "{target_kind}");
        assert!(quarantined(&env).is_empty() && stray_temp_files(&env).is_empty(), "{:?}", list(env.state()));
        // `status` neither follows it.
        env.command().args(["status", "--json"]).assert().code(125);
        assert_eq!(target.exists().then(|| fingerprint(&target)), before);
    }
}

#[test]
fn symlink_planted_at_a_lock_path_exits_125_and_leaves_the_target_untouched() {
    // The link points at another channel's real lock file: following it would let the
    // two channels share a lock.
    let env = TestEnv::new();
    env.run(&["-c", "y"], &["true"]).assert().success();
    let target = env.lock_file("y");
    std::fs::create_dir_all(env.locks()).unwrap();
    std::os::unix::fs::symlink(&target, env.lock_file("x")).unwrap();
    let before = fingerprint(&target);
    for opts in [&["-c", "x"][..], &["-c", "x", "-n"]] {
        env.run(opts, &sh("started ran"))
            .assert()
            .code(125)
            .stderr(contains("chan-run: ").and(contains("symbolic link")));
    }
    assert!(!env.exists("ran"));
    assert_eq!(fingerprint(&target), before, "the other channel's lock file changed");
    env.run(&["-c", "y", "-n"], &["true"]).assert().success();
}

/// Replaces `path` with a named pipe.
fn plant_fifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let made = std::process::Command::new("mkfifo").arg(path).status().unwrap();
    assert!(made.success(), "mkfifo {}", path.display());
}

#[test]
fn fifo_planted_at_a_lock_path_exits_125_without_blocking() {
    let env = TestEnv::new();
    env.run(&["-c", "y"], &["true"]).assert().success();
    plant_fifo(&env.lock_file("x"));
    let out = env.spawn(&["-c", "x"], &sh("started ran")).finish(secs(5.0));
    out.assert_code(125);
    assert!(out.stderr().starts_with("chan-run: "), "{}", out.stderr());
    assert!(!env.exists("ran"));
}

#[test]
fn fifo_planted_at_active_json_never_blocks() {
    // Either refused (125) or moved aside as damage (the run proceeds): never a hang.
    let env = TestEnv::new();
    env.run(&["-c", "a"], &["true"]).assert().success();
    plant_fifo(&env.state().join("active.json"));
    let out = env.spawn(&["-c", "a"], &sh("echo ran")).finish(secs(5.0));
    assert!([0, 125].contains(&out.code()), "{}", out.stderr());
    let mut status = env.command();
    status.timeout(secs(5.0)).arg("status").assert().code(predicate::in_iter([0, 125]));
}

// ---------------------------------------------------------------------------------
// Malformed flag values.

#[test]
fn malformed_values_exit_125_with_the_flag_named_on_one_line() {
    // Invariant: exit 125, nothing on stdout, one line on stderr that names the flag
    // (by its long name), nothing run, nothing created.
    let durations = [
        "abc",
        "5x",
        "1.5.5",
        "0x10",
        "NaN",
        "inf",
        "∞",
        "١٢",
        "5mm",
        "m5",
        "1_000",
        "+5",
        " ",
        "5s5",
        "-0",
        "-0.5",
        "1e400",
        "18446744073709551616s",
        "5 parsecs",
    ];
    let cases: Vec<(&str, &str, Vec<&str>)> = vec![
        ("-t", "--timeout", durations.to_vec()),
        ("-k", "--kill-after", durations.to_vec()),
        ("-w", "--wait", durations.to_vec()),
        (
            "-E",
            "--conflict-exit-code",
            vec!["abc", "256", "-1", "", "1.5", "0x4b", " 75", "75 ", "1e2", "٧٥"],
        ),
        ("--fresh-after", "--fresh-after", vec!["0", "-1", "abc", "", "1.5", "18446744073709551616", "2x"]),
        ("--session-key", "--session-key", vec!["session_id", "x/y", " /a", "#/a", "~1"]),
    ];
    let env = TestEnv::new();
    let mut tried = 0;
    for (flag, long, values) in &cases {
        for value in values {
            let attached = format!("{long}={value}");
            let mut forms = vec![vec![attached.as_str()]];
            if !value.starts_with('-') {
                forms.push(vec![flag, value]);
            }
            for form in forms {
                let mut opts = vec!["-c", "x"];
                opts.extend(&form);
                let out = env.std_run(&opts, &sh("started ran")).output().unwrap();
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert_eq!(out.status.code(), Some(125), "{form:?} was accepted; stderr: {stderr}");
                assert!(out.stdout.is_empty(), "{form:?}");
                assert!(
                    stderr.starts_with("chan-run: ") && stderr.ends_with('\n') && stderr.lines().count() == 1,
                    "{form:?}: not one line: {stderr:?}"
                );
                assert!(stderr.contains(long), "{form:?}: the message does not name {long}: {stderr:?}");
                assert!(!env.exists("ran"), "{form:?}: the command ran");
                tried += 1;
            }
        }
    }
    assert!(env.lock_files().is_empty(), "nothing ran");
    eprintln!("flags: {tried} malformed values refused");
}
