//! A state directory where writes fail (SPEC `run` item 8): a file-size limit
//! (`RLIMIT_FSIZE`, set with `ulimit -f` in blocks of 512 bytes: `EFBIG`; chan-run
//! ignores SIGXFSZ itself) and a full filesystem (a 64 KiB tmpfs mounted inside
//! `unshare -m`, where this machine allows it: `ENOSPC`). When the run's record cannot
//! be written, chan-run warns on stderr, still exits with the command's own status, and
//! leaves the previous `active.json` byte for byte as it was.
//!
//! Updating an existing channel's record is an in-place rewrite of its slot that needs
//! no new space, so it may succeed on a full disk: there the check is "recorded
//! correctly, or the file intact and a warning". (The index, `active.idx`, is written
//! in place too; where it cannot be, the run is not recorded, and the warning says so.)

use crate::common::*;

/// Runs `chan-run run -c CHANNEL -- sh -c SCRIPT` under `ulimit -f BLOCKS`.
fn limited(env: &TestEnv, blocks: u64, channel: &str, script: &str) -> Outcome {
    let mut cmd = std::process::Command::new("sh");
    env.apply(&mut cmd);
    cmd.args([
        "-c",
        &format!(r#"ulimit -f {blocks} && exec "$B" run -c "$1" -- sh -c "$2""#),
        "sh",
        channel,
        script,
    ]);
    Running::start(cmd).finish(PATIENCE)
}

fn active(env: &TestEnv) -> Vec<u8> {
    std::fs::read(env.state().join("active.json")).unwrap()
}

/// A printf of `{"session_id":"<len × fill>"}`.
fn prints_session(fill: char, len: usize) -> String {
    format!(r#"printf '{{"session_id":"%s"}}' {}"#, fill.to_string().repeat(len))
}

/// The warning of a run whose record could not be written, naming why.
#[track_caller]
fn assert_not_recorded_warning(out: &Outcome, why: &str) {
    let stderr = out.stderr();
    assert!(
        stderr.contains("chan-run: warning: ")
            && stderr.contains("not recorded")
            && stderr.contains("active.json")
            && stderr.contains(why),
        "no clear warning: {stderr:?}"
    );
}

/// After a run of `channel` that exited `code`: either its record was written
/// correctly (and nothing else changed), or active.json is byte for byte `before` and
/// a warning says why.
#[track_caller]
fn recorded_or_intact(env: &TestEnv, before: &[u8], out: &Outcome, channel: &str, code: i64, why: &str) {
    let after = active(env);
    if after == before {
        assert_not_recorded_warning(out, why);
        eprintln!("write failures: {channel}'s run not recorded, active.json intact, warned");
        return;
    }
    let old: serde_json::Value = serde_json::from_slice(before).unwrap();
    let new = state_json(env).unwrap();
    let (old_ch, new_ch) = (&old["channels"], &new["channels"]);
    assert_eq!(
        new_ch[channel]["runs"],
        old_ch[channel]["runs"].as_u64().unwrap_or(0) + 1,
        "{channel}'s runs"
    );
    assert_eq!(new_ch[channel]["last_run"]["exit_code"], code);
    for (name, record) in old_ch.as_object().unwrap() {
        if name != channel {
            assert_eq!(&new_ch[name], record, "another channel's record changed");
        }
    }
    assert!(stray_temp_files(env).is_empty(), "{:?}", list(env.state()));
    eprintln!("write failures: {channel}'s run recorded correctly");
}

/// a and b: the header (512), fillers to the first slot (4 KiB, a's), b's slot at
/// 8192..8704, and the closing 3 bytes.
fn two_channels(env: &TestEnv) -> Vec<u8> {
    env.run(&["-c", "a"], &["true"]).assert().success();
    env.run(&["-c", "b"], &["true"]).assert().success();
    let bytes = active(env);
    assert_eq!(bytes.len(), 8707, "test premise: the layout's size");
    bytes
}

#[test]
fn file_size_limit_new_channel_not_recorded_status_kept_file_intact() {
    // Limit 8704 bytes: the records in place fit, the new record (at 8704) does not.
    let env = TestEnv::new();
    let before = two_channels(&env);
    let out = limited(&env, 17, "new", "echo ran; exit 7");
    out.assert_code(7);
    assert_eq!(out.stdout(), "ran\n");
    assert_not_recorded_warning(&out, "File too large");
    assert!(active(&env) == before, "active.json changed");
    assert!(stray_temp_files(&env).is_empty() && quarantined(&env).is_empty(), "{:?}", list(env.state()));
    // The file is still good for the next run, without a limit.
    env.run(&["-c", "new"], &["true"]).assert().success().stderr("");
    assert_eq!(runs_in(state_json(&env).as_ref(), "new"), 1);
    assert_eq!(runs_in(state_json(&env).as_ref(), "a"), 1);
}

#[test]
fn file_size_limit_existing_channel_recorded_or_intact() {
    let env = TestEnv::new();
    let before = two_channels(&env);
    let out = limited(&env, 17, "a", "exit 5");
    out.assert_code(5);
    recorded_or_intact(&env, &before, &out, "a", 5, "File too large");
}

#[test]
fn file_size_limit_record_that_must_move_not_recorded_file_intact() {
    // A record that outgrows its slot moves to a new line at the end, which the limit
    // stops before anything is written.
    let env = TestEnv::new();
    let before = two_channels(&env);
    let out = limited(&env, 17, "b", &format!("{}; exit 6", prints_session('s', 1000)));
    out.assert_code(6);
    assert_not_recorded_warning(&out, "File too large");
    assert!(active(&env) == before, "active.json changed");
    assert!(stray_temp_files(&env).is_empty(), "the temp file was left: {:?}", list(env.state()));
}

#[test]
fn file_size_limit_first_record_not_recorded_status_kept() {
    // No active.json yet; the limit (1024) lets the lock file and an empty state file
    // be written, but neither the index nor the first record (at 4096).
    let env = TestEnv::new();
    let out = limited(&env, 2, "first", "exit 9");
    out.assert_code(9);
    assert_not_recorded_warning(&out, "File too large");
    assert_eq!(runs_in(state_json(&env).as_ref(), "first"), 0);
    assert!(stray_temp_files(&env).is_empty(), "{:?}", list(env.state()));
    env.run(&["-c", "first", "-n"], &["true"]).assert().success();
}

#[test]
fn file_size_limit_hand_written_state_is_not_converted_and_kept() {
    // A valid file in another layout is converted on the first write: a whole new file.
    let env = TestEnv::new();
    std::fs::create_dir_all(env.state()).unwrap();
    let before = br#"{"version":1,"channels":{"a":{"session_id":"kept","runs":4}}}"#;
    std::fs::write(env.state().join("active.json"), before).unwrap();
    let out = limited(&env, 1, "a", "exit 8");
    out.assert_code(8);
    assert_not_recorded_warning(&out, "File too large");
    assert_eq!(active(&env), before);
}

#[test]
fn file_size_limit_below_the_files_size_keeps_the_file_intact() {
    // Limit 8192 bytes, the file is 8707: the append fails at once (EFBIG at the end).
    let env = TestEnv::new();
    let before = two_channels(&env);
    let out = limited(&env, 16, "new", "exit 7");
    out.assert_code(7);
    assert_not_recorded_warning(&out, "File too large");
    assert!(active(&env) == before, "active.json changed: ends with {:?}", tail_text(&active(&env)));
}

#[test]
fn file_size_limit_through_a_slot_never_tears_the_record() {
    // c's record (a 600-byte session id) sits in a 1024-byte slot at 8192..9216; the
    // limit (8704) cuts through it. The next run prints a new id of the same length.
    let env = TestEnv::new();
    env.run(&["-c", "a"], &["true"]).assert().success();
    env.run(&["-c", "c"], &sh(&prints_session('A', 600))).assert().success();
    let before = active(&env);
    assert_eq!(before.len(), 9219, "test premise: c's slot is 8192..9216");
    let out = limited(&env, 17, "c", &format!("{}; exit 7", prints_session('B', 600)));
    out.assert_code(7);
    let state = state_json(&env).expect("active.json parses");
    let id = state["channels"]["c"]["session_id"].as_str().unwrap_or_default().to_owned();
    assert!(
        id == "A".repeat(600) || id == "B".repeat(600),
        "c's session id is neither the old nor the new one: {} × A, {} × B",
        id.matches('A').count(),
        id.matches('B').count()
    );
    recorded_or_intact(&env, &before, &out, "c", 7, "File too large");
}

/// What the tmpfs scenario left in `$T`.
struct FullDisk {
    env: TestEnv,
}

impl FullDisk {
    fn code(&self, step: &str) -> i32 {
        self.env.read(&format!("{step}.code")).trim().parse().unwrap()
    }

    fn outcome(&self, step: &str) -> Outcome {
        Outcome {
            status: std::os::unix::process::ExitStatusExt::from_raw(self.code(step) << 8),
            elapsed: Default::default(),
            stdout: Vec::new(),
            stderr: std::fs::read(self.env.path(&format!("{step}.err"))).unwrap(),
        }
    }

    fn bytes(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.env.path(name)).unwrap()
    }
}

/// Mounts a 64 KiB tmpfs inside `unshare -m`, makes a state directory there with
/// channels a-h (active.json: a's 4 KiB first slot at 4096, seven 512-byte slots from
/// 8192, ending at 11779, inside its third page) and the lock file of channel `new`
/// (`reset` makes it, and no record), fills the disk, and runs: `new` (its record would
/// need a fourth page), `a` (in place), and `b` whose record must move to a bigger slot
/// (a new line at the end, in that fourth page). Copies out what the checks need.
/// `None` where mounting is not allowed.
fn full_disk() -> Option<FullDisk> {
    let can_mount = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !can_mount {
        eprintln!("skipped: `unshare -m` with a tmpfs mount is not allowed here");
        return None;
    }
    let env = TestEnv::new();
    let script = r#"
    set -u
    M="$T/small"; S="$M/state"
    mkdir "$M" && mount -t tmpfs -o size=64k,mode=700 tmpfs "$M" || exit 90
    r() { "$B" --state-dir "$S" run "$@"; }
    for c in a b c d e f g h; do r -c $c -- true || exit 91; done
    "$B" --state-dir "$S" reset new || exit 92
    cp "$S/active.json" "$T/before.json"
    cat /dev/zero > "$M/fill" 2>/dev/null
    df -k "$M" > "$T/df"
    r -c new -- sh -c 'echo ran; exit 7' > "$T/new.out" 2> "$T/new.err"; echo $? > "$T/new.code"
    cp "$S/active.json" "$T/after-new.json"
    r -c a -- sh -c 'exit 5' 2> "$T/a.err"; echo $? > "$T/a.code"
    cp "$S/active.json" "$T/after-a.json"
    r -c b -- sh -c 'printf "{\"session_id\":\"%s\"}" $(head -c 1000 /dev/zero | tr "\0" s); exit 4' \
        > /dev/null 2> "$T/b.err"; echo $? > "$T/b.code"
    cp "$S/active.json" "$T/after-b.json"
    ls -A "$S" > "$T/ls"
    "#;
    let mut cmd = std::process::Command::new("unshare");
    env.apply(&mut cmd);
    cmd.args(["-m", "sh", "-c", script]);
    let out = Running::start(cmd).finish(PATIENCE);
    out.assert_code(0);
    Some(FullDisk { env })
}

#[test]
fn full_disk_new_channel_not_recorded_status_kept_file_intact() {
    let Some(disk) = full_disk() else { return };
    let before = disk.bytes("before.json");
    assert_eq!(before.len(), 11779, "test premise: the layout's size");
    assert!(
        disk.env.read("df").contains(" 100% "),
        "test premise: the disk is full: {}",
        disk.env.read("df")
    );
    let new = disk.outcome("new");
    new.assert_code(7);
    assert_eq!(disk.env.read("new.out"), "ran\n");
    assert_not_recorded_warning(&new, "No space left on device");
    assert!(disk.bytes("after-new.json") == before, "active.json changed");
}

#[test]
fn full_disk_existing_channels_recorded_or_intact() {
    let Some(disk) = full_disk() else { return };
    let env = &disk.env;
    let state = env.state();
    std::fs::create_dir_all(state).unwrap();
    // Check each step's file as if it were the state directory's.
    let check = |before: &str, after: &str, step: &str, channel: &str, code: i64| {
        let out = disk.outcome(step);
        out.assert_code(code as i32);
        std::fs::write(state.join("active.json"), disk.bytes(after)).unwrap();
        recorded_or_intact(env, &disk.bytes(before), &out, channel, code, "No space left on device");
    };
    check("after-new.json", "after-a.json", "a", "a", 5);
    check("after-a.json", "after-b.json", "b", "b", 4);
    let left = env.read("ls");
    assert!(!left.contains(".active.json."), "a temp file was left on the full disk: {left}");
}
