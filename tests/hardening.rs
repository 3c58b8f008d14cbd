//! The local store against another user, a stopped process and exhausted limits (issue
//! "hardening"): a state directory is used only when it and everything in it belong to
//! the caller and nobody else may write them; a symbolic link is followed only when it
//! belongs to the caller or root; a stopped process holding a state lock blocks no
//! other channel's in-place recording, and every wait for those locks ends at a signal
//! or after RECORD_WITHIN; active.json shrinks when gc removes channels.
//!
//! The tests that need another user create throw-away ones when run as root (as CI
//! does) and skip with a notice otherwise.

use crate::common::*;
use predicates::prelude::*;
use predicates::str::contains;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The session id a command saw, from `printf %s "$CHAN_RUN_SESSION_ID"`.
const SHOW_SESSION: &str = r#"printf '%s' "$CHAN_RUN_SESSION_ID""#;

#[test]
fn a_state_directory_others_may_write_is_refused_with_the_fix() {
    for (mode, who) in [(0o777, "everyone"), (0o770, "its group"), (0o1777, "everyone")] {
        let env = TestEnv::new();
        std::fs::create_dir(env.state()).unwrap();
        chmod(env.state(), mode);
        env.run(&["-c", "x"], &["true"])
            .assert()
            .code(125)
            .stderr(contains(format!("is writable by {who}")).and(contains("chmod go-w")));
        assert_eq!(list(env.state()), Vec::<String>::new(), "mode {mode:o}: nothing was made in it");
    }
    let env = TestEnv::new();
    std::fs::create_dir(env.state()).unwrap();
    chmod(env.state(), 0o755);
    env.run(&["-c", "x"], &["true"]).assert().success();
}

#[test]
fn a_folder_inside_that_others_may_write_is_refused() {
    let env = TestEnv::new();
    env.run(&["-c", "x"], &["true"]).assert().success();
    chmod(&env.locks(), 0o777);
    env.run(&["-c", "x"], &["true"])
        .assert()
        .code(125)
        .stderr(contains("locks").and(contains("writable by everyone")));
    chmod(&env.locks(), 0o700);
    chmod(&env.lock_file("x"), 0o666);
    env.run(&["-c", "x"], &["true"]).assert().code(125).stderr(contains("x.lock").and(contains("writable")));
}

#[test]
fn a_state_directory_path_naming_a_file_says_it_is_not_a_directory() {
    let env = TestEnv::new();
    std::fs::write(env.state(), b"not a dir").unwrap();
    env.run(&["-c", "x"], &["true"])
        .assert()
        .code(125)
        .stderr(contains("is not a directory").and(contains("--state-dir")));
    let below = env.state().join("deeper");
    env.command()
        .arg("--state-dir")
        .arg(&below)
        .args(["run", "-c", "x", "--", "true"])
        .assert()
        .code(125)
        .stderr(contains("is not a directory"));
}

#[test]
fn status_on_an_empty_state_directory_creates_nothing() {
    let env = TestEnv::new();
    std::fs::create_dir(env.state()).unwrap();
    chmod(env.state(), 0o700);
    env.command().arg("status").assert().success().stdout("no channels yet\n");
    env.command().args(["history", "x"]).assert().success();
    assert_eq!(list(env.state()), Vec::<String>::new(), "status or history made something");
}

#[test]
fn a_symbolic_link_of_yours_to_a_directory_of_yours_is_followed() {
    let env = TestEnv::new();
    let real = env.root().join("real-state");
    std::fs::create_dir(&real).unwrap();
    chmod(&real, 0o700);
    let link = env.root().join("link-state");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let run = |script: &str| {
        let mut cmd = env.command();
        cmd.arg("--state-dir").arg(&link).args(["run", "-c", "x", "--", "sh", "-c", script]);
        cmd
    };
    run(r#"echo '{"session_id":"s1"}'"#).assert().success();
    run(SHOW_SESSION).assert().success().stdout("s1");
    assert!(real.join("active.json").exists());
}

#[test]
fn durations_below_a_millisecond_and_non_utf8_names_are_refused_naming_the_flag() {
    let env = TestEnv::new();
    env.run(&["-c", "x", "-t", "0.0000000001"], &["true"])
        .assert()
        .code(125)
        .stderr(contains("--timeout").and(contains("shorter than 1ms")));
    env.run(&["-c", "x", "-t", "0"], &["true"]).assert().success();
    let mut cmd = env.std_command();
    cmd.arg("run").arg("-c").arg(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"a\xffb"));
    cmd.args(["--", "true"]);
    assert_cmd::Command::from_std(cmd)
        .assert()
        .code(125)
        .stderr(contains("--channel").and(contains("not valid UTF-8")));
}

// ---------------------------------------------------------------------------------
// Session ids trusted no further than an argument can be.

#[test]
fn a_session_id_that_looks_like_a_flag_is_refused_and_the_record_says_so() {
    let env = TestEnv::new();
    env.run(&["-c", "s", "--session-arg=--resume"], &sh(r#"echo '{"session_id":"good-1"}'"#))
        .assert()
        .success();
    for (id, why) in [
        ("--dangerously-skip-permissions".to_owned(), "starts with '-'"),
        ("a\\u0007b".to_owned(), "control character U+0007"),
        ("x".repeat(1025), "1025 bytes long"),
    ] {
        env.run(&["-c", "s", "--session-arg=--resume"], &sh(&format!(r#"echo '{{"session_id":"{id}"}}'"#)))
            .assert()
            .success()
            .stderr(
                contains("warning: the session id")
                    .and(contains(why))
                    .and(contains("keeps its previous one")),
            );
        let record = crate::common::state::record(&env, "s");
        assert_eq!(record["session_id"], "good-1", "{why}: the refused id was stored");
        assert!(record["last_run"]["session_refused"].as_str().unwrap().contains(why), "{record}");
        // The next run resumes the last good id, as its own argument.
        env.run(&["-c", "s", "--session-arg=--resume"], &["sh", "-c", r#"printf '%s|' "$@""#, "sh"])
            .assert()
            .success()
            .stdout("--resume|good-1|");
    }
    let history = env.command().args(["history", "s", "--json"]).assert().success();
    let text = String::from_utf8_lossy(&history.get_output().stdout).into_owned();
    assert_eq!(text.matches("session_refused").count(), 3, "{text}");
}

#[test]
fn a_session_flag_ending_in_equals_passes_flag_and_id_as_one_argument() {
    let env = TestEnv::new();
    env.run(&["-c", "s"], &sh(r#"echo '{"session_id":"id-7"}'"#)).assert().success();
    env.run(&["-c", "s", "--session-arg=--resume="], &["sh", "-c", r#"printf '%s|' "$@""#, "sh"])
        .assert()
        .success()
        .stdout("--resume=id-7|");
}

// ---------------------------------------------------------------------------------
// A stopped process holding a lock of the state.

/// Holds `path`'s flock (exclusive) while alive, as a stopped chan-run would.
struct Held(#[allow(dead_code)] std::fs::File);

fn hold_lock(path: &Path) -> Held {
    let file = std::fs::File::open(path).unwrap();
    file.lock().unwrap();
    Held(file)
}

#[test]
fn a_stopped_holder_of_the_append_lock_holds_up_no_in_place_recording() {
    let env = TestEnv::new();
    env.run(&["-c", "old"], &["true"]).assert().success();
    let _held = hold_lock(&env.state().join("active.idx"));
    // An existing channel records in place: no wait at all.
    let out = env.spawn(&["-c", "old"], &["true"]).finish(PATIENCE);
    out.assert_code(0);
    assert!(out.elapsed < secs(3.0), "took {:?}", out.elapsed);
    assert_eq!(runs_in(state_json(&env).as_ref(), "old"), 2);
    // A new channel needs the append lock: it runs, waits at most RECORD_WITHIN (10 s)
    // to record, then warns and keeps the command's status.
    let out = env.spawn(&["-c", "new"], &sh("echo ran; exit 3")).finish(PATIENCE);
    out.assert_code(3);
    assert_eq!(out.stdout(), "ran\n");
    assert_between(out.elapsed, secs(9.0), secs(18.0));
    assert!(
        out.stderr().contains("not recorded") && out.stderr().contains("stayed locked"),
        "{}",
        out.stderr()
    );
    // A signal ends the wait at once: 128+N.
    let waiting = env.spawn(&["-c", "new2"], &sh("started ran"));
    env.wait_for_file("ran");
    std::thread::sleep(std::time::Duration::from_millis(300));
    waiting.signal(rustix::process::Signal::TERM);
    let out = waiting.finish(secs(5.0));
    out.assert_code(143);
}

#[test]
fn a_stopped_holder_of_the_exclusive_state_lock_is_waited_for_boundedly_and_status_never_waits() {
    let env = TestEnv::new();
    env.run(&["-c", "a"], &["true"]).assert().success();
    let _held = hold_lock(env.state());
    let waiting = env.spawn(&["-c", "a"], &sh("started ran; exit 4"));
    env.wait_for_file("ran");
    // status takes no lock at all.
    let status = env.command().args(["status", "--json"]).timeout(secs(3.0)).assert().success();
    assert!(String::from_utf8_lossy(&status.get_output().stdout).contains("\"a\""));
    waiting.signal(rustix::process::Signal::INT);
    waiting.finish(secs(5.0)).assert_code(130);
    let out = env.spawn(&["-c", "a"], &["sh", "-c", "exit 4"]).finish(PATIENCE);
    out.assert_code(4);
    assert_between(out.elapsed, secs(9.0), secs(18.0));
    assert!(out.stderr().contains("stayed locked"), "{}", out.stderr());
}

// ---------------------------------------------------------------------------------
// active.json shrinks.

#[test]
fn gc_compacts_active_json_and_every_survivor_stays_whole_and_writable() {
    let env = TestEnv::new();
    let n = 240;
    for i in 0..n {
        env.run(&["-c", &format!("c{i:03}")], &sh(&format!(r#"echo '{{"session_id":"s{i}"}}'"#)))
            .assert()
            .success();
    }
    let big = std::fs::metadata(env.state().join("active.json")).unwrap().len();
    // Every channel but each tenth is idle now; those are run again so gc keeps them.
    let tenth: Vec<String> = (0..n).step_by(10).map(|i| format!("c{i:03}")).collect();
    let idle_for = idle_between(&env, &tenth);
    env.command()
        .args(["gc", "--idle-for", &idle_for])
        .assert()
        .success()
        .stdout(contains("compacted active.json"));
    let small = std::fs::metadata(env.state().join("active.json")).unwrap().len();
    assert!(small * 4 < big, "{big} bytes before, {small} after");
    let state = state_json(&env).unwrap();
    let channels = state["channels"].as_object().unwrap();
    assert_eq!(channels.len(), n / 10, "{:?}", channels.keys().collect::<Vec<_>>());
    for i in (0..n).step_by(10) {
        let name = format!("c{i:03}");
        assert_eq!(channels[&name]["runs"], 2, "{name}");
        assert_eq!(channels[&name]["session_id"], format!("s{i}"), "{name}");
        // Found where compaction put it, and rewritten there.
        env.run(&["-c", &name], &sh(SHOW_SESSION)).assert().success().stdout(format!("s{i}"));
    }
    let state = state_json(&env).unwrap();
    assert!((0..n).step_by(10).all(|i| state["channels"][format!("c{i:03}")]["runs"] == 3));
    // Everything removed: the file is back to its header.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.command().args(["gc", "--idle-for", "1s"]).assert().success();
    assert!(std::fs::metadata(env.state().join("active.json")).unwrap().len() < 1024);
    assert_eq!(state_json(&env).unwrap()["channels"], serde_json::json!({}));
    env.run(&["-c", "again"], &["true"]).assert().success();
    assert_eq!(runs_in(state_json(&env).as_ref(), "again"), 1);
}

// ---------------------------------------------------------------------------------
// Another user's reach.

#[test]
fn a_symbolic_link_or_a_folder_or_file_of_another_user_is_refused() {
    let Some(other) = other_user() else { return };
    let env = TestEnv::new();
    env.run(&["-c", "x"], &["true"]).assert().success();
    // A link to our own directory, but planted by another user: not followed.
    let link = env.root().join("link");
    std::os::unix::fs::symlink(env.state(), &link).unwrap();
    chown(&link, other);
    env.command()
        .arg("--state-dir")
        .arg(&link)
        .args(["run", "-c", "x", "--", "true"])
        .assert()
        .code(125)
        .stderr(contains("symbolic link belonging to uid").and(contains("does not follow it")));
    chown(&env.locks(), other);
    env.run(&["-c", "x"], &["true"])
        .assert()
        .code(125)
        .stderr(contains("locks").and(contains("belongs to uid")));
    chown(&env.locks(), (0, 0));
    chown(&env.lock_file("x"), other);
    env.run(&["-c", "x"], &["true"])
        .assert()
        .code(125)
        .stderr(contains("x.lock").and(contains("belongs to uid")));
}

#[test]
fn a_state_directory_link_swapped_by_another_user_never_reaches_their_files() {
    let Some(other) = other_user() else { return };
    let env = TestEnv::new();
    let public = env.root().join("public");
    std::fs::create_dir(&public).unwrap();
    chmod(&public, 0o777);
    chmod(env.root(), 0o755);
    // The victim's own state, with a session of its own.
    env.run(&["-c", "x"], &sh(r#"echo '{"session_id":"victim"}'"#)).assert().success();
    // The other user's planted state: a valid file whose channel x has their session.
    let planted = env.root().join("planted");
    std::fs::create_dir(&planted).unwrap();
    std::fs::write(
        planted.join("active.json"),
        br#"{"version":1,"channels":{"x":{"session_id":"planted","runs":1}}}"#,
    )
    .unwrap();
    for p in [&planted, &planted.join("active.json")] {
        chown(p, other);
    }
    let planted_before = std::fs::read(planted.join("active.json")).unwrap();
    let at = public.join("state");
    let own_link = || {
        let tmp = public.join("own");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(env.state(), &tmp).unwrap();
        std::fs::rename(&tmp, &at).unwrap();
    };
    own_link();
    // The other user keeps swapping its own link in over ours.
    let mut swapper = as_user(
        other,
        &format!(
            "while :; do ln -sfn '{0}' '{1}/theirs' && mv -Tf '{1}/theirs' '{1}/state'; done",
            planted.display(),
            public.display()
        ),
    )
    .spawn()
    .unwrap();
    let _stop = KillOnDrop(vec![swapper.id()]);
    let until = std::time::Instant::now() + secs(if heavy() { 20.0 } else { 3.0 });
    let (mut ran, mut refused) = (0, 0);
    while std::time::Instant::now() < until {
        own_link();
        let out = env
            .command()
            .arg("--state-dir")
            .arg(&at)
            .args(["run", "-c", "x", "--", "sh", "-c", SHOW_SESSION])
            .output()
            .unwrap();
        match out.status.code() {
            Some(0) => {
                ran += 1;
                assert_eq!(String::from_utf8_lossy(&out.stdout), "victim", "the command got another session");
            }
            Some(125) => {
                refused += 1;
                assert!(String::from_utf8_lossy(&out.stderr).contains("symbolic link belonging to uid"));
            }
            other => panic!("exit {other:?}: {}", String::from_utf8_lossy(&out.stderr)),
        }
    }
    let _ = swapper.kill();
    let _ = swapper.wait();
    eprintln!("swapped state directory: {ran} runs on our own, {refused} refused, none on theirs");
    assert!(ran + refused > 10);
    assert_eq!(std::fs::read(planted.join("active.json")).unwrap(), planted_before, "their file was written");
    assert_eq!(list(&planted), ["active.json"], "files were made in their directory");
    assert_eq!(runs_in(state_json(&env).as_ref(), "x"), 1 + ran);
}

#[test]
fn removing_the_first_record_keeps_the_file_valid_and_the_others_whole() {
    let env = TestEnv::new();
    env.run(&["-c", "first"], &sh(r#"echo '{"session_id":"s-first"}'"#)).assert().success();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.run(&["-c", "second"], &sh(r#"echo '{"session_id":"s-second"}'"#)).assert().success();
    env.command().args(["gc", "--idle-for", "1s"]).assert().success().stdout(contains("removed first"));
    // The first slot now holds a placeholder of `second`, whose record is further on.
    let text = std::fs::read_to_string(env.state().join("active.json")).unwrap();
    assert_eq!(text.matches(r#""second":"#).count(), 2, "{text}");
    let state = state_json(&env).unwrap();
    assert_eq!(state["channels"].as_object().unwrap().len(), 1);
    assert_eq!(state["channels"]["second"]["session_id"], "s-second");
    env.run(&["-c", "second"], &sh(SHOW_SESSION)).assert().success().stdout("s-second");
    assert_eq!(runs_in(state_json(&env).as_ref(), "second"), 2);
    env.command().args(["status", "--json"]).assert().success().stdout(contains("s-second"));
    // Removing the last one empties the file: valid at every step.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.command().args(["gc", "--idle-for", "1s"]).assert().success().stdout(contains("removed second"));
    assert_eq!(state_json(&env).unwrap()["channels"], serde_json::json!({}));
    env.run(&["-c", "third"], &["true"]).assert().success();
    assert_eq!(runs_in(state_json(&env).as_ref(), "third"), 1);
}

/// Lets the channels run so far go idle for 1.1 s, runs `kept` again, and returns an
/// `--idle-for` that lies between the two: however long the kept runs took on a loaded
/// machine, they stay younger than it and the others older.
fn idle_between(env: &TestEnv, kept: &[String]) -> String {
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let rerun = std::time::Instant::now();
    for name in kept {
        env.run(&["-c", name], &["true"]).assert().success();
    }
    format!("{}ms", (rerun.elapsed() + std::time::Duration::from_millis(550)).as_millis())
}

#[test]
fn gc_killed_at_random_moments_loses_no_kept_record() {
    // Each round leaves 40 idle channels behind 10 kept ones, and SIGKILLs a gc at a
    // random moment of its removals and compaction. Then a new channel's run (which
    // finishes a cut gc left midway) must see a file that parses, with every kept
    // record whole, and nothing quarantined.
    let env = TestEnv::new();
    let seed = Rng::seed();
    eprintln!("gc kills: seed {seed}");
    let mut rng = Rng::new(seed);
    let kept: Vec<String> = (0..10).map(|i| format!("keep{i}")).collect();
    for (i, name) in kept.iter().enumerate() {
        env.run(&["-c", name], &sh(&format!(r#"echo '{{"session_id":"k{i}"}}'"#))).assert().success();
    }
    let rounds = scaled(4, 16);
    for round in 0..rounds {
        for i in 0..40 {
            env.run(&["-c", &format!("g{round}-{i}")], &sh(&format!(r#"echo '{{"session_id":"g{i}"}}'"#)))
                .assert()
                .success();
        }
        let idle_for = idle_between(&env, &kept);
        let mut gc = env.std_command();
        gc.args(["gc", "--idle-for", &idle_for]).stdout(std::process::Stdio::null());
        let mut gc = gc.spawn().unwrap();
        std::thread::sleep(rng.duration_up_to(std::time::Duration::from_millis(40)));
        let _ = gc.kill();
        let _ = gc.wait();
        env.run(&["-c", &format!("probe{round}")], &["true"]).assert().success();
        let state = state_json(&env).expect("active.json");
        for (i, name) in kept.iter().enumerate() {
            let record = &state["channels"][name];
            assert_eq!(record["runs"], 2 + round as u64, "round {round}: {name}: {record}");
            assert_eq!(record["session_id"], format!("k{i}"), "round {round}: {name}");
        }
        assert!(quarantined(&env).is_empty(), "round {round}: {:?}", quarantined(&env));
    }
    // A whole gc afterwards leaves only the kept channels and the probes, compacted.
    let idle_for = idle_between(&env, &kept);
    env.command().args(["gc", "--idle-for", &idle_for]).assert().success();
    let state = state_json(&env).unwrap();
    let names: Vec<&String> = state["channels"].as_object().unwrap().keys().collect();
    assert_eq!(names.len(), kept.len(), "{names:?}");
}
