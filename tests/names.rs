//! Channel names and the state directory: validation, one private lock file per
//! channel inside `locks/`, no symlink following, ownership and modes, the lock never
//! inherited by the command, and no self-deadlock for nested runs.

use crate::common::*;
use predicates::prelude::*;
use predicates::str::contains;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// Runs a command on channel `name`, which must see that name in `CHAN_RUN_CHANNEL`.
fn run_named(env: &TestEnv, name: &str) {
    env.run(&["-c", name], &sh(r#"printf %s "$CHAN_RUN_CHANNEL" > "$T/seen""#)).assert().success().stderr("");
    assert_eq!(env.read("seen"), name, "CHAN_RUN_CHANNEL as the command sees it");
}

/// The channel named on line 1 of each lock file.
fn lock_names(env: &TestEnv) -> Vec<String> {
    let mut names: Vec<String> = env
        .lock_files()
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(env.locks().join(f)).unwrap();
            text.lines().next().unwrap_or_default().to_owned()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn path_like_names_stay_inside_locks_and_get_distinct_files() {
    let env = TestEnv::new();
    let names = ["../x", "a/b", "a_b", "..", ".", "/", "x/../../y", "~", ".lock"];
    for name in names {
        run_named(&env, name);
    }
    assert_eq!(env.lock_files().len(), names.len(), "{:?}", env.lock_files());
    for file in env.lock_files() {
        assert!(file.ends_with(".lock") && !file.contains('/') && file != ".lock", "{file:?}");
        assert!(std::fs::symlink_metadata(env.locks().join(&file)).unwrap().is_file());
    }
    let mut want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    want.sort();
    assert_eq!(lock_names(&env), want, "each lock file names its channel");
    assert_eq!(
        list(env.state()),
        ["active.idx", "active.json", "history", "locks", "queue"],
        "nothing escaped into the state directory"
    );
    assert_eq!(list(env.root()), ["home", "state", "t"], "nothing escaped above it");
    assert_eq!(list(&env.root().join("home")), Vec::<String>::new(), "the user's own dirs are untouched");
}

#[test]
fn similar_names_never_share_a_lock() {
    let env = TestEnv::new();
    let long_a = format!("{}a", "é".repeat(127) + "x");
    let long_b = format!("{}b", "é".repeat(127) + "x");
    assert_eq!((long_a.len(), long_b.len()), (256, 256));
    let pairs = [("a/b", "a_b"), ("a", "A"), ("../x", "_2e._2fx"), ("é", "e\u{301}"), (&*long_a, &*long_b)];
    for (held, other) in pairs {
        let holder = env.hold(held, "held", "go");
        env.run(&["-c", other, "-n"], &["true"]).assert().append_context("held", held.to_owned()).code(0);
        env.run(&["-c", held, "-n"], &["true"]).assert().code(75);
        env.open_gate("go");
        holder.finish(PATIENCE).assert_code(0);
        std::fs::remove_file(env.path("go")).unwrap();
        std::fs::remove_file(env.path("held")).unwrap();
    }
}

#[test]
fn unicode_names_work() {
    let env = TestEnv::new();
    for name in ["discord:1234", "ünïcödé 日本語 🎉", "Telegram Chat #42", "e\u{301}"] {
        run_named(&env, name);
    }
    assert_eq!(env.lock_files().len(), 4);
}

#[test]
fn names_of_256_bytes_are_accepted() {
    let env = TestEnv::new();
    run_named(&env, &"x".repeat(256));
    run_named(&env, &"é".repeat(128));
    run_named(&env, &format!("{}🎉", "y".repeat(252)));
    for file in env.lock_files() {
        assert!(file.len() <= 255, "lock file name of {} bytes", file.len());
    }
    assert_eq!(env.lock_files().len(), 3);
}

fn refused(name: &str, message: &str) {
    let env = TestEnv::new();
    env.run(&["-c", name], &sh("started ran"))
        .assert()
        .code(125)
        .stdout("")
        .stderr(contains("chan-run: ").and(contains(message)));
    assert!(!env.exists("ran"), "the command ran for the bad name {name:?}");
    assert!(env.lock_files().is_empty(), "a lock file was made for the bad name {name:?}");
}

#[test]
fn names_of_257_bytes_are_refused() {
    refused(&"x".repeat(257), "257 bytes");
    refused(&format!("{}é", "x".repeat(255)), "257 bytes");
}

#[test]
fn empty_name_is_refused() {
    refused("", "empty");
}

#[test]
fn control_characters_are_refused() {
    for name in ["a\nb", "tab\there", "\u{7f}", "nul\u{1}", "c1\u{85}", "esc\u{1b}[31m", "cr\r"] {
        refused(name, "control character");
    }
}

#[test]
fn planted_symlink_lock_file_is_not_followed() {
    let env = TestEnv::new();
    std::fs::create_dir_all(env.locks()).unwrap();
    let target = env.path("precious");
    std::fs::write(&target, "precious\n").unwrap();
    std::os::unix::fs::symlink(&target, env.lock_file("victim")).unwrap();
    let dangling = env.path("not-there");
    std::os::unix::fs::symlink(&dangling, env.lock_file("dangling")).unwrap();

    for name in ["victim", "dangling"] {
        env.run(&["-c", name], &sh("started ran"))
            .assert()
            .code(125)
            .stderr(contains("chan-run: ").and(contains("symbolic link")));
    }
    assert!(!env.exists("ran"));
    assert_eq!(env.read("precious"), "precious\n", "the symlink's target was written");
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
    assert_ne!(mode, 0o600, "test premise: the target's mode is not what chan-run would set");
    assert!(!dangling.exists(), "a file was created through a dangling symlink");
}

#[test]
fn planted_symlink_folders_are_not_followed() {
    for folder in ["locks", "queue"] {
        let env = TestEnv::new();
        let elsewhere = env.path("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::create_dir_all(env.state()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, env.state().join(folder)).unwrap();
        env.run(&["-c", "x"], &sh("started ran")).assert().code(125).stderr(contains("chan-run: "));
        assert!(!env.exists("ran"), "ran with a symlinked {folder}/");
        assert!(list(&elsewhere).is_empty(), "files were created through a symlinked {folder}/");
    }
    // One channel's queue folder.
    let env = TestEnv::new();
    let elsewhere = env.path("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::create_dir_all(env.state().join("queue")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, env.state().join("queue/x")).unwrap();
    env.run(&["-c", "x"], &sh("started ran")).assert().code(125);
    assert!(!env.exists("ran"));
    assert!(list(&elsewhere).is_empty(), "files were created through a symlinked queue/x");
}

#[test]
fn lock_file_naming_another_channel_is_refused() {
    // What a collision of two long names' shortened file names would look like.
    let env = TestEnv::new();
    std::fs::create_dir_all(env.locks()).unwrap();
    std::fs::write(env.lock_file("victim"), "someone else\n").unwrap();
    env.run(&["-c", "victim"], &sh("started ran"))
        .assert()
        .code(125)
        .stderr(contains("chan-run: ").and(contains("someone else")));
    assert!(!env.exists("ran"));
    assert_eq!(std::fs::read_to_string(env.lock_file("victim")).unwrap(), "someone else\n");
}

#[test]
fn unusable_state_dir_exits_125() {
    let env = TestEnv::new();
    let file = env.path("a-file");
    std::fs::write(&file, "").unwrap();
    for dir in [file.clone(), file.join("below")] {
        let mut cmd = env.run(&["-c", "x"], &sh("started ran"));
        cmd.env("CHAN_RUN_STATE_DIR", &dir).assert().code(125).stderr(contains("chan-run: "));
        assert!(!env.exists("ran"));
    }
}

#[test]
fn state_dir_owned_by_another_user_is_refused() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to give a directory to another user");
        return;
    }
    let env = TestEnv::new();
    let theirs = env.root().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let mut cmd = env.run(&["-c", "x"], &sh("started ran"));
    cmd.env("CHAN_RUN_STATE_DIR", &theirs)
        .assert()
        .code(125)
        .stderr(contains("chan-run: ").and(contains("65534")).and(contains(theirs.to_str().unwrap())));
    assert!(!env.exists("ran"));
    assert!(list(&theirs).is_empty(), "files were created in another user's directory");
}

#[test]
fn state_dir_is_created_private_whatever_the_umask() {
    let env = TestEnv::new();
    let deep = env.root().join("a/b/state");
    let mut cmd = std::process::Command::new("sh");
    env.apply(&mut cmd);
    cmd.env("CHAN_RUN_STATE_DIR", &deep).args(["-c", r#"umask 000; exec "$B" run -c "x/y" -- true"#]);
    assert_cmd::Command::from_std(cmd).timeout(PATIENCE).assert().success();

    let mode = |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&deep), 0o700, "state dir");
    assert_eq!(mode(&deep.join("locks")), 0o700, "locks/");
    assert_eq!(mode(&deep.join("queue")), 0o700, "queue/");
    let lock = deep.join("locks").join(&list(&deep.join("locks"))[0]);
    assert_eq!(mode(&lock), 0o600, "lock file");
    for queue in list(&deep.join("queue")) {
        assert_eq!(mode(&deep.join("queue").join(queue)), 0o700, "a channel's queue folder");
    }
}

#[test]
fn state_dir_flag_is_used_and_wins_over_the_environment() {
    let env = TestEnv::new();
    let flagged = env.root().join("flagged");
    let mut cmd = env.command();
    cmd.env("CHAN_RUN_STATE_DIR", env.root().join("from-env"));
    cmd.arg("--state-dir").arg(&flagged).args(["run", "-c", "f", "--", "true"]).assert().success();
    assert_eq!(list(&flagged.join("locks")), ["f.lock"]);
    assert!(!env.root().join("from-env").exists());
    // Also accepted after the subcommand.
    env.command()
        .args(["run", "-c", "g", "--state-dir"])
        .arg(&flagged)
        .args(["--", "true"])
        .assert()
        .success();
    assert_eq!(list(&flagged.join("locks")), ["f.lock", "g.lock"]);
}

#[test]
fn command_does_not_inherit_the_lock_or_queue_files() {
    let env = TestEnv::new();
    let out = env
        .run(&["-c", "fd"], &sh(r#"for f in /proc/$$/fd/*; do readlink "$f" || true; done"#))
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let fds = String::from_utf8(out).unwrap();
    let state = env.state().to_str().unwrap();
    assert!(!fds.contains(state), "the command inherited chan-run's state files:\n{fds}");
    assert!(fds.lines().count() >= 3, "test premise: the listing shows the standard fds:\n{fds}");
}

#[test]
fn lingering_descendant_of_a_clean_run_does_not_block_the_channel() {
    let env = TestEnv::new();
    env.run(&["-c", "linger"], &sh(r#"sleep 30 >/dev/null 2>&1 & echo $! > "$T/bg""#)).assert().success();
    let bg = env.read_pid("bg");
    let _cleanup = KillOnDrop(vec![bg]);
    env.run(&["-c", "linger", "-n"], &sh("echo next")).assert().success().stdout("next\n");
    assert!(is_alive(bg), "a descendant of a cleanly ended run was killed by the next run");
}

#[test]
fn nested_run_on_the_held_channel_exits_125_at_once() {
    let env = TestEnv::new();
    let script = r#"
    "$B" run -c "outer chan 🎉" -- true; echo "named=$?"
    "$B" run -- true; echo "from-env=$?"
    "#;
    env.run(&["-c", "outer chan 🎉", "-t", "10"], &sh(script))
        .assert()
        .success()
        .stdout("named=125\nfrom-env=125\n")
        .stderr(contains("chan-run: ").and(contains("outer chan 🎉")));
}

#[test]
fn nested_run_on_another_channel_works() {
    let env = TestEnv::new();
    let script = r#"
    "$B" run -c inner -- sh -c 'echo "inner sees $CHAN_RUN_CHANNEL"; "$B" run -c outer -- true; echo "outer again=$?"'
    echo "inner=$?"
    "#;
    env.run(&["-c", "outer", "-t", "10"], &sh(script))
        .assert()
        .success()
        .stdout("inner sees inner\nouter again=125\ninner=0\n");
}

#[test]
fn held_marker_of_a_process_that_is_not_an_ancestor_is_ignored() {
    // CHAN_RUN_HELD copied into an unrelated process (e.g. a daemon started from a
    // command) must not make that channel unusable there.
    let env = TestEnv::new();
    let marker = env.run(&["-c", "x"], &["sh", "-c", "echo \"$CHAN_RUN_HELD\""]).assert().success();
    let line = String::from_utf8_lossy(&marker.get_output().stdout).trim().to_owned();
    let (_, store_and_channel) = line.split_once(' ').expect("<pid> <store> <channel>");
    let mut stranger = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let mut cmd = env.run(&["-c", "x"], &["true"]);
    cmd.env("CHAN_RUN_HELD", format!("{} {store_and_channel}", stranger.id())).assert().success();
    let _ = stranger.kill();
    let _ = stranger.wait();
}

#[test]
fn nested_run_of_the_same_channel_in_another_state_directory_works() {
    // The same name in another store is another lock: no self-deadlock to refuse.
    let env = TestEnv::new();
    let other = env.root().join("other-state");
    let script = format!(
        r#""$B" --state-dir '{}' run -c x -- sh -c 'echo "inner=$CHAN_RUN_CHANNEL"'; echo "nested=$?"
        "$B" --state-dir "$CHAN_RUN_STATE_DIR" run -c x -- true; echo "same=$?""#,
        other.display()
    );
    env.run(&["-c", "x", "-t", "10"], &sh(&script))
        .assert()
        .success()
        .stdout("inner=x\nnested=0\nsame=125\n");
}
