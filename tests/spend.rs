//! Spending (issue 15): cost and usage per run, `--budget`, `--pool-budget`, `--retry`,
//! a pool's shared cool-down and `status --prometheus`. Most tests use small scripts
//! shaped like claude's recorded output (fast, deterministic); the `real_claude` ones
//! drive the real CLI against the project's mock API (see tests/profiles.rs), and
//! print a notice and pass where it is not installed.

use crate::common::state::*;
use crate::common::{PATIENCE, Running, TestEnv, assert_between, secs, wait_until};
use crate::postgres_pools::on_host;
use crate::profiles::{Mock, claude_cmd, real_claude};
use serde_json::Value;
use std::time::{Duration, Instant};

const OVERLOADED: &str = r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":529,"result":"API Error: 529 overloaded_error.","session_id":"s-529","total_cost_usd":0,"usage":{"input_tokens":0,"output_tokens":0}}"#;
const BAD_REQUEST: &str = r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":400,"result":"API Error: 400 invalid_request_error","session_id":"s-400","total_cost_usd":0}"#;

/// A stand-in for `claude -p hi --output-format json`: notes each call in `$T/calls`
/// (with the `CLAUDE_CODE_MAX_RETRIES` it got), answers the first `fails` calls with
/// `failure` (exit 1), then with a result costing `cost`.
fn fake_claude(fails: usize, failure: &str, cost: f64) -> Vec<String> {
    let ok = format!(
        r#"{{"type":"result","subtype":"success","is_error":false,"session_id":"s-ok","num_turns":1,"result":"hi","total_cost_usd":{cost},"usage":{{"input_tokens":10,"output_tokens":5,"service_tier":"standard"}},"modelUsage":{{"claude-opus":{{"costUSD":{cost}}}}}}}"#
    );
    let script = format!(
        r#"echo "call ${{CLAUDE_CODE_MAX_RETRIES-unset}}" >> "$T/calls"
if [ "$(wc -l < "$T/calls")" -le {fails} ]; then printf '%s\n' '{failure}'; exit 1; fi
printf '%s\n' '{ok}'"#
    );
    ["sh", "-c", &script, "claude", "-p", "hi", "--output-format", "json"].map(String::from).to_vec()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn calls(env: &TestEnv) -> Vec<String> {
    std::fs::read_to_string(env.path("calls")).unwrap_or_default().lines().map(str::to_owned).collect()
}

fn history(env: &TestEnv, channel: &str) -> Vec<Value> {
    let out = env.command().args(["history", "--json", channel]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn channel_of(status: &Value, name: &str) -> Value {
    let list = status["channels"].as_array().unwrap();
    list.iter().find(|c| c["channel"] == name).unwrap_or_else(|| panic!("no {name}: {status:#}")).clone()
}

fn pool_of(status: &Value, name: &str) -> Value {
    let list = status["pools"].as_array().unwrap();
    list.iter().find(|p| p["pool"] == name).unwrap_or_else(|| panic!("no pool {name}: {status:#}")).clone()
}

fn usd(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not an amount: {v}"))
}

#[test]
fn cost_and_usage_are_kept_per_run_and_summed_per_channel_and_pool() {
    let env = TestEnv::new();
    for channel in ["a", "a", "b"] {
        env.run(&["-c", channel, "--pool", "p:2"], &fake_claude(0, "", 0.25)).assert().success();
    }
    let codex = r#"{"type":"turn.completed","usage":{"input_tokens":100,"cached_input_tokens":80,"output_tokens":7}}"#;
    env.run(&["-c", "x"], &prints(codex)).assert().success();

    let status = status_json(&env, &[]);
    let a = channel_of(&status, "a");
    assert_eq!((usd(&a["cost_usd_today"]), usd(&a["cost_usd_total"])), (0.5, 0.5));
    assert_eq!(a["runs_by_kind"]["ok"], 2);
    assert_eq!(usd(&channel_of(&status, "b")["cost_usd_today"]), 0.25);
    let last = &a["last_run"];
    assert_eq!((usd(&last["cost_usd"]), &last["num_turns"]), (0.25, &1.into()));
    assert_eq!((&last["usage"]["input_tokens"], &last["usage"]["output_tokens"]), (&10.into(), &5.into()));
    assert!(last["usage"].get("service_tier").is_none(), "only the token counts are kept: {last}");
    assert_eq!(usd(&last["model_usage"]["claude-opus"]["costUSD"]), 0.25);
    let pool = pool_of(&status, "p");
    assert_eq!((usd(&pool["cost_usd_today"]), usd(&pool["cost_usd_total"])), (0.75, 0.75));
    assert_eq!(pool["cool_down"], Value::Null);

    let entries = history(&env, "a");
    assert_eq!(entries.len(), 2);
    for e in &entries {
        assert_eq!((usd(&e["cost_usd"]), &e["usage"]["output_tokens"]), (0.25, &5.into()), "{e}");
    }
    let table = text(&env.command().args(["history", "a"]).output().unwrap().stdout);
    assert!(table.lines().next().unwrap().contains("COST") && table.contains("$0.25"), "{table}");
    let x = channel_of(&status, "x");
    assert_eq!(x["last_run"]["usage"]["cached_input_tokens"], 80);
    assert!(x["last_run"].get("cost_usd").is_none() && usd(&x["cost_usd_total"]) == 0.0, "{x}");

    let table = text(&env.command().arg("status").output().unwrap().stdout);
    let today = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()[..10].to_owned();
    assert!(table.contains(&format!("TODAY ({today} UTC)")), "{table}");
    let spent = table.split("SPENT BY").nth(1).unwrap_or_else(|| panic!("{table}"));
    let row = |who: &str| {
        spent.lines().find(|l| l.starts_with(who)).unwrap_or_else(|| panic!("{table}")).to_owned()
    };
    assert!(row("a ").contains("$0.50") && row("pool p").contains("$0.75"), "{table}");
}

#[test]
fn a_budget_reached_mid_burst_starts_no_run_after_it() {
    let env = TestEnv::new();
    // $0.40 a run against $1.00 a day: runs start at $0, $0.40 and $0.80 spent; the
    // third overshoots by its own cost, and no run starts after it.
    let runs: Vec<_> =
        (0..6).map(|_| env.spawn(&["-c", "bot", "--budget", "1"], &fake_claude(0, "", 0.4))).collect();
    let outs: Vec<_> = runs.into_iter().map(|r| r.finish(PATIENCE)).collect();
    let codes: Vec<i32> = outs.iter().map(|o| o.code()).collect();
    assert_eq!(codes.iter().filter(|&&c| c == 0).count(), 3, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 77).count(), 3, "{codes:?}");
    assert_eq!(calls(&env).len(), 3);
    for out in outs.iter().filter(|o| o.code() == 77) {
        let stderr = out.stderr();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("channel bot: --budget reached: $1.20 of $1.00 spent today (UTC); resets at "),
            "{stderr}"
        );
        assert!(stderr.contains("T00:00:00Z (in ") && stderr.contains("nothing ran"), "{stderr}");
    }
    let bot = status_of(&env, "bot");
    assert_eq!((bot["runs"].as_u64(), usd(&bot["cost_usd_today"])), (Some(3), 1.2));
    // Another channel has its own budget.
    env.run(&["-c", "other", "--budget", "1"], &fake_claude(0, "", 0.4)).assert().success();
}

#[test]
fn a_pool_budget_is_shared_and_overshoots_by_the_runs_in_flight_at_most() {
    let env = TestEnv::new();
    let runs: Vec<_> = (0..6)
        .map(|i| {
            let channel = format!("c{i}");
            env.spawn(&["-c", &channel, "--pool", "p:2", "--pool-budget", "1"], &fake_claude(0, "", 0.4))
        })
        .collect();
    let outs: Vec<_> = runs.into_iter().map(|r| r.finish(PATIENCE)).collect();
    let ran = outs.iter().filter(|o| o.code() == 0).count();
    let refused: Vec<_> = outs.iter().filter(|o| o.code() == 77).collect();
    assert_eq!(ran + refused.len(), 6);
    // Runs start while less than $1.00 is spent; with 2 seats, 2 may be in flight.
    assert!((3..=4).contains(&ran), "{ran} ran");
    assert_eq!(calls(&env).len(), ran);
    for out in refused {
        assert!(out.stderr().contains("pool p: --pool-budget reached: $"), "{}", out.stderr());
    }
    let spent = usd(&pool_of(&status_json(&env, &[]), "p")["cost_usd_today"]);
    assert!((1.0..=1.0 + 2.0 * 0.4 + 1e-9).contains(&spent), "{spent}");
}

#[test]
fn bad_spending_flags_are_refused_before_anything_runs() {
    let env = TestEnv::new();
    let ran = crate::common::sh(r#"echo ran >> "$T/ran""#);
    for (opts, says) in [
        (vec!["--budget", "abc"], "--budget"),
        (vec!["--budget=-1"], "--budget"),
        (vec!["--pool-budget", "1"], "--pool"),
        (vec!["--retry", "2"], "--profile"),
        (vec!["--retry", "99", "--profile", "claude"], "--retry"),
        (vec!["--retry", "1", "--profile", "claude", "--no-session"], "--no-session"),
    ] {
        let mut all = vec!["-c", "x"];
        all.extend(&opts);
        let out = env.run(&all, &ran).output().unwrap();
        assert_eq!(out.status.code(), Some(125), "{opts:?}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(says) && stderr.lines().count() == 1, "{opts:?}: {stderr}");
    }
    assert!(!env.exists("ran"), "a refused run ran");
}

#[test]
fn retry_backs_off_and_runs_again_holding_the_channel() {
    let env = TestEnv::new();
    let start = Instant::now();
    let opts = ["-c", "bot", "--profile", "claude", "--retry", "3"];
    let out = env.run(&opts, &fake_claude(2, OVERLOADED, 0.1)).output().unwrap();
    let took = start.elapsed();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // chan-run alone decides: claude's own retries are off.
    assert_eq!(calls(&env), ["call 0", "call 0", "call 0"]);
    assert!(
        stderr.contains("channel bot: the model's API answered overloaded (529); attempt 2 of 4 in "),
        "{stderr}"
    );
    assert!(stderr.contains("attempt 3 of 4"), "{stderr}");
    // Back-offs of 1 s and 2 s, less up to half.
    assert_between(took, secs(1.4), secs(12.0));
    let entries = history(&env, "bot");
    let kinds: Vec<_> =
        entries.iter().map(|e| (e["kind"].as_str().unwrap(), e["attempt"].as_u64().unwrap())).collect();
    assert_eq!(kinds, [("ok", 3), ("overloaded", 2), ("overloaded", 1)]);
    assert_eq!(runs(&env, "bot"), 3);
}

#[test]
fn retry_gives_up_after_n_and_never_retries_what_is_not_transient() {
    let env = TestEnv::new();
    let opts = ["-c", "a", "--profile", "claude", "--retry", "1"];
    let out = env.run(&opts, &fake_claude(99, OVERLOADED, 0.1)).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(calls(&env).len(), 2);

    std::fs::remove_file(env.path("calls")).unwrap();
    let opts = ["-c", "b", "--profile", "claude", "--retry", "3"];
    let out = env.run(&opts, &fake_claude(99, BAD_REQUEST, 0.1)).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(calls(&env).len(), 1, "a 400 was retried");
    assert_eq!(status_of(&env, "b")["last_run"]["kind"], "model_error");

    // The caller's own CLAUDE_CODE_MAX_RETRIES is kept.
    std::fs::remove_file(env.path("calls")).unwrap();
    env.run(&opts, &fake_claude(0, "", 0.1)).env("CLAUDE_CODE_MAX_RETRIES", "2").assert().success();
    assert_eq!(calls(&env), ["call 2"]);
}

/// A stand-in whose first call is rate limited until `in_secs` from then (claude's
/// result with `resets_at`), and whose later calls answer.
fn rate_limited_once(in_secs: u64) -> Vec<String> {
    let script = format!(
        r#"echo call >> "$T/calls"
if [ "$(wc -l < "$T/calls")" -le 1 ]; then
  at=$(date -u -d "@$(( $(date +%s) + {in_secs} ))" +%Y-%m-%dT%H:%M:%SZ)
  printf '{{"type":"result","is_error":true,"api_error_status":429,"resets_at":"%s","session_id":"s-429"}}\n' "$at"; exit 1
fi
printf '{{"type":"result","is_error":false,"session_id":"s-ok","total_cost_usd":0.01}}\n'"#
    );
    ["sh", "-c", &script, "claude", "-p", "hi"].map(String::from).to_vec()
}

#[test]
fn a_rate_limit_reset_time_is_honoured() {
    let env = TestEnv::new();
    let start = Instant::now();
    let opts = ["-c", "bot", "--profile", "claude", "--retry", "2"];
    let out = env.run(&opts, &rate_limited_once(4)).output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("rate limited (429); attempt 2 of 3"), "{stderr}");
    // The reset (whole seconds) was 3 to 4 s away; the usual back-off would be 1 s.
    assert_between(start.elapsed(), secs(2.9), secs(15.0));
    assert!(history(&env, "bot")[1]["resets_at"].as_str().is_some());

    // A reset more than 15 minutes away is not waited for.
    std::fs::remove_file(env.path("calls")).unwrap();
    let start = Instant::now();
    let out = env
        .run(&["-c", "far", "--profile", "claude", "--retry", "2"], &rate_limited_once(3600))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("more than 15m away, so no retry"), "{}", text(&out.stderr));
    assert_eq!(calls(&env).len(), 1);
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_signal_ends_the_back_off_and_frees_the_channel() {
    let env = TestEnv::new();
    let opts = ["-c", "bot", "--profile", "claude", "--retry", "6"];
    let run = env.spawn(&opts, &fake_claude(99, OVERLOADED, 0.0));
    // After the third attempt the back-off is 2 to 4 s.
    wait_until("three attempts recorded", || history(&env, "bot").len() == 3);
    let sent = Instant::now();
    run.signal(rustix::process::Signal::TERM);
    let out = run.finish(PATIENCE);
    assert_eq!(out.code(), 143, "{}", out.stderr());
    assert!(sent.elapsed() < Duration::from_millis(1500), "took {:?}", sent.elapsed());
    assert_eq!(calls(&env).len(), 3);
    env.run(&["-c", "bot", "-n"], &prints("free")).assert().success();
}

#[test]
fn prometheus_output_parses_with_a_real_parser() {
    let env = TestEnv::new();
    let odd = "team \"a\" \\ b";
    env.run(&["-c", odd, "--pool", "p:3"], &fake_claude(0, "", 0.25)).assert().success();
    let opts = ["-c", "b", "--profile", "claude"];
    env.run(&opts, &fake_claude(99, OVERLOADED, 0.0)).assert().code(1);
    let out = env.command().args(["status", "--prometheus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let parser = r#"
import json, sys
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    print("NO-PARSER"); sys.exit(0)
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        print(json.dumps({"family": family.name, "type": family.type, "name": s.name, "labels": s.labels, "value": s.value}))
"#;
    let mut python = std::process::Command::new("python3")
        .args(["-c", parser])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    python.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let parsed = python.wait_with_output().unwrap();
    assert!(parsed.status.success(), "the parser refused:\n{}", text(&out.stdout));
    let parsed = text(&parsed.stdout);
    if parsed.trim() == "NO-PARSER" {
        assert!(
            std::env::var_os("CHAN_RUN_REQUIRE_PROMETHEUS").is_none(),
            "CHAN_RUN_REQUIRE_PROMETHEUS is set, but Python's prometheus_client is not installed"
        );
        eprintln!(
            "NOTICE: skipped: Python's prometheus_client is not installed (pip install prometheus_client)"
        );
        return;
    }
    let samples: Vec<Value> = parsed.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let find = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let hit =
            samples.iter().find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][k] == *v));
        hit.unwrap_or_else(|| panic!("no {name} {labels:?} in\n{}", text(&out.stdout)))["value"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(find("chan_run_cost_usd_total", &[("channel", odd)]), 0.25);
    assert_eq!(find("chan_run_runs_total", &[("channel", odd)]), 1.0);
    assert_eq!(find("chan_run_run_endings_total", &[("channel", "b"), ("kind", "overloaded")]), 1.0);
    assert_eq!(find("chan_run_failures_in_a_row", &[("channel", "b")]), 1.0);
    assert_eq!(find("chan_run_queue_depth", &[("channel", "b")]), 0.0);
    assert_eq!(find("chan_run_pool_seats", &[("pool", "p")]), 3.0);
    assert_eq!(find("chan_run_pool_cost_usd_today", &[("pool", "p")]), 0.25);
    let counter = samples.iter().find(|s| s["name"] == "chan_run_runs_total").unwrap();
    assert_eq!((&counter["family"], &counter["type"]), (&"chan_run_runs".into(), &"counter".into()));
}

#[test]
fn real_claude_529s_are_retried_by_chan_run_alone_and_cost_is_read() {
    let Some(claude) = real_claude() else { return };
    let env = TestEnv::new();
    let mock = Mock::start(&env);
    mock.answer("529*2");
    let args = ["-p", "retry-marker", "--output-format", "json"];
    let mut cmd = claude_cmd(&env, &mock, &claude, &["-c", "chat", "--retry", "3"], &args);
    cmd.env_remove("CLAUDE_CODE_MAX_RETRIES");
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Without chan-run's CLAUDE_CODE_MAX_RETRIES=0 claude would have retried itself.
    assert_eq!(mock.requests().len(), 3, "{:?}", mock.requests());
    let kinds: Vec<_> =
        history(&env, "chat").iter().map(|e| e["kind"].as_str().unwrap().to_owned()).collect();
    assert_eq!(kinds, ["ok", "overloaded", "overloaded"]);
    let last = status_of(&env, "chat")["last_run"].clone();
    assert!(usd(&last["cost_usd"]) > 0.0, "{last}");
    assert_eq!(last["usage"]["input_tokens"], 10);
}

#[test]
fn real_claude_budget_reached_mid_burst() {
    let Some(claude) = real_claude() else { return };
    let env = TestEnv::new();
    let mock = Mock::start(&env);
    // 40,000 output tokens: about $1.00 a run.
    mock.output_tokens(40_000);
    let runs: Vec<_> = (0..4)
        .map(|i| {
            let prompt = format!("burst-{i}");
            let args = ["-p", prompt.as_str(), "--output-format", "json"];
            crate::common::Running::start(claude_cmd(
                &env,
                &mock,
                &claude,
                &["-c", "chat", "--budget", "1.5"],
                &args,
            ))
        })
        .collect();
    let codes: Vec<i32> = runs.into_iter().map(|r| r.finish(Duration::from_secs(120)).code()).collect();
    assert_eq!(codes.iter().filter(|&&c| c == 0).count(), 2, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 77).count(), 2, "{codes:?}");
    assert_eq!(mock.requests().len(), 2);
    let spent = usd(&status_of(&env, "chat")["cost_usd_today"]);
    assert!(spent > 1.5 && spent < 2.1, "{spent}");
}

#[test]
fn real_claude_five_channels_in_a_pool_share_one_back_off() {
    let Some(claude) = real_claude() else { return };
    let env = TestEnv::new();
    let mock = Mock::start(&env);
    // Overloaded for 8 s from now; each channel on its own would retry 3 to 4 times in
    // that window (20 or so requests); the pool's one schedule makes one probe a step.
    mock.answer("529@8");
    let runs: Vec<_> = (0..5)
        .map(|i| {
            let channel = format!("chat{i}");
            let prompt = format!("pool-{i}");
            let args = ["-p", prompt.as_str(), "--output-format", "json"];
            let opts = ["-c", channel.as_str(), "--pool", "api:5", "--retry", "8"];
            crate::common::Running::start(claude_cmd(&env, &mock, &claude, &opts, &args))
        })
        .collect();
    wait_until("the pool to cool down", || pool_of(&status_json(&env, &[]), "api")["cool_down"].is_object());
    let table = text(&env.command().arg("status").output().unwrap().stdout);
    assert!(table.contains("pool api cools down until"), "{table}");
    for run in runs {
        let out = run.finish(Duration::from_secs(120));
        assert_eq!(out.code(), 0, "{}", out.stderr());
    }
    let requests = mock.requests();
    let refused: Vec<f64> =
        requests.iter().filter(|r| r["answer"] != "ok").map(|r| r["t"].as_f64().unwrap()).collect();
    let answered = requests.iter().filter(|r| r["answer"] == "ok").count();
    assert_eq!(answered, 5, "{requests:?}");
    // At most the five first tries, then one probe per step (0.5-1 s, 1-2, 2-4, 4-8).
    assert!(refused.len() <= 5 + 4, "{} refused requests: {requests:?}", refused.len());
}

#[test]
fn postgres_keeps_costs_and_budgets() {
    let Some(server) = crate::common::pg::server() else { return };
    let env = TestEnv::with_store(&crate::common::pg::fresh_store(&server));
    let codes: Vec<i32> = (0..4)
        .map(|_| {
            let out = env.run(&["-c", "bot", "--budget", "1"], &fake_claude(0, "", 0.4)).output().unwrap();
            out.status.code().unwrap()
        })
        .collect();
    assert_eq!(codes, [0, 0, 0, 77]);
    let bot = status_of(&env, "bot");
    assert_eq!((usd(&bot["cost_usd_today"]), usd(&bot["cost_usd_total"])), (1.2, 1.2));
    assert_eq!(usd(&history(&env, "bot")[0]["cost_usd"]), 0.4);
}

/// `chan-run run OPTS -- COMMAND` on `host` (see postgres_pools.rs).
fn run_on_host(env: &TestEnv, host: &str, opts: &[&str], command: &[String]) -> Running {
    let mut cmd = on_host(env, host, &[&["run"], opts, &["--"]].concat());
    cmd.args(command);
    Running::start(cmd)
}

#[test]
fn postgres_a_pool_budget_holds_across_two_hosts() {
    let Some(server) = crate::common::pg::server() else { return };
    let env = TestEnv::with_store(&crate::common::pg::fresh_store(&server));
    let runs: Vec<_> = (0..8)
        .map(|i| {
            let (host, channel) = (format!("host-{}", i % 2), format!("c{i}"));
            let opts = ["-c", channel.as_str(), "--pool", "p:2", "--pool-budget", "1"];
            run_on_host(&env, &host, &opts, &fake_claude(0, "", 0.4))
        })
        .collect();
    let outs: Vec<_> = runs.into_iter().map(|r| r.finish(PATIENCE)).collect();
    let ran = outs.iter().filter(|o| o.code() == 0).count();
    let refused = outs.iter().filter(|o| o.code() == 77).count();
    assert_eq!(ran + refused, 8, "{:?}", outs.iter().map(|o| o.stderr()).collect::<Vec<_>>());
    // Runs start while less than $1.00 is spent; with 2 seats, 2 may be in flight.
    assert!((3..=4).contains(&ran), "{ran} ran");
    assert_eq!(calls(&env).len(), ran);
    let spent = usd(&pool_of(&status_json(&env, &[]), "p")["cost_usd_today"]);
    assert!((1.0..=1.0 + 2.0 * 0.4 + 1e-9).contains(&spent), "{spent}");
    // Spent: neither host starts another run.
    for host in ["host-0", "host-1"] {
        let late = ["-c", host, "--pool", "p:2", "--pool-budget", "1"];
        let out = run_on_host(&env, host, &late, &fake_claude(0, "", 0.4)).finish(PATIENCE);
        assert_eq!(out.code(), 77, "{}", out.stderr());
        assert!(out.stderr().contains("pool p: --pool-budget reached: $"), "{}", out.stderr());
    }
    assert_eq!(calls(&env).len(), ran);
    let metrics = text(&env.command().args(["status", "--prometheus"]).output().unwrap().stdout);
    assert!(metrics.contains(&format!("chan_run_pool_cost_usd_today{{pool=\"p\"}} {spent}")), "{metrics}");
}

/// A stand-in for claude that is overloaded (529) while `$T/overloaded` exists, noting
/// each call's answer and time in `$T/calls`.
fn overloaded_while_flagged() -> Vec<String> {
    let script = format!(
        r#"if [ -e "$T/overloaded" ]; then echo "529 $(date +%s.%N)" >> "$T/calls"; printf '%s\n' '{OVERLOADED}'; exit 1; fi
echo "ok $(date +%s.%N)" >> "$T/calls"
printf '{{"type":"result","is_error":false,"session_id":"s-ok","total_cost_usd":0.01}}\n'"#
    );
    ["sh", "-c", &script, "claude", "-p", "hi"].map(String::from).to_vec()
}

#[test]
fn a_pool_cools_down_once_for_all_its_channels() {
    let env = TestEnv::new();
    cools_down_once(&env, &|_, opts, command| env.spawn(opts, command));
}

#[test]
fn postgres_a_529_on_one_host_cools_the_pool_down_for_the_other() {
    let Some(server) = crate::common::pg::server() else { return };
    let env = TestEnv::with_store(&crate::common::pg::fresh_store(&server));
    cools_down_once(&env, &|i, opts, command| run_on_host(&env, &format!("host-{}", i % 2), opts, command));
}

/// Starts the i-th run: `(i, opts, command)`.
type Spawn<'a> = dyn Fn(usize, &[&str], &[String]) -> Running + 'a;

/// 4 channels of a pool (`spawn(i, opts, command)` starts the i-th), all with
/// `--retry`, overloaded at first: one back-off schedule, one probe per step.
fn cools_down_once(env: &TestEnv, spawn: &Spawn) {
    env.open_gate("overloaded");
    let runs: Vec<_> = (0..4)
        .map(|i| {
            let channel = format!("c{i}");
            let opts = ["-c", channel.as_str(), "--pool", "p:4", "--profile", "claude", "--retry", "8"];
            spawn(i, &opts, &overloaded_while_flagged())
        })
        .collect();
    let step = || {
        let status = status_json(env, &[]);
        let pools = status["pools"].as_array().cloned().unwrap_or_default();
        pools.iter().find(|p| p["pool"] == "p").and_then(|p| p["cool_down"]["step"].as_u64())
    };
    // Two probes failed: the steps double, one probe each.
    wait_until("the cool-down's third step", || step().is_some_and(|s| s >= 2));
    let table = text(&env.command().arg("status").output().unwrap().stdout);
    assert!(table.contains("pool p cools down until") && table.contains("overloaded"), "{table}");
    let busy = spawn(4, &["-c", "other", "--pool", "p:4", "-n"], &prints("x")).finish(PATIENCE);
    assert_eq!(busy.code(), 75, "-n during a cool-down: {}", busy.stderr());
    std::fs::remove_file(env.path("overloaded")).unwrap();
    for run in runs {
        let out = run.finish(PATIENCE);
        assert_eq!(out.code(), 0, "{}", out.stderr());
    }
    let calls = calls(env);
    let mut refused: Vec<f64> =
        calls.iter().filter_map(|c| c.strip_prefix("529 ")).map(|t| t.parse().unwrap()).collect();
    refused.sort_by(f64::total_cmp);
    assert_eq!(calls.iter().filter(|c| c.starts_with("ok")).count(), 4, "{calls:?}");
    // The four first tries at most, then one probe per step: never two together.
    let together = refused.windows(2).filter(|w| w[1] - w[0] < 0.25).count();
    assert!(together <= 3 && refused.len() <= 4 + 4, "{calls:?}");
    assert_eq!(pool_of(&status_json(env, &[]), "p")["cool_down"], Value::Null, "an ok ends it");
}

#[test]
fn postgres_a_killed_probe_frees_the_pool_for_the_next() {
    let Some(server) = crate::common::pg::server() else { return };
    let store = crate::common::pg::fresh_store(&server);
    let env = TestEnv::with_store(&store);
    let opts = |channel: &'static str| ["-c", channel, "--pool", "p:2", "--profile", "claude"];
    let overloaded = crate::common::sh(&format!("printf '%s\\n' '{OVERLOADED}'; exit 1"));
    env.run(&opts("a"), &overloaded).assert().code(1);
    // After the cool-down, b probes and hangs; c waits for its outcome.
    let probe = env.spawn(&opts("b"), &crate::common::sh(r#"echo $$ > "$T/probe.pid"; exec sleep 60"#));
    let _killed = crate::common::KillOnDrop(vec![probe.pid()]);
    env.wait_for_file("probe.pid");
    let next = env.spawn(&opts("c"), &fake_claude(0, "", 0.1));
    let waiting = "SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' \
                   AND classid = 'chan_run_pool_ledger'::regclass AND NOT granted";
    wait_until("c to wait for the probe", || crate::common::pg::psql(&store, waiting) == "1");
    probe.signal(rustix::process::Signal::KILL);
    crate::common::kill(env.read("probe.pid").trim().parse().unwrap());
    // The dead probe's session took its lock along: c probes, and its ok ends the cool-down.
    let out = next.finish(PATIENCE);
    assert_eq!(out.code(), 0, "{}", out.stderr());
    assert_eq!(calls(&env).len(), 1);
    assert_eq!(pool_of(&status_json(&env, &[]), "p")["cool_down"], Value::Null);
}
