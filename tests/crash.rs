//! chan-run SIGKILLed at random moments (SPEC `run` items 1, 2 and 8): while it starts
//! (before it has the lock), while it waits in the queue, while its command runs, and
//! around the state write after the command has exited. After every kill:
//!
//! - FREE: within 1 s of the killed chan-run's death (or, when it died waiting, of the
//!   end of the test's own run that held the channel meanwhile: until then `-n` is busy
//!   and the lock file names that holder) a `--no-wait` run gets to start its command.
//! - GONE: once that next run's command has started, no process of the killed run is
//!   alive. Each killed run gets a unique `CRASH_TAG` in its environment, which all its
//!   descendants inherit; a scan of /proc finds none of them alive.
//! - PARSES: `active.json` parses with serde_json as a whole, and no run ever found it
//!   damaged (no `active.json.corrupt-*`).
//! - COUNTED: for every channel, `finished <= runs <= finished + killed_after_its_command`,
//!   where `finished` counts the runs whose exit code the test observed (a run killed
//!   after its command exited may or may not have been recorded; no other may be).
//! - CLEAN: once that next run has ended, its channel has no queue tickets and no holder
//!   record left.
//!
//! The moments come from a seeded RNG; the seed is printed, and `CHAN_RUN_SEED=N`
//! replays a sequence. 30 kills by default, 200 with `CHAN_RUN_HEAVY=1`.

use crate::common::*;
use rustix::process::Signal;
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// A random moment in the first few ms: start-up, registration, lock, spawn.
    Startup,
    /// Queued behind a holder, before or after its ticket is written.
    Waiting,
    /// Its command (a shell with a background grandchild) is running.
    Running,
    /// Its command has exited (or is about to): the drain, the state write, the release.
    Recording,
}

const PHASES: [Phase; 4] = [Phase::Startup, Phase::Waiting, Phase::Running, Phase::Recording];

/// The command of a run killed in its `Running` phase: the shell gets the parent-death
/// signal, its background `sleep` does not; only the next holder can clean that up.
fn long_command(marker: &str) -> Vec<String> {
    sh(&format!("sleep 60 & started {marker}; wait"))
}

/// A command that exits at once after printing a session id of `len` bytes: records
/// grow, and move to bigger slots (a whole-file rewrite), at random.
fn short_command(marker: &str, len: usize) -> Vec<String> {
    sh(&format!(r#"started {marker}; printf '{{"session_id":"%s"}}\n' "{}""#, "s".repeat(len)))
}

#[derive(Default)]
struct Tally {
    /// Runs whose exit code the test saw, per channel.
    finished: BTreeMap<String, u64>,
    /// Runs killed after their command exited (may have been recorded), per channel.
    maybe: BTreeMap<String, u64>,
    kills: BTreeMap<Phase, u64>,
    /// Startup-phase victims killed before their command had started.
    startup_before_command: u64,
    /// Recording-phase victims that finished before the kill landed.
    exited_first: u64,
    /// Recording-phase victims killed after their record was written.
    recorded_then_killed: u64,
    /// Next runs that found the channel still busy (and retried within the second).
    busy_probes: u64,
    slowest_free: Duration,
}

impl Tally {
    fn finished(&mut self, channel: &str) {
        *self.finished.entry(channel.to_owned()).or_default() += 1;
    }

    fn total_kills(&self) -> u64 {
        self.kills.values().sum()
    }
}

struct Crash {
    env: TestEnv,
    rng: Rng,
    seed: u64,
    tally: Tally,
}

impl Crash {
    fn spawn_victim(&self, channel: &str, tag: &str, command: &[String]) -> Running {
        let mut cmd = self.env.std_run(&["-c", channel], command);
        cmd.env("CRASH_TAG", tag);
        Running::start(cmd)
    }

    /// Time from a short command's marker to chan-run's exit, for `Recording` kills.
    fn calibrate(&mut self, channels: &[String]) -> Duration {
        let mut samples: Vec<Duration> = (0..8)
            .map(|i| {
                let channel = &channels[i % channels.len()];
                let marker = format!("calibrate-{i}");
                let run = self.spawn_victim(channel, "calibrate", &short_command(&marker, 40));
                wait_for_path_fast(&self.env.path(&marker));
                let seen = Instant::now();
                run.finish(PATIENCE).assert_code(0);
                self.tally.finished(channel);
                seen.elapsed()
            })
            .collect();
        samples.sort();
        samples[samples.len() / 2].clamp(Duration::from_millis(2), Duration::from_millis(40))
    }

    fn round(&mut self, round: u64, phase: Phase, channel: &str, window: Duration) {
        let env = &self.env;
        let tag = format!("{}-{round}", std::process::id());
        let ctx = format!("seed {}, round {round}, {phase:?} on {channel:?}", self.seed);
        let marker = format!("in-{round}");
        let before = runs_in(state_json(env).as_ref(), channel);
        let mut holder = None;
        let victim = match phase {
            Phase::Startup => {
                let victim = self.spawn_victim(channel, &tag, &long_command(&marker));
                std::thread::sleep(self.rng.duration_up_to(Duration::from_millis(6)));
                victim
            }
            Phase::Waiting => {
                holder = Some(env.hold(channel, &format!("held-{round}"), &format!("go-{round}")));
                let victim = self.spawn_victim(channel, &tag, &long_command(&marker));
                if self.rng.chance(1, 2) {
                    env.wait_for_tickets(channel, 1);
                }
                std::thread::sleep(self.rng.duration_up_to(Duration::from_millis(3)));
                victim
            }
            Phase::Running => {
                let victim = self.spawn_victim(channel, &tag, &long_command(&marker));
                wait_for_path_fast(&env.path(&marker));
                std::thread::sleep(self.rng.duration_up_to(Duration::from_millis(20)));
                victim
            }
            Phase::Recording => {
                let len = self.rng.between(1, 1000) as usize;
                let victim = self.spawn_victim(channel, &tag, &short_command(&marker, len));
                wait_for_path_fast(&env.path(&marker));
                std::thread::sleep(self.rng.duration_up_to(window));
                victim
            }
        };
        victim.signal(Signal::KILL);
        let out = victim.finish(PATIENCE);
        let mut since = Instant::now();
        let killed = match out.status.signal() {
            Some(9) => true,
            Some(other) => panic!("{ctx}: chan-run died of signal {other}"),
            None => {
                assert_eq!(phase, Phase::Recording, "{ctx}: chan-run ended on its own: {out:?}");
                out.assert_code(0);
                false
            }
        };

        // PARSES, and COUNTED for the victim.
        let after = runs_in(state_json(env).as_ref(), channel);
        assert!(
            quarantined(env).is_empty(),
            "{ctx}: a run found active.json damaged: {:?}",
            quarantined(env)
        );
        if killed {
            *self.tally.kills.entry(phase).or_default() += 1;
            self.tally.startup_before_command += u64::from(phase == Phase::Startup && !env.exists(&marker));
            if phase == Phase::Recording {
                *self.tally.maybe.entry(channel.to_owned()).or_default() += 1;
                self.tally.recorded_then_killed += u64::from(after == before + 1);
                assert!(after == before || after == before + 1, "{ctx}: runs went from {before} to {after}");
            } else {
                assert_eq!(after, before, "{ctx}: a run killed before its command ended was counted");
            }
        } else {
            self.tally.exited_first += 1;
            self.tally.finished(channel);
            assert_eq!(after, before + 1, "{ctx}: a finished run was not counted");
        }

        if let Some(holder) = holder {
            // Until the holder ends, the channel is legitimately busy: `-n` says so, and
            // the lock file names the holder. Once it ends, FREE below must hold.
            let record = env.holder_record(channel).expect("the holder's record");
            assert_eq!(record["pid"], holder.pid(), "{ctx}: who holds the channel");
            env.run(&["-c", channel, "-n"], &["true"]).assert().code(75);
            env.open_gate(&format!("go-{round}"));
            holder.finish(PATIENCE).assert_code(0);
            self.tally.finished(channel);
            since = Instant::now();
        }

        // FREE and GONE.
        let (freed, busy) = next_run_starts(env, channel, &tag, since, round, &ctx);
        self.tally.busy_probes += busy;
        self.tally.slowest_free = self.tally.slowest_free.max(freed);
        self.tally.finished(channel);

        // COUNTED, every channel; CLEAN.
        let state = state_json(env);
        for (ch, &finished) in &self.tally.finished {
            let runs = runs_in(state.as_ref(), ch);
            let maybe = self.tally.maybe.get(ch).copied().unwrap_or(0);
            assert!(
                finished <= runs && runs <= finished + maybe,
                "{ctx}: channel {ch:?} has runs {runs}; finished {finished}, maybe {maybe}"
            );
        }
        assert_eq!(env.tickets(channel), 0, "{ctx}: tickets left in the queue");
        env.assert_released(channel, channel);
    }
}

/// Starts `-n` runs on `channel` until one gets to start its command (failing if
/// that takes 1 s from `since`), then checks that nothing tagged `tag` is alive.
/// Returns how long that took and how many found the channel still busy.
fn next_run_starts(
    env: &TestEnv,
    channel: &str,
    tag: &str,
    since: Instant,
    round: u64,
    ctx: &str,
) -> (Duration, u64) {
    // `busy`: attempts so far, each of which found the channel still busy.
    for busy in 0.. {
        let marker = format!("next-{round}-{busy}");
        let gate = format!("next-go-{round}");
        let mut run = env.spawn(&["-c", channel, "-n"], &sh(&format!("started {marker}; gate {gate}")));
        wait_until(&format!("{ctx}: the next run to start or end"), || {
            env.exists(&marker) || !run.is_running()
        });
        if env.exists(&marker) {
            let freed = since.elapsed();
            assert!(freed < secs(1.0), "{ctx}: the channel was free only after {freed:?}");
            let left = processes_with_env("CRASH_TAG", tag);
            assert!(left.is_empty(), "{ctx}: processes of the killed run alive: {left:?}");
            env.open_gate(&gate);
            run.finish(PATIENCE).assert_code(0);
            return (freed, busy);
        }
        let out = run.finish(PATIENCE);
        assert_eq!(out.code(), 75, "{ctx}: the next run: {}", out.stderr());
        assert!(since.elapsed() < secs(1.0), "{ctx}: the channel was still busy after 1 s");
    }
    unreachable!()
}

#[test]
fn sigkill_at_random_moments_loses_nothing_and_leaks_nothing() {
    // The invariants FREE, GONE, PARSES, COUNTED and CLEAN of the module doc, checked
    // after every kill; the tally counts the kills by phase and what they hit.
    let seed = Rng::seed();
    eprintln!("crash: seed {seed} (CHAN_RUN_SEED={seed} replays it)");
    let target = scaled(30, 200) as u64;
    let mut crash = Crash { env: TestEnv::new(), rng: Rng::new(seed), seed, tally: Tally::default() };
    let channels: Vec<String> = (0..4).map(|i| format!("c{i}")).collect();
    let window = crash.calibrate(&channels);
    let started = Instant::now();
    let mut round = 0;
    while crash.tally.total_kills() < target {
        round += 1;
        let phase = PHASES[round as usize % PHASES.len()];
        // Now and then a channel new to active.json: its record is appended.
        let channel = match crash.rng.chance(1, 8) {
            true => format!("new-{round}"),
            false => channels[crash.rng.below(4) as usize].clone(),
        };
        crash.round(round, phase, &channel, window);
    }
    let t = &crash.tally;
    let stray = stray_temp_files(&crash.env);
    eprintln!(
        "crash: seed {seed}: {round} rounds, {} kills {:?} in {:?}; {} start-up kills before the command ran; \
         recording window {window:?}: \
         {} killed after their record was written, {} exited before the kill; \
         {} next runs found the channel busy and retried; slowest until free {:?}; \
         {} stray temp files of whole-file rewrites interrupted by a kill",
        t.total_kills(),
        t.kills,
        started.elapsed(),
        t.startup_before_command,
        t.recorded_then_killed,
        t.exited_first,
        t.busy_probes,
        t.slowest_free,
        stray.len(),
    );
    assert!(
        PHASES.iter().all(|p| t.kills.get(p).copied().unwrap_or(0) > 0),
        "every phase was hit: {:?}",
        t.kills
    );
}
