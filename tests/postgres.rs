//! The PostgreSQL store (`--store postgres://…`) against a real server started by
//! `scripts/test-postgres`: the local store's promises across hosts (mutual exclusion,
//! arrival order, no lost update, sessions, status), and what only a shared server
//! adds: fences, the heartbeat, a holder cut off from the server, a stale holder.
//! Each test gets its own schema, i.e. its own installation.

use crate::common::*;
use rustix::process::Signal;
use std::time::Instant;

/// A fresh installation on the shared test server, or `None` (skipped loudly).
fn setup() -> Option<(TestEnv, String)> {
    let server = pg::server()?;
    let store = pg::fresh_store(&server);
    Some((TestEnv::with_store(&store), store))
}

pub fn status(env: &TestEnv, channel: &str) -> serde_json::Value {
    let out = env.command().args(["status", "--json", channel]).output().unwrap();
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    all["channels"].get(0).cloned().unwrap_or(serde_json::Value::Null)
}

pub fn queued_pids(env: &TestEnv, channel: &str) -> Vec<u32> {
    let s = status(env, channel);
    let queue = s["queue"].as_array().cloned().unwrap_or_default();
    queue.iter().map(|w| w["pid"].as_u64().unwrap() as u32).collect()
}

/// One value from the store's tables.
fn sql(store: &str, query: &str) -> String {
    pg::psql(store, query)
}

/// The lease rows with their channel's name (`channel`).
pub const LEASE: &str = "chan_run_lease JOIN chan_run_channel ON id = channel_id";

fn fence_of(env: &TestEnv, name: &str) -> i64 {
    env.read(name).trim().parse().unwrap()
}

/// Whether this machine lets a test give a process its own host name.
fn can_fake_hosts() -> bool {
    std::process::Command::new("unshare").args(["--uts", "true"]).status().is_ok_and(|s| s.success())
}

/// Starts caller `i` (appending `i` to `$T/order`) as if on `host`, and returns once it
/// waits in the channel's queue.
pub fn enqueue(env: &TestEnv, channel: &str, i: usize, host: Option<&str>) -> Running {
    let script = sh(&format!(r#"echo {i} >> "$T/order""#));
    let mut cmd = match host {
        Some(host) => {
            let mut cmd = std::process::Command::new("unshare");
            cmd.args([
                "--uts",
                "--",
                "sh",
                "-c",
                r#"hostname "$1" && shift && exec "$@""#,
                "sh",
                host,
                &*BIN,
            ]);
            env.apply(&mut cmd);
            cmd.args(["run", "-c", channel, "--"]).args(&script);
            cmd
        }
        None => env.std_run(&["-c", channel], &script),
    };
    cmd.stdin(std::process::Stdio::null());
    let mut run = Running::start(cmd);
    let pid = run.pid();
    wait_until(&format!("caller {i} to queue"), || {
        queued_pids(env, channel).contains(&pid) || !run.is_running()
    });
    run
}

#[test]
fn runs_on_one_channel_never_overlap_and_other_channels_run_meanwhile() {
    let Some((env, store)) = setup() else { return };
    let script = sh(r#"mkdir "$T/inside" || exit 99; sleep 0.05; rmdir "$T/inside""#);
    let runs: Vec<Running> = (0..10).map(|_| env.spawn(&["-c", "one"], &script)).collect();
    for run in runs {
        run.finish(PATIENCE).assert_code(0);
    }
    assert_eq!(sql(&store, "SELECT runs FROM chan_run_channel WHERE channel = 'one'"), "10");

    let holder = env.hold("a", "a-held", "a-go");
    env.run(&["-c", "b"], &["true"]).assert().code(0);
    env.run(&["-n", "-c", "a"], &["true"]).assert().code(75);
    env.open_gate("a-go");
    holder.finish(PATIENCE).assert_code(0);
}

#[test]
fn thirty_two_waiters_from_three_hosts_are_served_in_arrival_order() {
    let Some((env, _store)) = setup() else { return };
    let hosts = can_fake_hosts();
    if !hosts {
        eprintln!("note: no UTS namespaces here; the 3 hosts share this host's name");
    }
    let holder = env.hold("fifo", "held", "go");
    let callers: Vec<Running> = (0..32)
        .map(|i| {
            let host = format!("host-{}", i % 3);
            enqueue(&env, "fifo", i, hosts.then_some(host.as_str()))
        })
        .collect();
    let s = status(&env, "fifo");
    assert_eq!(s["waiting"], 32, "{s:#}");
    let pids: Vec<u64> = s["queue"].as_array().unwrap().iter().map(|w| w["pid"].as_u64().unwrap()).collect();
    let spawned: Vec<u64> = callers.iter().map(|c| u64::from(c.pid())).collect();
    assert_eq!(pids, spawned, "status lists the queue in arrival order");
    if hosts {
        let named: std::collections::BTreeSet<&str> =
            s["queue"].as_array().unwrap().iter().map(|w| w["host"].as_str().unwrap()).collect();
        assert_eq!(named.into_iter().collect::<Vec<_>>(), ["host-0", "host-1", "host-2"]);
    }
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    for run in callers {
        run.finish(PATIENCE).assert_code(0);
    }
    assert_eq!(env.order(), (0..32).collect::<Vec<_>>());
}

#[test]
fn no_update_is_lost_over_eight_channels_by_twelve_runs() {
    let Some((env, store)) = setup() else { return };
    let runs: Vec<Running> = (0..12)
        .flat_map(|i| (0..8).map(move |c| (i, c)))
        .map(|(i, c)| {
            env.spawn(&["-c", &format!("ch{c}")], &sh(&format!(r#"echo '{{"session_id":"ch{c}-{i}"}}'"#)))
        })
        .collect();
    for run in runs {
        run.finish(PATIENCE).assert_code(0);
    }
    let counts = sql(
        &store,
        "SELECT string_agg(c.channel || '=' || c.runs || '/' || (SELECT count(*) FROM chan_run_history h WHERE h.channel_id = c.id), ' ' ORDER BY c.channel) FROM chan_run_channel c",
    );
    let want: Vec<String> = (0..8).map(|c| format!("ch{c}=12/12")).collect();
    assert_eq!(counts, want.join(" "));
    for c in 0..8 {
        let s = status(&env, &format!("ch{c}"));
        assert!(s["session_id"].as_str().unwrap().starts_with(&format!("ch{c}-")), "{s:#}");
    }
}

#[test]
fn the_session_round_trips_and_history_reset_and_gc_work() {
    let Some((env, store)) = setup() else { return };
    assert_eq!(sql(&store, "SELECT to_regclass('chan_run_channel') IS NULL"), "t");
    env.command().arg("status").assert().code(0).stdout("no channels yet\n");
    assert_eq!(sql(&store, "SELECT to_regclass('chan_run_channel') IS NULL"), "t", "status creates nothing");

    env.run(&["-c", "s"], &sh(r#"echo '{"session_id":"abc"}'"#)).assert().code(0);
    let out = env
        .run(&["-c", "s", "--session-arg", "--resume"], &sh(r#"echo "$CHAN_RUN_SESSION_ID $0 $*""#))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "abc --resume abc\n");
    let history = env.command().args(["history", "s", "--json"]).output().unwrap();
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&history.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (lines[1]["session_before"].is_null(), lines[1]["session_after"].as_str()),
        (true, Some("abc"))
    );
    // The history keeps the newest 1000 runs: 1501 old ones, then one more run.
    sql(
        &store,
        "INSERT INTO chan_run_history SELECT id, g, '{}' FROM chan_run_channel, generate_series(-1500, 0) g WHERE channel = 's'",
    );
    env.run(&["-c", "s"], &["true"]).assert().code(0);
    assert_eq!(sql(&store, "SELECT count(*), min(run_no), max(run_no) FROM chan_run_history"), "1000|-996|3");

    env.command().args(["reset", "s"]).assert().code(0);
    assert!(status(&env, "s")["session_id"].is_null());
    assert_eq!(status(&env, "s")["runs"], 3, "a reset is not a run");

    let holder = env.hold("busy", "held", "go");
    let gc = env.command().args(["gc", "--idle-for", "0"]).output().unwrap();
    let text = String::from_utf8_lossy(&gc.stdout);
    assert!(text.contains("removed s ") && text.contains("kept busy"), "{text}");
    assert_eq!(sql(&store, "SELECT count(*) FROM chan_run_history"), "0");
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    assert_eq!(sql(&store, "SELECT string_agg(channel, ',') FROM chan_run_channel"), "busy");
}

#[test]
fn status_names_the_holder_its_host_and_command_and_the_queue() {
    let Some((env, _store)) = setup() else { return };
    let holder = env.hold("st", "held", "go");
    let waiters = [enqueue(&env, "st", 0, None), enqueue(&env, "st", 1, None)];
    // The holder's command and pids are written by its first heartbeat, as the command starts.
    wait_until("the first beat to record the command", || {
        status(&env, "st")["holder"]["command_pid"].is_u64()
    });
    let s = status(&env, "st");
    assert_eq!(s["state"], "running");
    assert_eq!(s["holder"]["pid"], holder.pid());
    assert_eq!(s["holder"]["command"][0], "sh");
    assert!(!s["holder"]["host"].as_str().unwrap().is_empty());
    let command_pid = s["holder"]["command_pid"].as_u64().unwrap() as u32;
    assert!(is_alive(command_pid));
    assert_eq!(s["waiting"], 2);
    assert_eq!(queued_pids(&env, "st"), waiters.iter().map(Running::pid).collect::<Vec<_>>());
    let table = env.command().arg("status").output().unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains(&format!("running  {}", holder.pid())));
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    for w in waiters {
        w.finish(PATIENCE).assert_code(0);
    }
    let s = status(&env, "st");
    assert_eq!(
        (s["state"].as_str(), s["holder"].is_null(), s["runs"].as_u64()),
        (Some("idle"), true, Some(3))
    );
}

#[test]
fn a_sigkilled_holder_hands_on_within_a_second_to_a_higher_fence() {
    let Some((env, _store)) = setup() else { return };
    let holder = env.spawn(
        &["-c", "k"],
        &sh(r#"echo "$CHAN_RUN_FENCE" > "$T/f1.tmp"; mv "$T/f1.tmp" "$T/f1"; sleep 60"#),
    );
    env.wait_for_file("f1");
    let next = enqueue(&env, "k", 0, None);
    let killed_at = Instant::now();
    holder.signal(Signal::KILL);
    drop(holder);
    wait_until("the next caller to run", || env.exists("order"));
    let took = killed_at.elapsed();
    assert!(took < secs(1.0), "the next holder started {took:?} after the SIGKILL");
    next.finish(PATIENCE).assert_code(0);
    let after = env.run(&["-c", "k"], &sh(r#"echo "$CHAN_RUN_FENCE""#)).output().unwrap();
    let f2: i64 = String::from_utf8_lossy(&after.stdout).trim().parse().unwrap();
    assert!(
        f2 > fence_of(&env, "f1") + 1,
        "fences {} then {f2}: two holders came between",
        fence_of(&env, "f1")
    );
}

#[test]
fn a_holder_whose_connection_dies_stops_its_command_and_exits_lock_lost() {
    let Some((env, store)) = setup() else { return };
    let holder = env.spawn(
        &["-c", "hb", "-k", "30s"],
        &sh(r#"trap 'echo term > "$T/term"; exit 0' TERM; started held; while :; do sleep 0.05; done"#),
    );
    env.wait_for_file("held");
    sql(&store, &format!("SELECT pg_terminate_backend(backend) FROM {LEASE} WHERE channel = 'hb'"));
    let out = holder.finish(PATIENCE);
    out.assert_code(122);
    assert!(env.exists("term"), "the command got SIGTERM");
    assert!(out.stderr().contains("lost channel hb's lock"), "{}", out.stderr());
    assert!(out.elapsed < secs(12.0), "{:?}", out.elapsed);
    assert_eq!(status(&env, "hb")["runs"], 0, "a run that lost its lock is not recorded");
}

#[test]
fn a_stale_holders_final_write_is_refused() {
    let Some((env, store)) = setup() else { return };
    env.run(&["-c", "st"], &sh(r#"echo '{"session_id":"s0"}'"#)).assert().code(0);
    // The command plays the split brain: another holder's grant moves the fence on
    // while this one still runs.
    let bump = format!(
        "psql -X -q -v ON_ERROR_STOP=1 '{store}' -c \"UPDATE chan_run_channel SET fence = nextval('chan_run_fence') WHERE channel = 'st'\" && echo '{{\"session_id\":\"stale\"}}'"
    );
    let out = env.run(&["-c", "st"], &sh(&bump)).output().unwrap();
    assert_eq!(out.status.code(), Some(122), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lock lost, state not written") && stderr.contains("ended with 0"), "{stderr}");
    let s = status(&env, "st");
    assert_eq!((s["session_id"].as_str(), s["runs"].as_u64()), (Some("s0"), Some(1)), "{s:#}");
}

#[test]
fn an_interrupted_or_impatient_waiter_leaves_the_queue_at_once() {
    let Some((env, _store)) = setup() else { return };
    let holder = env.hold("q", "held", "go");
    let waiter = enqueue(&env, "q", 0, None);
    waiter.signal(Signal::INT);
    waiter.finish(PATIENCE).assert_code(130);
    assert_eq!(queued_pids(&env, "q"), Vec::<u32>::new(), "the server forgot the waiter");
    let out = env.run(&["-c", "q", "-w", "0.3"], &["true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(75));
    assert_eq!(queued_pids(&env, "q"), Vec::<u32>::new());
    // A killed waiter cannot cancel; the server notices its closed socket.
    let killed = enqueue(&env, "q", 1, None);
    killed.signal(Signal::KILL);
    drop(killed);
    wait_until("the server to drop the killed waiter", || queued_pids(&env, "q").is_empty());
    let last = enqueue(&env, "q", 2, None);
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    last.finish(PATIENCE).assert_code(0);
    assert_eq!(env.order(), [2]);
}

#[test]
fn a_server_stopped_mid_run_stops_the_command_and_fences_stay_monotonic() {
    let Some(server) = pg::PrivateServer::start("stop") else { return };
    let store = pg::fresh_store(server.url());
    let env = TestEnv::with_store(&store);
    env.run(&["-c", "x"], &sh(r#"echo "$CHAN_RUN_FENCE" > "$T/f0""#)).assert().code(0);
    let holder = env.spawn(
        &["-c", "x", "-k", "30s"],
        &sh(r#"trap 'echo term > "$T/term"; exit 0' TERM; started held; while :; do sleep 0.05; done"#),
    );
    env.wait_for_file("held");
    server.stop();
    let out = holder.finish(PATIENCE);
    out.assert_code(122);
    assert!(env.exists("term"), "the command was stopped");
    server.start_again();
    env.run(&["-c", "x"], &sh(r#"echo "$CHAN_RUN_FENCE" > "$T/f2""#)).assert().code(0);
    assert!(
        fence_of(&env, "f2") > fence_of(&env, "f0") + 1,
        "the cut-off run's fence is never handed out again"
    );
    assert_eq!(status(&env, "x")["runs"], 2);
}

#[test]
fn bad_store_urls_exit_125_unreachable_servers_69_newer_schemas_125_with_one_line() {
    let env = TestEnv::new();
    for (url, code, says) in [
        ("mysql://u@h/db", 125, "use postgres://USER@HOST"),
        ("postgres://u@h:notaport/db", 125, "port \"notaport\" is not a port number"),
        (
            "postgres://postgres@127.0.0.1:1/nothing",
            69,
            "cannot connect to PostgreSQL at 127.0.0.1:1/nothing",
        ),
    ] {
        let out = env.command().args(["--store", url, "run", "-c", "a", "--", "true"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{url}: {stderr}");
        assert!(stderr.contains(says) && stderr.lines().count() == 1, "{url}: {stderr}");
    }
    let Some((env, store)) = setup() else { return };
    env.run(&["-c", "a"], &["true"]).assert().code(0);
    sql(&store, "UPDATE chan_run_meta SET version = 99");
    let out = env.run(&["-c", "a"], &["true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("newer chan-run"));
}

#[test]
fn tls_is_used_and_the_servers_certificate_checked_when_the_url_asks() {
    let Some(server) = pg::PrivateServer::start("tls") else { return };
    let ca = server.tls();
    let store = pg::fresh_store(server.url());
    let env = TestEnv::with_store(&format!("{store}&sslmode=verify-full&sslrootcert={ca}"));
    env.run(&["-c", "t"], &sh(r#"echo '{"session_id":"over-tls"}'"#)).assert().code(0);
    assert_eq!(status(&env, "t")["session_id"], "over-tls");
    // Leaving the queue sends the cancel request over TLS too.
    let holder = env.hold("t", "held", "go");
    let waiter = enqueue(&env, "t", 0, None);
    waiter.signal(Signal::INT);
    waiter.finish(PATIENCE).assert_code(130);
    assert_eq!(queued_pids(&env, "t"), Vec::<u32>::new());
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);

    // Without the CA the certificate cannot be checked: refused, and nothing runs.
    let unchecked = TestEnv::with_store(&format!("{store}&sslmode=require"));
    let out = unchecked.run(&["-c", "t"], &sh("started ran")).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("certificate") && stderr.contains("sslrootcert"), "{stderr}");
    assert!(!unchecked.exists("ran"));
    // The server now refuses plain TCP: the runs above went over TLS.
    let plain = TestEnv::with_store(&store);
    let out = plain.run(&["-c", "t"], &["true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no encryption"));
}

#[test]
fn a_host_name_is_looked_up_and_the_systems_certificate_store_trusted() {
    // What the static build does without glibc's NSS and with no CA named in the URL:
    // `localhost` looked up (/etc/hosts), the server's certificate checked against that
    // name, and its CA found in the system's store, here through SSL_CERT_FILE.
    let Some(server) = pg::PrivateServer::start("tls-name") else { return };
    let ca = server.tls();
    let store = pg::fresh_store(server.url()).replacen("@127.0.0.1:", "@localhost:", 1);
    assert!(store.contains("@localhost:"), "{store}");
    let env = TestEnv::with_store(&format!("{store}&sslmode=verify-full"));
    let out = env
        .run(&["-c", "n"], &sh(r#"echo '{"session_id":"by-name"}'"#))
        .env("SSL_CERT_FILE", &ca)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let out = env.command().args(["status", "--json", "n"]).env("SSL_CERT_FILE", &ca).output().unwrap();
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(all["channels"][0]["session_id"], "by-name");
    // The same URL without the CA in the store: the certificate cannot be checked.
    let empty = env.path("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let out = env.run(&["-c", "n"], &sh("started ran")).env("SSL_CERT_FILE", &empty).output().unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!env.exists("ran"));
}

#[test]
fn what_a_sigkilled_holder_left_on_this_host_is_killed_by_the_next_holder() {
    let Some((env, _store)) = setup() else { return };
    let holder = env.spawn(&["-c", "o"], &sh(r#"sleep 300 & echo $! > "$T/grandchild"; started held; wait"#));
    env.wait_for_file("held");
    let grandchild = env.read_pid("grandchild");
    let _cleanup = KillOnDrop(vec![grandchild]);
    wait_until("the first beat to record the command", || {
        status(&env, "o")["holder"]["command_pid"].is_u64()
    });
    holder.signal(Signal::KILL);
    drop(holder);
    // The command's leader dies with chan-run (PR_SET_PDEATHSIG); its child, in the
    // same process group, lives on until the next holder on this host cleans up.
    assert!(is_alive(grandchild), "the leftover outlived its chan-run");
    env.run(&["-c", "o"], &["true"]).assert().code(0);
    assert!(!is_alive(grandchild), "the next holder killed the leftover");
}

#[test]
fn an_older_schema_is_migrated_in_place_and_keeps_its_data() {
    let Some((env, store)) = setup() else { return };
    env.run(&["-c", "m"], &sh(r#"echo '{"session_id":"kept"}'"#)).assert().code(0);
    // Back to schema version 1, as an older chan-run left it.
    sql(
        &store,
        "DROP TABLE chan_run_pool_ledger, chan_run_message, chan_run_seat, chan_run_pool; DROP TABLE chan_run_lease; \
         ALTER TABLE chan_run_history DROP COLUMN dead_no, ADD PRIMARY KEY (channel_id, run_no); ALTER TABLE chan_run_channel ADD COLUMN holder_host text, \
         ADD COLUMN holder_pid int, ADD COLUMN holder_backend int, ADD COLUMN holder_since timestamptz, \
         ADD COLUMN holder_command jsonb, ADD COLUMN holder_command_pid int, ADD COLUMN heartbeat timestamptz; \
         UPDATE chan_run_meta SET version = 1",
    );
    env.run(&["-c", "m"], &sh(r#"echo "$CHAN_RUN_SESSION_ID""#)).assert().code(0).stdout("kept\n");
    assert_eq!(sql(&store, "SELECT version FROM chan_run_meta"), "6");
    assert_eq!(status(&env, "m")["runs"], 2);
}
