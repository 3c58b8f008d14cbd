//! The PostgreSQL store against other database roles and odd set-ups (issue 18, items
//! 1, 6, 7, 8, 9): planted functions and schemas, a LATIN1 database, a pooler that does
//! not reset sessions, libpq's environment and password file, passwords kept out of
//! every message and of the command's environment, messages that name the problem.
//! Roles and databases are made by each test on the shared server and dropped after.

use crate::common::*;
use std::sync::atomic::{AtomicU32, Ordering};

/// A role (and a database, when asked) of the test's own on the shared server,
/// dropped on drop.
struct Scratch {
    admin: String,
    roles: Vec<String>,
    dbs: Vec<String>,
}

impl Scratch {
    fn new(admin: &str) -> Scratch {
        Scratch { admin: admin.to_owned(), roles: Vec::new(), dbs: Vec::new() }
    }

    /// A new login role named after `tag`, with `extra` (e.g. `PASSWORD '…'`).
    fn role(&mut self, tag: &str, extra: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("{tag}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        pg::psql(&self.admin, &format!("CREATE ROLE {name} LOGIN {extra}"));
        self.roles.push(name.clone());
        name
    }

    /// A new database with `extra` (e.g. `ENCODING 'LATIN1' …`); its URL as the admin.
    fn db(&mut self, tag: &str, extra: &str) -> (String, String) {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("{tag}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        pg::psql(&self.admin, &format!("CREATE DATABASE {name} {extra}"));
        self.dbs.push(name.clone());
        let url = self.admin.rsplit_once('/').unwrap().0.to_owned();
        (name.clone(), format!("{url}/{name}"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for db in &self.dbs {
            let _ = pg::try_psql(&self.admin, &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
        }
        for role in &self.roles {
            let _ = pg::try_psql(&self.admin, &format!("DROP OWNED BY {role} CASCADE"));
            let _ = pg::try_psql(&self.admin, &format!("DROP ROLE IF EXISTS {role}"));
        }
    }
}

/// `url` with its user and database replaced (and the admin's query kept off).
fn as_user(url: &str, user: &str, db: &str) -> String {
    let host = url.split_once('@').unwrap().1.split('/').next().unwrap();
    format!("postgres://{user}@{host}/{db}")
}

fn run_out(env: &TestEnv, opts: &[&str], script: &str) -> Outcome {
    env.spawn(opts, &sh(script)).finish(PATIENCE)
}

#[test]
fn other_roles_cannot_plant_functions_or_schemas_for_chan_run_to_use() {
    let Some(server) = pg::server() else { return };
    let mut s = Scratch::new(&server);
    let bot = s.role("bot", "");
    let mallory = s.role("mallory", "");
    let (db, db_admin) = s.db("planted", "");
    // PostgreSQL 14's default (and pg_upgrade's): everyone may create in public.
    pg::psql(
        &db_admin,
        &format!("GRANT CREATE ON SCHEMA public TO PUBLIC; GRANT CREATE ON DATABASE {db} TO {mallory}"),
    );
    let mallory_url = as_user(&server, &mallory, &db);
    pg::psql(
        &mallory_url,
        "CREATE FUNCTION public.nextval(text) RETURNS bigint LANGUAGE sql AS 'SELECT 42::bigint'",
    );

    // (a) The role's search path ends in public, which everyone may write: refused.
    let env = TestEnv::with_store(&as_user(&server, &bot, &db));
    let out = run_out(&env, &["-c", "a"], "started ran");
    out.assert_code(125);
    assert!(
        out.stderr().contains("schema public lets other roles create") && out.stderr().contains("PUBLIC")
    );
    assert!(!env.exists("ran"));

    // A schema of the role's own comes first; public, still writable and still planted,
    // comes after it in the path: the planted nextval is never called.
    pg::psql(&db_admin, &format!("CREATE SCHEMA bots AUTHORIZATION {bot}"));
    let own = format!("{}?options=-c%20search_path%3Dbots,public", as_user(&server, &bot, &db));
    let env = TestEnv::with_store(&own);
    let fences: Vec<i64> = (0..3)
        .map(|_| {
            let out = run_out(&env, &["-c", "a"], r#"echo "$CHAN_RUN_FENCE""#);
            out.assert_code(0);
            out.stdout().trim().parse().unwrap()
        })
        .collect();
    assert!(fences.windows(2).all(|w| w[0] < w[1]) && !fences.contains(&42), "fences {fences:?}");

    // (b) A schema named after chan-run's role ("$user", first in the default path),
    // made by another role, with tables of chan-run's names: refused, not used.
    pg::psql(
        &mallory_url,
        &format!(
            "CREATE SCHEMA {bot}; GRANT USAGE ON SCHEMA {bot} TO PUBLIC; CREATE TABLE {bot}.chan_run_meta (version int); \
             INSERT INTO {bot}.chan_run_meta VALUES (3); GRANT SELECT ON {bot}.chan_run_meta TO PUBLIC"
        ),
    );
    let env = TestEnv::with_store(&as_user(&server, &bot, &db));
    let out = run_out(&env, &["-c", "a"], "started ran");
    out.assert_code(125);
    assert!(out.stderr().contains(&format!("belongs to role {mallory}")), "{}", out.stderr());
    assert!(!env.exists("ran"));
    let status = env.command().arg("status").output().unwrap();
    assert_eq!(status.status.code(), Some(125), "status refuses it too");
}

#[test]
fn a_latin1_database_is_refused_up_front_and_the_session_speaks_utf8() {
    let Some(server) = pg::server() else { return };
    let mut s = Scratch::new(&server);
    let (db, _) = s.db("latin", "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0");
    let env = TestEnv::with_store(&as_user(&server, "postgres", &db));
    let out = run_out(&env, &["-c", "é"], "started ran");
    out.assert_code(125);
    assert!(out.stderr().contains("encoded LATIN1") && out.stderr().contains("UTF8"), "{}", out.stderr());
    assert!(!out.stderr().contains("lock lost") && !out.stderr().contains("active.json"), "{}", out.stderr());
    assert!(!env.exists("ran"));

    // A role whose own client_encoding is LATIN1, on a UTF8 database: chan-run's session
    // speaks UTF8 whatever the role says, and text outside LATIN1 round-trips.
    let role = s.role("enc", "");
    pg::psql(&server, &format!("ALTER ROLE {role} SET client_encoding = 'LATIN1'"));
    let store = pg::fresh_store(&server);
    let schema = store.rsplit_once("%3D").unwrap().1.to_owned();
    pg::psql(&server, &format!("ALTER SCHEMA {schema} OWNER TO {role}"));
    let env = TestEnv::with_store(&format!(
        "{}?options=-c%20search_path%3D{schema}",
        as_user(&server, &role, "postgres")
    ));
    let out = run_out(&env, &["-c", "日本"], r#"sleep 2.5; echo '{"session_id":"séance-日本-🙂"}'"#);
    out.assert_code(0);
    let status = env.command().args(["status", "--json"]).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["channels"][0]["channel"], "日本");
    assert_eq!(json["channels"][0]["session_id"], "séance-日本-🙂");
}

#[test]
fn a_pooler_that_hands_on_unreset_sessions_is_named_with_the_setting_to_change() {
    let Some(server) = pg::PrivateServer::start("noreset") else { return };
    let Some(pooled) = server.pgbouncer_without_reset("session", 1) else { return };
    let through = TestEnv::with_store(&pooled);
    // A holder through the pool is SIGKILLed: the pool keeps its server session, and
    // with it the channel's lock.
    let holder = through.hold("x", "held", "go");
    // Killed between heartbeats (the first beat follows the command's start): a client
    // gone mid-transaction makes the pooler close its server session instead.
    wait_until("the holder's session to be idle", || {
        pg::psql(server.url(), "SELECT state FROM pg_stat_activity WHERE application_name LIKE 'chan-run %'")
            == "idle"
    });
    holder.signal(rustix::process::Signal::KILL);
    drop(holder);
    // The next client gets that session as it was: refused, naming the setting.
    let out = run_out(&through, &["-c", "y"], "started ran");
    out.assert_code(125);
    assert!(out.stderr().contains("server_reset_query = DISCARD ALL"), "{}", out.stderr());
    assert_eq!(out.stderr().lines().count(), 1, "{}", out.stderr());
    assert!(!through.exists("ran"));
    // A caller on the server itself finds the channel held; status says why it stays so
    // once the dead holder's lease has run out.
    let direct = TestEnv::with_store(server.url());
    direct.run(&["-c", "x", "-n"], &["true"]).assert().code(75);
    wait_until("status to name the wedged session", || {
        let out = direct.command().args(["status", "x"]).output().unwrap();
        String::from_utf8_lossy(&out.stderr).contains("server_reset_query")
    });
}

#[test]
fn libpq_s_environment_service_file_and_password_file_are_honoured() {
    let Some(server) = pg::PrivateServer::start("creds") else { return };
    let store = pg::fresh_store(server.url());
    let schema = store.rsplit_once("%3D").unwrap().1.to_owned();
    let port = server.url().rsplit_once(':').unwrap().1.split('/').next().unwrap().to_owned();
    let env = TestEnv::with_store("postgres://");
    let with_pg_env = |cmd: &mut std::process::Command| {
        cmd.env("PGHOST", "127.0.0.1")
            .env("PGPORT", &port)
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "postgres")
            .env("PGOPTIONS", format!("-c search_path={schema}"));
    };
    let mut cmd = env.std_run(&["-c", "e"], &sh(r#"echo "$CHAN_RUN_STORE""#));
    with_pg_env(&mut cmd);
    let out = Running::start(cmd).finish(PATIENCE);
    out.assert_code(0);
    assert_eq!(out.stdout().trim(), "postgres://", "the command's CHAN_RUN_STORE is the store as given");
    assert_eq!(pg::psql(&store, "SELECT runs FROM chan_run_channel WHERE channel = 'e'"), "1");
    // PGSSLMODE too: this server speaks no TLS, so asking for it fails.
    let mut cmd = env.std_run(&["-c", "e"], &["true"]);
    with_pg_env(&mut cmd);
    cmd.env("PGSSLMODE", "verify-full");
    let out = Running::start(cmd).finish(PATIENCE);
    assert_ne!(out.code(), 0);
    assert!(out.stderr().contains("TLS"), "{}", out.stderr());

    // A service in ~/.pg_service.conf (the tests' HOME).
    std::fs::write(
        env.root().join("home/.pg_service.conf"),
        format!("[bots]\nhost=127.0.0.1\nport={port}\ndbname=postgres\nuser=postgres\noptions=-c search_path={schema}\n"),
    )
    .unwrap();
    let env_service = TestEnv::with_store("service=bots");
    std::fs::copy(env.root().join("home/.pg_service.conf"), env_service.root().join("home/.pg_service.conf"))
        .unwrap();
    env_service.run(&["-c", "s"], &["true"]).assert().code(0);
    assert_eq!(pg::psql(&store, "SELECT runs FROM chan_run_channel WHERE channel = 's'"), "1");

    // A role that must give its password, which only ~/.pgpass knows.
    let password = format!("pw-{}-x", std::process::id());
    let own = pg::fresh_store(server.url());
    let schema = own.rsplit_once("%3D").unwrap().1.to_owned();
    pg::psql(
        server.url(),
        &format!("CREATE ROLE pwuser LOGIN PASSWORD '{password}'; ALTER SCHEMA {schema} OWNER TO pwuser"),
    );
    let hba = pg::psql(server.url(), "SHOW hba_file");
    let old = std::fs::read_to_string(&hba).unwrap();
    if std::fs::write(&hba, format!("host all pwuser 127.0.0.1/32 scram-sha-256\n{old}")).is_err() {
        eprintln!("note: cannot rewrite {hba}; the password file part is skipped");
        return;
    }
    pg::psql(server.url(), "SELECT pg_reload_conf()");
    let url = format!("postgres://pwuser@127.0.0.1:{port}/postgres?options=-c%20search_path%3D{schema}");
    let env = TestEnv::with_store(&url);
    let out = run_out(&env, &["-c", "p"], "true");
    out.assert_code(125);
    assert!(out.stderr().contains("check the user and password"), "{}", out.stderr());
    let pgpass = env.root().join("home/.pgpass");
    std::fs::write(&pgpass, format!("127.0.0.1:{port}:postgres:pwuser:{password}\n")).unwrap();
    std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    run_out(&env, &["-c", "p"], "true").assert_code(0);
    // A password file others may read is ignored, as libpq ignores it, with a warning.
    std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = run_out(&env, &["-c", "p"], "true");
    out.assert_code(125);
    assert!(out.stderr().contains("has group or world access"), "{}", out.stderr());
}

#[test]
fn passwords_never_show_in_messages_help_or_the_commands_environment() {
    let secret = "hunter2-secret";
    let env = TestEnv::new();
    for store in [
        format!(" POSTGRES://u:{secret}@127.0.0.1:1/x"),
        format!("postgresql+psycopg2://u:{secret}@127.0.0.1:1/x"),
        format!("host=127.0.0.1 port=1 dbname=x password={secret}"),
        format!("host=127.0.0.1 port=1 dbname=x password={secret} bogus=1"),
        format!("postgres://u:{secret}@127.0.0.1:1/x?connect_timeout=abc"),
        format!("postgres://u:{secret}@127.0.0.1:1/x?sslcert=a.pem"),
    ] {
        let out = env.command().args(["--store", &store, "run", "-c", "a", "--", "true"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && !stderr.contains(secret), "{store}: {stderr}");
        assert!(stderr.contains("--store carries a password on the command line"), "{store}: {stderr}");
        // From the environment it is no one else's business: no warning, still no echo.
        let out = env
            .command()
            .env("CHAN_RUN_STORE", &store)
            .args(["run", "-c", "a", "--", "true"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains(secret) && !stderr.contains("command line"), "{store}: {stderr}");
    }
    let help = env
        .command()
        .env("CHAN_RUN_STORE", format!("postgres://u:{secret}@h/db"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success() && !String::from_utf8_lossy(&help.stdout).contains(secret));

    let Some(server) = pg::server() else { return };
    // Trust authentication takes any password; the command must not see it.
    let store = pg::fresh_store(&server).replacen("postgres@", &format!("postgres:{secret}@"), 1);
    let env = TestEnv::with_store(&store);
    let out =
        run_out(&env, &["-c", "a"], r#"echo "$CHAN_RUN_STORE"; "$B" status a >/dev/null && echo nested-ok"#);
    out.assert_code(0);
    let seen = out.stdout();
    assert!(
        !seen.contains(secret) && seen.contains("postgres@127.0.0.1") && seen.contains("nested-ok"),
        "{seen}"
    );
}

#[test]
fn messages_name_the_bad_parameter_and_a_full_server_gets_no_store_hint() {
    let env = TestEnv::new();
    for (store, says) in [
        ("postgres://u@h/db?frobnicate=1", "unknown parameter \"frobnicate\""),
        ("postgres://u@h/db?connect_timeout=abc", "connect_timeout=\"abc\""),
        ("host=h connect_timeout=abc", "connect_timeout=\"abc\""),
    ] {
        let out = env
            .command()
            .env("CHAN_RUN_STORE", store)
            .args(["run", "-c", "a", "--", "true"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{store}: {stderr}");
        assert!(stderr.contains(says), "{store}: {stderr}");
    }
    let Some(server) = pg::server() else { return };
    let mut s = Scratch::new(&server);
    let full = s.role("full", "CONNECTION LIMIT 0");
    let env = TestEnv::with_store(&as_user(&server, &full, "postgres"));
    let out = run_out(&env, &["-c", "a"], "true");
    out.assert_code(69);
    let stderr = out.stderr();
    assert!(stderr.contains("no free connection slot") && !stderr.contains("check --store"), "{stderr}");
}
