//! The PostgreSQL store's central promise (src/store/postgres/heartbeat.rs, step 5): a holder cut
//! off from the server by the network stops its command before the server can drop the
//! holder's session and hand the lock to a caller on another host. The holder runs in a
//! network namespace of the test's own, joined to this host by a veth pair; the cut then
//! makes every packet between the two vanish, both ways, as a dead link would: neither
//! side gets an error or a reset, each learns only from its own timeouts. Needs root and
//! `ip netns` (iproute2); skipped, loudly, elsewhere.

use crate::common::*;
use crate::postgres::LEASE;
use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A network namespace joined to this host by a veth pair, each end with its address in
/// a /30 of 10.201.0.0/16 that no interface here uses yet; removed on drop.
struct Link {
    ns: String,
    host_dev: String,
    ns_dev: String,
    host_addr: String,
    ns_addr: String,
}

impl Link {
    /// A new link, or `None` (after saying why) where the machine does not allow one.
    fn new() -> Option<Link> {
        if !rustix::process::geteuid().is_root() {
            skip("not root");
            return None;
        }
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let ns = format!("chan-run-part-{pid}-{n}");
        // Interface names have at most 15 bytes; a pid at most 7 digits.
        let (host_dev, ns_dev) = (format!("cr{pid}x{n}h"), format!("cr{pid}x{n}n"));
        let (host_addr, ns_addr) = free_subnet(pid * 8 + n)?;
        if let Err(err) = ip(&["netns", "add", &ns]) {
            skip(&format!("cannot add a network namespace ({err})"));
            return None;
        }
        let link = Link { ns, host_dev, ns_dev, host_addr, ns_addr };
        let (ns, host, peer) = (link.ns.as_str(), link.host_dev.as_str(), link.ns_dev.as_str());
        let setup: &[&[&str]] = &[
            &["link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns],
            &["addr", "add", &format!("{}/30", link.host_addr), "dev", host],
            &["link", "set", host, "up"],
        ];
        let ns_setup: &[&[&str]] = &[
            &["addr", "add", &format!("{}/30", link.ns_addr), "dev", peer],
            &["link", "set", peer, "up"],
            &["link", "set", "lo", "up"],
        ];
        let steps = setup.iter().map(|a| (None, a)).chain(ns_setup.iter().map(|a| (Some(ns), a)));
        for (ns, args) in steps {
            if let Err(err) = ip_in(ns, args) {
                skip(&format!("cannot set up a veth pair into a network namespace ({err})"));
                return None;
            }
        }
        Some(link)
    }

    /// The script's `LISTEN` for a server on this host's end.
    fn listen(&self) -> String {
        format!("{}/30", self.host_addr)
    }

    /// `PROGRAM` to be run inside the namespace.
    fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, program]);
        cmd
    }

    /// From now on every packet either end sends is lost without a trace: each end's
    /// neighbour entry for the other now names a MAC address nobody has, so frames still
    /// leave (no local error, as with a link set down or a firewall's reject) and the
    /// receiving end discards them as addressed to another host (no ICMP, no RST).
    fn cut(&self) {
        const NOBODY: &str = "02:00:00:00:00:01";
        for (ns, addr, dev) in
            [(None, &self.ns_addr, &self.host_dev), (Some(&self.ns), &self.host_addr, &self.ns_dev)]
        {
            let args = ["neigh", "replace", addr, "dev", dev, "lladdr", NOBODY, "nud", "permanent"];
            ip_in(ns.map(String::as_str), &args).unwrap_or_else(|err| panic!("cutting the link: {err}"));
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        let _ = ip(&["link", "del", &self.host_dev]);
        if let Err(err) = ip(&["netns", "del", &self.ns]) {
            eprintln!("could not remove network namespace {}: {err}", self.ns);
        }
    }
}

/// Host and namespace addresses of a /30 in 10.201.0.0/16 that no interface here has
/// (another test run's, say), starting from `seed`.
fn free_subnet(seed: u32) -> Option<(String, String)> {
    let used = match Command::new("ip").args(["-o", "-4", "addr", "show"]).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => {
            skip("`ip -4 addr show` does not work (is iproute2 installed?)");
            return None;
        }
    };
    let free = (0..64u32).map(|i| (seed + i * 97) % 16384).find_map(|block| {
        let base = block * 4;
        let addr = |host: u32| format!("10.201.{}.{}", base / 256, base % 256 + host);
        (!used.contains(&format!(" {}/", addr(1)))).then(|| (addr(1), addr(2)))
    });
    if free.is_none() {
        skip("no free /30 in 10.201.0.0/16 found");
    }
    free
}

fn ip(args: &[&str]) -> Result<(), String> {
    ip_in(None, args)
}

/// `ip ARGS` in the network namespace `ns`, or in this host's.
fn ip_in(ns: Option<&str>, args: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    let out = cmd.args(args).output().map_err(|err| format!("cannot run ip: {err}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let netns = ns.map(|ns| format!("-n {ns} ")).unwrap_or_default();
        Err(format!("ip {netns}{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Says on the real stderr (the harness captures `eprintln!`) that the test is skipped.
fn skip(reason: &str) {
    let _ = writeln!(std::io::stderr(), "\n=== SKIPPED: network partition test: {reason} ===\n");
}

/// Seconds since the epoch, as `date +%s.%N` in the commands writes them.
fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The timestamp on the first line of `$T/NAME`.
fn stamp(env: &TestEnv, name: &str) -> f64 {
    let text = env.read(name);
    text.lines().next().and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("$T/{name}: {text:?}"))
}

#[test]
fn a_holder_cut_off_by_the_network_stops_its_command_before_the_server_hands_the_lock_on() {
    let Some(link) = Link::new() else { return };
    let Some(server) = pg::PrivateServer::start_listening("part", Some(&link.listen())) else { return };
    let store = pg::fresh_store(server.url());
    let remote = store.replacen("@127.0.0.1:", &format!("@{}:", link.host_addr), 1);
    assert_ne!(remote, store, "the store URL names 127.0.0.1");
    let env = TestEnv::with_store(&store);
    let sql = |query: &str| pg::psql(&store, query);

    // The holder, on the far side. Its command notes the SIGTERM and carries on, so that
    // chan-run has to SIGKILL it: the slowest stop there is.
    let mut cmd = link.exec(&BIN);
    env.apply(&mut cmd);
    cmd.env("CHAN_RUN_STORE", &remote).args(["run", "-c", "part", "--"]).args(sh(
        r#"echo "$CHAN_RUN_FENCE" > "$T/f1"; echo $$ > "$T/pid.tmp"; mv "$T/pid.tmp" "$T/pid"
           trap 'date +%s.%N > "$T/term.tmp"; mv "$T/term.tmp" "$T/term"' TERM
           while :; do sleep 0.05; done"#,
    ));
    let mut holder = Running::start(cmd);
    let command_pid = env.read_pid("pid");
    let backend = sql(&format!("SELECT backend FROM {LEASE} WHERE channel = 'part'"));
    assert_eq!(
        sql(&format!("SELECT client_addr FROM pg_stat_activity WHERE pid = {backend}")),
        link.ns_addr,
        "the holder talks to the server over the link"
    );

    // The next caller, on this side, queued behind it.
    let next = env.spawn(
        &["-c", "part"],
        &sh(r#"{ date +%s.%N; if alive "$(cat "$T/pid")"; then echo alive; else echo gone; fi
               echo "$CHAN_RUN_FENCE"; } > "$T/next.tmp"; mv "$T/next.tmp" "$T/next""#),
    );
    wait_until("the next caller to queue", || {
        sql(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND classid = 'chan_run_channel'::regclass",
        ) == "1"
    });

    // Anywhere between two beats.
    let phase = secs(f64::from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos()) * 2e-9);
    std::thread::sleep(phase);
    let cut = now();
    link.cut();
    let (mut holder_exit, mut last_heard) = (None, None);
    while !env.exists("next") {
        let t = now();
        assert!(t - cut < 40.0, "nobody got the lock within 40 s of the cut");
        if holder_exit.is_none() && !holder.is_running() {
            holder_exit = Some(t);
            // The holder's last beat that reached the server; none can arrive any more.
            last_heard = Some(sql(&format!(
                "SELECT extract(epoch FROM heartbeat)::float8 FROM {LEASE} WHERE channel = 'part'"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    // Both were started more than 20 s ago, and finish's bound counts from the start.
    let out = holder.finish(secs(60.0));
    out.assert_code(122);
    assert!(out.stderr().contains("lost channel part's lock"), "{}", out.stderr());
    next.finish(secs(60.0)).assert_code(0);
    let next_text = env.read("next");
    let next_lines: Vec<&str> = next_text.lines().collect();
    let (next_start, term) = (stamp(&env, "next"), stamp(&env, "term"));
    let holder_exit = holder_exit.expect("the holder exited before the next caller started");
    let last_heard: f64 = last_heard.unwrap().parse().unwrap();
    // The server gave up on silence (its keepalives and tcp_user_timeout), not on a reset;
    // its log says when.
    let log = server.log();
    let timed_out = format!("[{backend}] LOG:  could not receive data from client: Connection timed out");
    let line = log.lines().find(|l| l.contains(&timed_out));
    let line = line.unwrap_or_else(|| panic!("the server log does not say {timed_out:?}:\n{log}"));
    let logged_at = line.split(" [").next().unwrap();
    let dropped: f64 =
        sql(&format!("SELECT extract(epoch FROM timestamptz '{logged_at}')::float8")).parse().unwrap();
    eprintln!(
        "partition: from the cut (the last beat the server heard {:+.2} s): SIGTERM {:.2} s, holder exit {:.2} s, \
         server drops the session {:.2} s, next caller starts {:.2} s ({:.2} s after the last beat heard, \
         {:.2} s after the holder's exit)",
        last_heard - cut,
        term - cut,
        holder_exit - cut,
        dropped - cut,
        next_start - cut,
        next_start - last_heard,
        next_start - holder_exit,
    );

    assert_eq!(next_lines.get(1), Some(&"gone"), "the cut-off command was still alive: {next_text:?}");
    assert!(!is_alive(command_pid));
    let (f1, f2): (i64, i64) = (env.read("f1").trim().parse().unwrap(), next_lines[2].parse().unwrap());
    assert!(f2 > f1, "fences {f1} then {f2}");
    // BEAT + CLIENT_GIVES_UP_AFTER, then + LOCK_LOST_GRACE: about 7 s and 10 s after the
    // last good beat, which came before the cut.
    assert_between(secs(term - cut), secs(0.5), secs(12.0));
    assert!(holder_exit - cut < 15.0, "the holder exited {:.2} s after the cut", holder_exit - cut);
    assert!(
        next_start - holder_exit > 3.0,
        "the next caller started only {:.2} s after the cut-off holder exited",
        next_start - holder_exit
    );
    // SERVER_DROPS_AFTER (20 s) counts from the last packet the server had from the holder.
    assert!(
        dropped - last_heard > 15.0,
        "the server dropped the session {:.2} s after the last beat it heard",
        dropped - last_heard
    );
    assert!(next_start >= dropped - 0.01, "the next caller started before the server dropped the holder");
}
