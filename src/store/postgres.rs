//! The PostgreSQL store (`--store postgres://…`): one server keeps the locks, queues,
//! state and holder introspection of channels served by several hosts.
//!
//! # Tables (in the first schema of the connection's `search_path`)
//! `chan_run_meta` (the schema version; migrations are applied in one transaction under
//! a transaction-level advisory lock), `chan_run_channel` (one row per channel: its
//! record, `fence`, and the holder's host, pid, backend pid, since, heartbeat, command),
//! `chan_run_history` (the last [`HISTORY_KEEP`] runs per channel), and the sequence
//! `chan_run_fence`.
//!
//! # Protocol of one run, and what a death at each step leaves
//! 1. Connect. The first statement reads the backend's pid and, with `set_config`,
//!    turns off the server's statement, lock and idle timeouts,
//!    sets its TCP keepalives and `tcp_user_timeout` (server side: a silent client is
//!    dropped after [`SERVER_DROPS_AFTER`] at the earliest), and
//!    `client_connection_check_interval`, so a waiter whose process died leaves the
//!    queue within a second even while it waits. `application_name` is
//!    `chan-run <pid> <host>`, which is how `status` names waiters.
//! 2. One statement finds the channel's row and tries its lock: a session-level
//!    advisory lock keyed by (the table's oid, the row's id): never a hash of the name,
//!    so two channels never share a lock, and two installations (schemas) in one
//!    database never meet. A missing row is inserted (`ON CONFLICT DO NOTHING`) and the
//!    statement repeated. The lock is tried only on the backend the connection started
//!    with, and refused if that backend holds it already (advisory locks are reentrant:
//!    a transaction-mode pooler's one server connection would serve two holders).
//!    *Death*: the connection closes, the server drops the lock.
//! 3. Busy: `--no-wait` exits; else `pg_advisory_lock` blocks on a helper thread (on the
//!    connection's own backend, as in 2). PostgreSQL grants an advisory lock's waiters
//!    in arrival order, and a release grants the next waiter in the same instant, so a
//!    newcomer's try never jumps the queue: that is SPEC's order, across hosts. `--wait`
//!    running out or a signal sends the server a cancel request for the waiting
//!    statement, which leaves the queue at once. *Death*: the server notices the closed
//!    socket within `client_connection_check_interval` and removes the waiter.
//! 4. Granted: one statement checks in `pg_locks` that this very backend holds the lock
//!    (a transaction-mode pooler would run it on another backend: refused), bumps the
//!    row's `fence` from the global sequence, records the holder and returns the
//!    channel's record. The fence strictly grows from one holder to the next, across
//!    channels, server restarts and rows removed by `gc`; the command gets it as
//!    `CHAN_RUN_FENCE`. A row removed by `gc` meanwhile: unlock, start over at 2.
//!    The same statement returns the previous holder's process group if that holder
//!    died uncleanly: when it died on this host (same boot, same pid namespace), what is
//!    left of its group is killed before this run starts (`orphans`, as the local store
//!    does). *Death before*: as 2. *After*: the lock is dropped; the holder columns stay
//!    until the next holder overwrites them, and `status` trusts them only while the
//!    backend they name holds the lock.
//! 5. While the command runs, a heartbeat thread owns the connection: its first beat,
//!    sent as the command starts (off the path from grant to spawn), writes the holder's
//!    command, start, command pid, fork ticks and process space (boot id, pid
//!    namespace); then every [`BEAT`] it updates `heartbeat` where
//!    `fence` is still this run's. A beat that fails
//!    (the connection broke, the fence moved on, the backend changed) raises the
//!    lock-lost alarm: the command gets SIGTERM, and SIGKILL at most [`LOST_GRACE`]
//!    later (the lease's `lost_grace`; the supervisor keeps to it). The client socket's keepalives and
//!    `tcp_user_timeout` bound a beat on a dead network to [`CLIENT_GIVES_UP_AFTER`], so
//!    the command is gone [`BEAT`] + that + the grace after the last good beat: well
//!    before the server can drop the session and hand the lock on. (A server that
//!    restarts drops every lock at once; there the fence is what protects: the old
//!    holder's final write is refused and its `CHAN_RUN_FENCE` is older than the new
//!    holder's.)
//! 6. One statement writes the record and its history row `WHERE fence = <this
//!    run's>`, and must change exactly one row; else "lock lost, state not written" and
//!    exit 122. Only after it committed does `pg_advisory_unlock` grant the next waiter
//!    (an unlock inside the statement would let the next holder read the old record).
//!    The connection then closes with the process. *Death between*: the record and
//!    history are committed or not, together; the lock goes with the connection.

use super::{
    AcquireError, ChannelStatus, GcItem, GcReport, Holder, HolderView, Lease, LockLost, RecordError, Store,
    Wait, WaitNote, Waiter,
};
use crate::channel::Channel;
use crate::control::{Control, LockLostAlarm};
use crate::state::ChannelRecord;
use anyhow::{Context, anyhow, bail};
use postgres::error::SqlState;
use postgres::types::Type;
use postgres::{Client, NoTls};
use std::os::fd::RawFd;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The schema versions, in order; `chan_run_meta.version` counts the ones applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE SEQUENCE chan_run_fence;
CREATE TABLE chan_run_channel (
    id                 int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel            text NOT NULL UNIQUE,
    session_id         text,
    session_cwd        text,
    runs               bigint NOT NULL DEFAULT 0,
    failures_in_a_row  bigint NOT NULL DEFAULT 0,
    last_run           jsonb,
    last_finished      timestamptz,
    extra              jsonb NOT NULL DEFAULT '{}',
    fence              bigint NOT NULL DEFAULT 0,
    holder_host        text,
    holder_pid         int,
    holder_backend     int,
    holder_since       timestamptz,
    holder_command     jsonb,
    holder_command_pid int,
    heartbeat          timestamptz,
    created            timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE chan_run_history (
    channel_id int NOT NULL REFERENCES chan_run_channel (id) ON DELETE CASCADE,
    run_no     bigint NOT NULL,
    entry      jsonb NOT NULL,
    PRIMARY KEY (channel_id, run_no)
);
"#,
    r#"
ALTER TABLE chan_run_channel
    ADD COLUMN holder_space         text,
    ADD COLUMN holder_spawn_ticks   bigint,
    ADD COLUMN holder_spawned_ticks bigint;
"#,
];

/// How often the holder proves it still holds the lock.
pub const BEAT: Duration = Duration::from_secs(2);
/// The client socket's bound on a beat over a dead network (`tcp_user_timeout`, and
/// keepalives of 2 s idle + 3 × 1 s).
pub const CLIENT_GIVES_UP_AFTER: Duration = Duration::from_secs(5);
/// The server's bound, set per session: keepalives of 10 s idle + 3 × 5 s and
/// `tcp_user_timeout` 20 s, so a silent client keeps its lock at least this long.
pub const SERVER_DROPS_AFTER: Duration = Duration::from_secs(20);
/// The longest a command may outlive the lock-lost alarm (SIGTERM, then SIGKILL).
pub const LOST_GRACE: Duration = Duration::from_secs(3);
/// History rows kept per channel.
pub const HISTORY_KEEP: i64 = 1000;

// The protocol's point: a cut-off holder stops its command before the server can drop
// its session and hand the lock on.
const _: () = assert!(
    BEAT.as_secs() + CLIENT_GIVES_UP_AFTER.as_secs() + LOST_GRACE.as_secs() < SERVER_DROPS_AFTER.as_secs()
);

/// The session's settings, set by the first statement (not as startup `options`, which
/// PgBouncer refuses or drops): no server timeout may cut a wait or a holder short, a
/// dead waiter leaves the queue within a second, and a silent client keeps its session
/// for [`SERVER_DROPS_AFTER`] at least.
const SESSION_SETTINGS: &str = "SELECT pg_backend_pid(), set_config('statement_timeout', '0', false), \
     set_config('lock_timeout', '0', false), set_config('idle_in_transaction_session_timeout', '0', false), \
     set_config('idle_session_timeout', '0', false), set_config('client_connection_check_interval', '1000', false), \
     set_config('tcp_keepalives_idle', '10', false), set_config('tcp_keepalives_interval', '5', false), \
     set_config('tcp_keepalives_count', '3', false), set_config('tcp_user_timeout', '20000', false)";

/// The lock namespace: the channel table's oid, as the int4 with its bits (so
/// `pg_locks.classid` shows the oid itself).
const NS: &str = "(('chan_run_channel'::regclass::oid::int8 + 2147483648) % 4294967296 - 2147483648)::int4";
/// The channels' advisory locks in `pg_locks` (as `l`), in this database.
const LOCK_ROWS: &str = "l.locktype = 'advisory' AND l.classid = 'chan_run_channel'::regclass AND l.objsubid = 2 \
     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// SQL: whether this session's backend holds the lock of the channel whose row id is
/// the SQL expression `id`: the proof the try, the grant and every beat rest on.
fn held_here(id: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM pg_locks l WHERE {LOCK_ROWS} AND l.objid::int8 = {id} \
         AND l.pid = pg_backend_pid() AND l.granted)"
    )
}

/// SQL: how many callers wait for the lock of the channel whose row id is `id`.
fn waiting_for(id: &str) -> String {
    format!("(SELECT count(*) FROM pg_locks l WHERE {LOCK_ROWS} AND l.objid::int8 = {id} AND NOT l.granted)")
}
const UTC_MS: &str = r#"'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'"#;

pub struct PgStore {
    config: postgres::Config,
    /// The server as messages name it (never the password).
    shown: String,
    host: String,
    /// TLS, when the URL's `sslmode` asks for it (the server's certificate verified).
    tls: Option<MakeRustlsConnect>,
}

/// A connection and the backend it talks to: every statement checks the backend is
/// still the same (a transaction-mode pooler would switch it and void session locks).
struct Conn {
    client: Client,
    backend: i32,
}

impl PgStore {
    pub fn open(url: &str) -> anyhow::Result<PgStore> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bail!(
                "--store {url:?} is not a store chan-run knows: use postgres://USER@HOST[:PORT]/DB, or leave --store and CHAN_RUN_STORE unset for the local state directory"
            );
        }
        let (url, tls) = read_tls(url)?;
        let mut config: postgres::Config = url.parse().map_err(|e| {
            anyhow!("--store: cannot read the URL ({e}); expected postgres://USER@HOST[:PORT]/DB")
        })?;
        let tls = match tls {
            None => {
                config.ssl_mode(postgres::config::SslMode::Disable);
                None
            }
            Some(root) => {
                config.ssl_mode(postgres::config::SslMode::Require);
                Some(tls_connector(root)?)
            }
        };
        if config.get_password().is_none()
            && let Some(password) = std::env::var_os("PGPASSWORD")
        {
            config.password(password.as_encoded_bytes());
        }
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                postgres::config::Host::Tcp(name) => name.clone(),
                postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let port = config.get_ports().first().map(|p| format!(":{p}")).unwrap_or_default();
        let shown = format!("{}{port}/{}", hosts.join(","), config.get_dbname().unwrap_or(""));
        let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
        Ok(PgStore { config, shown, host, tls })
    }

    fn connect(&self) -> anyhow::Result<Conn> {
        let mut config = self.config.clone();
        let mut name = format!("chan-run {} {}", std::process::id(), self.host);
        truncate(&mut name, 63);
        config.application_name(&name);
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(2))
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3)
            .tcp_user_timeout(CLIENT_GIVES_UP_AFTER);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let connected = match &self.tls {
            Some(tls) => config.connect(tls.clone()),
            None => config.connect(NoTls),
        };
        let mut client = connected.map_err(|e| {
            let hint = match &self.tls {
                Some(_) => "; with sslmode=require chan-run verifies the server's certificate: name its CA with sslrootcert=FILE in the URL or PGSSLROOTCERT",
                None => "",
            };
            anyhow!(
                "cannot connect to PostgreSQL at {} ({}); check --store / CHAN_RUN_STORE{hint}",
                self.shown,
                pg_error(&e)
            )
        })?;
        // Unnamed statements only (`query_typed`: parse, bind and execute in one round
        // trip), here and wherever no transaction is open: a transaction-mode pooler would
        // run a named statement's parse and execute on different backends, and fail with
        // "prepared statement does not exist" instead of the pooler check's message.
        let rows =
            client.query_typed(SESSION_SETTINGS, &[]).map_err(|e| self.failed("set up the session", &e))?;
        let backend = rows.first().ok_or_else(|| anyhow!("SELECT pg_backend_pid() returned no row"))?.get(0);
        Ok(Conn { client, backend })
    }

    fn failed(&self, what: &str, e: &postgres::Error) -> anyhow::Error {
        anyhow!("PostgreSQL at {}: cannot {what}: {}", self.shown, pg_error(e))
    }

    /// Creates or upgrades the tables (first use), refusing a newer schema.
    fn migrate(&self, conn: &mut Conn) -> anyhow::Result<()> {
        let known = MIGRATIONS.len() as i32;
        let mut tx = conn.client.transaction().map_err(|e| self.failed("begin the migration", &e))?;
        let setup = (|| {
            // One key for every installation's migrations: rare, short, and never a channel lock
            // (those use the two-key form).
            tx.execute("SELECT pg_advisory_xact_lock(7523094288207667809)", &[])?;
            tx.batch_execute("CREATE TABLE IF NOT EXISTS chan_run_meta (version int NOT NULL)")?;
            let version: Option<i32> =
                tx.query_opt("SELECT version FROM chan_run_meta", &[])?.map(|r| r.get(0));
            if version.is_none() {
                tx.execute("INSERT INTO chan_run_meta VALUES (0)", &[])?;
            }
            Ok::<_, postgres::Error>(version.unwrap_or(0))
        })();
        let version = setup.map_err(|e| {
            anyhow!(
                "cannot create chan-run's tables in PostgreSQL at {} ({}); the role needs CREATE on the first schema of its search_path",
                self.shown,
                pg_error(&e)
            )
        })?;
        if version > known {
            bail!(newer_schema(&self.shown, version));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.batch_execute(sql).map_err(|e| self.failed(&format!("apply schema version {}", i + 1), &e))?;
        }
        tx.execute("UPDATE chan_run_meta SET version = $1", &[&known])
            .map_err(|e| self.failed("migrate", &e))?;
        tx.commit().map_err(|e| self.failed("commit the migration", &e))
    }

    /// Step 2: the channel's row id and whether this session now holds its lock. The lock
    /// is tried only on this session's own backend (a pooler's other backend would keep
    /// it after this session is gone), and only if that backend does not hold it
    /// already: an advisory lock is reentrant, so a backend that holds it serves another
    /// client's session too (a transaction-mode pooler with one server connection).
    fn try_lock(&self, conn: &mut Conn, channel: &Channel) -> anyhow::Result<(i32, bool)> {
        let sql = format!(
            "SELECT m.version, c.id, CASE WHEN c.id IS NOT NULL AND m.version = $2 \
             AND pg_backend_pid() = $3 AND NOT h.held THEN pg_try_advisory_lock({NS}, c.id) END, \
             pg_backend_pid(), h.held \
             FROM chan_run_meta m LEFT JOIN chan_run_channel c ON c.channel = $1 \
             CROSS JOIN LATERAL (SELECT {} AS held) h",
            held_here("c.id")
        );
        let known = MIGRATIONS.len() as i32;
        let mut migrated = false;
        loop {
            let rows = conn.client.query_typed(
                &sql,
                &[(&channel.name(), Type::TEXT), (&known, Type::INT4), (&conn.backend, Type::INT4)],
            );
            let row = match rows {
                Err(e) if !migrated && e.code() == Some(&SqlState::UNDEFINED_TABLE) => {
                    self.migrate(conn)?;
                    migrated = true;
                    continue;
                }
                Err(e) => return Err(self.failed("look up the channel", &e)),
                Ok(rows) if rows.is_empty() && !migrated => {
                    self.migrate(conn)?;
                    migrated = true;
                    continue;
                }
                Ok(rows) => rows.into_iter().next().ok_or_else(|| anyhow!("chan_run_meta is empty"))?,
            };
            conn.check_backend(row.get(3))?;
            if row.get::<_, bool>(4) {
                bail!(pooled(
                    &self.shown,
                    &format!(
                        "backend pid {} already holds the channel's lock, for another client's session",
                        conn.backend
                    )
                ));
            }
            let version: i32 = row.get(0);
            if version > known {
                bail!(newer_schema(&self.shown, version));
            }
            if version < known {
                self.migrate(conn)?;
                continue;
            }
            match row.get::<_, Option<i32>>(1) {
                Some(id) => return Ok((id, row.get::<_, Option<bool>>(2).unwrap_or(false))),
                None => {
                    conn.client
                        .query_typed(
                            "INSERT INTO chan_run_channel (channel) VALUES ($1) ON CONFLICT (channel) DO NOTHING",
                            &[(&channel.name(), Type::TEXT)],
                        )
                        .map_err(|e| self.failed("add the channel", &e))?;
                }
            }
        }
    }

    fn wait_note(&self, conn: &mut Conn, id: i32) -> WaitNote {
        let sql = format!(
            "SELECT holder_host, holder_pid, EXTRACT(EPOCH FROM now() - holder_since)::float8, \
             {} FROM chan_run_channel WHERE id = $1",
            waiting_for("$1")
        );
        let Ok(Some(row)) = conn.client.query_typed(&sql, &[(&id, Type::INT4)]).map(|r| r.into_iter().next())
        else {
            return WaitNote::default();
        };
        WaitNote {
            holder_host: row.get(0),
            holder_pid: row.get::<_, Option<i32>>(1).map(|p| p as u32),
            held_for: row.get::<_, Option<f64>>(2).and_then(|s| Duration::try_from_secs_f64(s).ok()),
            ahead: row.get::<_, i64>(3) as usize,
        }
    }

    /// Step 3: blocks in `pg_advisory_lock` on a helper thread, so this one can watch
    /// the deadline and signals; giving up cancels the waiting statement.
    fn wait_in_line(&self, conn: Conn, id: i32, wait: Wait, control: &Control) -> Result<Conn, AcquireError> {
        let token = conn.client.cancel_token();
        let tls = self.tls.clone();
        let waker = control.waker().context("cannot set up waiting")?;
        // As in try_lock: never queue (and so never lock) on another backend.
        let sql = format!(
            "SELECT pg_backend_pid(), CASE WHEN pg_backend_pid() = $2 THEN pg_advisory_lock({NS}, $1)::text END"
        );
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut conn = conn;
            let backend = conn.backend;
            let got = conn
                .client
                .query_typed(&sql, &[(&id, Type::INT4), (&backend, Type::INT4)])
                .map(|rows| rows.first().map(|r| r.get::<_, i32>(0)));
            let _ = tx.send((conn, got)); // sent before the wake-up, so the wake finds it
            waker.wake();
        });
        loop {
            if let Ok((conn, got)) = rx.try_recv() {
                return match got {
                    Ok(Some(backend)) => conn.check_backend(backend).map(|()| conn).map_err(Into::into),
                    Ok(None) => Err(anyhow!("waiting for the channel's lock returned no row").into()),
                    Err(e) => Err(self.failed("wait for the channel's lock", &e).into()),
                };
            }
            let gave_up = match (control.take_signal(), wait) {
                (Some(sig), _) => Some(AcquireError::Interrupted(sig)),
                (None, Wait::Until(d)) if Instant::now() >= d => Some(AcquireError::Busy),
                _ => None,
            };
            if let Some(why) = gave_up {
                // Leaves the queue now rather than when the server notices the closed
                // socket. If the lock was granted meanwhile, the connection's close at
                // exit drops it.
                let _ = match tls {
                    Some(tls) => token.cancel_query(tls),
                    None => token.cancel_query(NoTls),
                };
                return Err(why);
            }
            let deadline = match wait {
                Wait::Until(d) => Some(d),
                _ => None,
            };
            control.wait(deadline).context("cannot wait")?;
        }
    }

    /// Step 4: proves this backend holds the lock, bumps the fence, records the holder
    /// and reads the record. `None`: the row was removed by `gc` meanwhile (unlocked).
    fn grant(&self, conn: &mut Conn, id: i32) -> anyhow::Result<Option<(i64, ChannelRecord)>> {
        // `old`: the previous holder's process group, still there if it died uncleanly.
        let sql = format!(
            "UPDATE chan_run_channel c SET fence = nextval('chan_run_fence'), holder_host = $2, holder_pid = $3, \
             holder_backend = pg_backend_pid(), holder_since = now(), heartbeat = now(), holder_command = NULL, \
             holder_command_pid = NULL, holder_space = NULL, holder_spawn_ticks = NULL, holder_spawned_ticks = NULL \
             FROM (SELECT holder_space, holder_command_pid, holder_spawn_ticks, holder_spawned_ticks \
             FROM chan_run_channel WHERE id = $1) AS old \
             WHERE c.id = $1 AND {} \
             RETURNING c.fence, c.session_id, c.session_cwd, c.runs, c.failures_in_a_row, c.last_run::text, \
             c.extra::text, pg_backend_pid(), old.holder_space, old.holder_command_pid, old.holder_spawn_ticks, \
             old.holder_spawned_ticks",
            held_here("$1")
        );
        let pid = std::process::id() as i32;
        let rows = conn
            .client
            .query_typed(&sql, &[(&id, Type::INT4), (&self.host, Type::TEXT), (&pid, Type::INT4)])
            .map_err(|e| self.failed("take the channel", &e))?;
        let Some(row) = rows.into_iter().next() else {
            let row = conn
                .client
                .query_typed(
                    "SELECT EXISTS (SELECT 1 FROM chan_run_channel WHERE id = $1), pg_backend_pid()",
                    &[(&id, Type::INT4)],
                )
                .map_err(|e| self.failed("take the channel", &e))?
                .into_iter()
                .next()
                .ok_or_else(|| anyhow!("no row"))?;
            conn.check_backend(row.get(1))?;
            if row.get::<_, bool>(0) {
                bail!(pooled(
                    &self.shown,
                    "the backend that took the lock no longer runs this session's statements"
                ));
            }
            conn.client
                .query_typed(&format!("SELECT pg_advisory_unlock({NS}, $1)"), &[(&id, Type::INT4)])
                .map_err(|e| self.failed("unlock a removed channel", &e))?;
            return Ok(None);
        };
        conn.check_backend(row.get(7))?;
        let json = |i: usize| -> anyhow::Result<Option<serde_json::Value>> {
            Ok(row.get::<_, Option<String>>(i).map(|t| serde_json::from_str(&t)).transpose()?)
        };
        let extra = match json(6)? {
            Some(serde_json::Value::Object(map)) => map,
            _ => Default::default(),
        };
        let record = ChannelRecord {
            session_id: row.get(1),
            session_cwd: row.get(2),
            runs: row.get::<_, i64>(3) as u64,
            failures_in_a_row: row.get::<_, i64>(4) as u64,
            last_run: json(5)?.map(serde_json::from_value).transpose().context("the stored last run")?,
            extra,
        };
        // What is left of a holder that died on this very host (same boot, same pid
        // namespace) is killed before this run starts, as the local store does.
        if let (Some(space), Some(pgid), Some(spawn_ticks)) =
            (row.get::<_, Option<String>>(8), row.get::<_, Option<i32>>(9), row.get::<_, Option<i64>>(10))
            && Some(space) == process_space()
        {
            let left = crate::orphans::Leftover {
                pgid: pgid as u32,
                spawn_ticks: spawn_ticks as u64,
                spawned_ticks: row.get::<_, Option<i64>>(11).map(|t| t as u64),
            };
            crate::orphans::kill(&left);
        }
        Ok(Some((row.get(0), record)))
    }
}

impl Conn {
    fn check_backend(&self, backend: i32) -> anyhow::Result<()> {
        if backend != self.backend {
            bail!(pooled(
                "the server",
                &format!("the backend changed from pid {} to {backend} between two statements", self.backend)
            ));
        }
        Ok(())
    }

    /// One heartbeat: the fence must still be this run's.
    fn beat(
        &mut self,
        id: i32,
        fence: i64,
        started: Option<(u32, u64)>,
        holder: Option<HolderColumns>,
    ) -> Result<(), String> {
        let (space, spawn_ticks) = match &holder {
            Some(h) => (process_space(), i64::try_from(h.spawn_ticks).ok()),
            None => (None, None),
        };
        let (since, command) = holder.map(|h| (h.since, h.command)).unzip();
        let command_pid = started.and_then(|(pid, _)| i32::try_from(pid).ok());
        let spawned_ticks = started.and_then(|(_, ticks)| i64::try_from(ticks).ok());
        // The fence says nobody was granted the channel since; `pg_locks` says this
        // session still holds it (nothing reset or unlocked it under us).
        let sql = format!(
            "UPDATE chan_run_channel SET heartbeat = now(), holder_command_pid = COALESCE($3, holder_command_pid), \
             holder_since = COALESCE($4::timestamptz, holder_since), \
             holder_command = COALESCE($5::jsonb, holder_command), holder_space = COALESCE($6, holder_space), \
             holder_spawn_ticks = COALESCE($7, holder_spawn_ticks), \
             holder_spawned_ticks = COALESCE($8, holder_spawned_ticks) \
             WHERE id = $1 AND fence = $2 RETURNING pg_backend_pid(), {}",
            held_here("$1")
        );
        let rows = self
            .client
            .query_typed(
                &sql,
                &[
                    (&id, Type::INT4),
                    (&fence, Type::INT8),
                    (&command_pid, Type::INT4),
                    (&since, Type::TEXT),
                    (&command, Type::TEXT),
                    (&space, Type::TEXT),
                    (&spawn_ticks, Type::INT8),
                    (&spawned_ticks, Type::INT8),
                ],
            )
            .map_err(|e| format!("the heartbeat failed: {}", pg_error(&e)))?;
        match rows.first() {
            None => Err(format!("the channel's fence moved past {fence}: another holder took it")),
            Some(row) if !row.get::<_, bool>(1) => {
                Err("this session no longer holds the channel's lock".into())
            }
            Some(row) => self.check_backend(row.get(0)).map_err(|e| format!("{e:#}")),
        }
    }
}

impl Store for PgStore {
    fn id(&self) -> String {
        format!("postgres:{}", self.shown).replace('%', "%25").replace(' ', "%20").replace('\n', "%0A")
    }

    fn acquire(
        &self,
        channel: &Channel,
        wait: Wait,
        control: &'static Control,
        on_wait: &mut dyn FnMut(&WaitNote),
    ) -> Result<Box<dyn Lease>, AcquireError> {
        let mut conn = self.connect()?;
        loop {
            let (id, got) = self.try_lock(&mut conn, channel)?;
            if !got {
                if wait == Wait::No {
                    return Err(AcquireError::Busy);
                }
                on_wait(&self.wait_note(&mut conn, id));
                conn = self.wait_in_line(conn, id, wait, control)?;
            }
            if let Some((fence, record)) = self.grant(&mut conn, id)? {
                let alarm = control.lock_lost_alarm().context("cannot set up the heartbeat")?;
                return Ok(Box::new(PgLease {
                    shown: self.shown.clone(),
                    conn: Some(conn),
                    heartbeat: None,
                    alarm: Some(alarm),
                    id,
                    fence,
                    record,
                    lost: None,
                }));
            }
        }
    }

    fn status(&self, only: &[Channel]) -> anyhow::Result<(Vec<ChannelStatus>, Vec<String>)> {
        let mut conn = self.connect()?;
        let names: Vec<&str> = only.iter().map(Channel::name).collect();
        let sql = format!(
            "SELECT id, channel, session_id, session_cwd, runs, failures_in_a_row, last_run::text, extra::text, \
             holder_host, holder_pid, holder_backend, to_char(holder_since AT TIME ZONE 'UTC', {UTC_MS}), \
             holder_command::text, holder_command_pid \
             FROM chan_run_channel WHERE cardinality($1::text[]) = 0 OR channel = ANY($1) ORDER BY channel"
        );
        let rows = match conn.client.query_typed(&sql, &[(&names, Type::TEXT_ARRAY)]) {
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok((Vec::new(), Vec::new())),
            other => other.map_err(|e| self.failed("read the channels", &e))?,
        };
        let locks_sql = format!(
            "SELECT l.objid::int8, l.granted, l.pid, a.application_name, \
             to_char(COALESCE(l.waitstart, a.backend_start) AT TIME ZONE 'UTC', {UTC_MS}) \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE {LOCK_ROWS} \
             ORDER BY l.objid, l.granted DESC, l.waitstart NULLS FIRST"
        );
        let locks = conn.client.query_typed(&locks_sql, &[]).map_err(|e| self.failed("read pg_locks", &e))?;
        let mut out = Vec::new();
        for row in rows {
            let id: i32 = row.get(0);
            let mut status = ChannelStatus { channel: row.get(1), ..Default::default() };
            status.record = Some(ChannelRecord {
                session_id: row.get(2),
                session_cwd: row.get(3),
                runs: row.get::<_, i64>(4) as u64,
                failures_in_a_row: row.get::<_, i64>(5) as u64,
                last_run: json_column(&row, 6),
                extra: json_column(&row, 7).unwrap_or_default(),
            });
            for lock in locks.iter().filter(|l| l.get::<_, i64>(0) == i64::from(id)) {
                let backend: i32 = lock.get(2);
                let (pid, host) = from_application_name(lock.get::<_, Option<String>>(3).as_deref());
                if lock.get::<_, bool>(1) {
                    status.running = true;
                    status.holder = Some(if row.get::<_, Option<i32>>(10) == Some(backend) {
                        HolderView {
                            host: row.get(8),
                            pid: row.get::<_, Option<i32>>(9).map(|p| p as u32),
                            command_pid: row.get::<_, Option<i32>>(13).map(|p| p as u32),
                            started_at: row.get(11),
                            command: json_column(&row, 12).unwrap_or_default(),
                        }
                    } else {
                        HolderView { host, pid, ..Default::default() }
                    });
                } else {
                    status.queue.push(Waiter { host, pid, since: lock.get(4) });
                }
            }
            status.running |= !status.queue.is_empty();
            out.push(status);
        }
        Ok((out, Vec::new()))
    }

    fn history(&self, channel: &Channel, n: usize) -> anyhow::Result<Vec<crate::history::Entry>> {
        let mut conn = self.connect()?;
        let rows = conn.client.query_typed(
            "SELECT h.entry::text FROM chan_run_history h JOIN chan_run_channel c ON c.id = h.channel_id \
             WHERE c.channel = $1 ORDER BY h.run_no DESC LIMIT $2",
            &[(&channel.name(), Type::TEXT), (&(n.min(i64::MAX as usize) as i64), Type::INT8)],
        );
        let rows = match rows {
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(Vec::new()),
            other => other.map_err(|e| self.failed("read the history", &e))?,
        };
        Ok(rows.iter().filter_map(|r| serde_json::from_str(&r.get::<_, String>(0)).ok()).collect())
    }

    fn gc(&self, idle_for: Duration, dry_run: bool, _control: &'static Control) -> anyhow::Result<GcReport> {
        let mut conn = self.connect()?;
        let rows = conn.client.query_typed(
            "SELECT id, channel, EXTRACT(EPOCH FROM now() - COALESCE(last_finished, created))::float8 \
             FROM chan_run_channel WHERE COALESCE(last_finished, created) < now() - make_interval(secs => $1) \
             ORDER BY channel",
            &[(&idle_for.as_secs_f64().min(1e15), Type::FLOAT8)],
        );
        let rows = match rows {
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(GcReport::default()),
            other => other.map_err(|e| self.failed("find idle channels", &e))?,
        };
        let try_lock = format!("SELECT pg_try_advisory_lock({NS}, $1)");
        let unlock = format!("SELECT pg_advisory_unlock({NS}, $1)");
        let waiters = format!("SELECT {}", waiting_for("$1"));
        let mut items = Vec::new();
        for row in rows {
            let id: i32 = row.get(0);
            let idle = Duration::try_from_secs_f64(row.get::<_, f64>(2)).unwrap_or_default();
            let mut item = GcItem { channel: row.get(1), idle, kept: None };
            let got: bool = conn
                .client
                .query_typed(&try_lock, &[(&id, Type::INT4)])
                .map_err(|e| self.failed("lock an idle channel", &e))?[0]
                .get(0);
            if !got {
                item.kept = Some("running");
            } else {
                let waiting: i64 = conn
                    .client
                    .query_typed(&waiters, &[(&id, Type::INT4)])
                    .map_err(|e| self.failed("count waiters", &e))?[0]
                    .get(0);
                if waiting > 0 {
                    item.kept = Some("callers waiting");
                } else if !dry_run {
                    conn.client
                        .query_typed("DELETE FROM chan_run_channel WHERE id = $1", &[(&id, Type::INT4)])
                        .map_err(|e| self.failed("remove an idle channel", &e))?;
                }
                conn.client
                    .query_typed(&unlock, &[(&id, Type::INT4)])
                    .map_err(|e| self.failed("unlock", &e))?;
            }
            items.push(item);
        }
        Ok(GcReport { items, notes: Vec::new() })
    }
}

enum Beat {
    /// The command's pid, and the clock ticks just after its fork.
    CommandPid(u32, u64),
}

/// The holder's columns `announce` leaves to the first beat.
struct HolderColumns {
    since: String,
    command: String,
    /// Clock ticks just before the command's fork.
    spawn_ticks: u64,
}

/// Where this process's pids mean something: the boot and the pid namespace. A
/// previous holder recorded with the same space died on this host, and its process
/// group can be looked for here.
fn process_space() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some(format!("{} {}", boot.trim(), ns.display()))
}

struct Heartbeat {
    tx: mpsc::Sender<Beat>,
    thread: JoinHandle<(Conn, Option<String>)>,
}

struct PgLease {
    shown: String,
    /// `None` while the heartbeat thread has it.
    conn: Option<Conn>,
    heartbeat: Option<Heartbeat>,
    alarm: Option<LockLostAlarm>,
    id: i32,
    fence: i64,
    record: ChannelRecord,
    /// Why the lock is known lost.
    lost: Option<String>,
}

impl PgLease {
    /// The connection back from the heartbeat thread, unless the lock is lost.
    fn conn(&mut self) -> anyhow::Result<&mut Conn> {
        if let Some(beat) = self.heartbeat.take() {
            drop(beat.tx); // the thread's next wait sees the hang-up and returns
            let (conn, lost) = beat.thread.join().map_err(|_| anyhow!("the heartbeat thread panicked"))?;
            self.conn = Some(conn);
            self.lost = self.lost.take().or(lost);
        }
        if let Some(why) = &self.lost {
            return Err(LockLost(why.clone()).into());
        }
        self.conn.as_mut().ok_or_else(|| anyhow!("the connection is gone"))
    }

    /// A failed statement while holding: a broken connection means the lock went with it.
    fn check(
        &mut self,
        what: &str,
        result: Result<Vec<postgres::Row>, postgres::Error>,
    ) -> anyhow::Result<Vec<postgres::Row>> {
        match result {
            Ok(rows) => Ok(rows),
            Err(e) if self.conn.as_ref().is_none_or(|c| c.client.is_closed()) || e.code().is_none() => {
                let why = format!("the connection to PostgreSQL at {} broke ({})", self.shown, pg_error(&e));
                self.lost = Some(why.clone());
                Err(LockLost(why).into())
            }
            Err(e) => Err(anyhow!("PostgreSQL at {}: cannot {what}: {}", self.shown, pg_error(&e))),
        }
    }

    /// The final write, `WHERE fence = <this run's>`: the record, and with `entry` the
    /// history row (the oldest beyond [`HISTORY_KEEP`] dropped), in one statement.
    fn write(
        &mut self,
        change: &mut dyn FnMut(&mut ChannelRecord),
        entry: Option<&mut dyn FnMut(&ChannelRecord) -> crate::history::Entry>,
    ) -> anyhow::Result<()> {
        let mut record = self.record.clone();
        change(&mut record);
        let entry = entry.map(|make| serde_json::to_string(&make(&record))).transpose()?;
        let last_run = record.last_run.as_ref().map(serde_json::to_string).transpose()?;
        let finished = record.last_run.as_ref().map(|r| r.finished_at.clone());
        let extra = serde_json::to_string(&record.extra)?;
        let (runs, failures) = (record.runs as i64, record.failures_in_a_row as i64);
        let (id, fence, keep) = (self.id, self.fence, HISTORY_KEEP);
        let result = self.conn()?.client.query_typed(
            "WITH updated AS (UPDATE chan_run_channel SET session_id = $3, session_cwd = $4, runs = $5, \
             failures_in_a_row = $6, last_run = $7::jsonb, last_finished = $8::timestamptz, extra = $9::jsonb, \
             holder_host = NULL, holder_pid = NULL, holder_backend = NULL, holder_since = NULL, \
             holder_command = NULL, holder_command_pid = NULL, heartbeat = NULL, holder_space = NULL, \
             holder_spawn_ticks = NULL, holder_spawned_ticks = NULL \
             WHERE id = $1 AND fence = $2 RETURNING runs), \
             added AS (INSERT INTO chan_run_history (channel_id, run_no, entry) \
             SELECT $1, runs, $10::jsonb FROM updated WHERE $10 IS NOT NULL \
             ON CONFLICT (channel_id, run_no) DO UPDATE SET entry = EXCLUDED.entry RETURNING run_no), \
             dropped AS (DELETE FROM chan_run_history WHERE channel_id = $1 \
             AND run_no <= (SELECT run_no FROM added) - $11) \
             SELECT pg_backend_pid() FROM updated",
            &[
                (&id, Type::INT4),
                (&fence, Type::INT8),
                (&record.session_id, Type::TEXT),
                (&record.session_cwd, Type::TEXT),
                (&runs, Type::INT8),
                (&failures, Type::INT8),
                (&last_run, Type::TEXT),
                (&finished, Type::TEXT),
                (&extra, Type::TEXT),
                (&entry, Type::TEXT),
                (&keep, Type::INT8),
            ],
        );
        let rows = self.check("record the run", result)?;
        self.changed_one(&rows)?;
        self.record = record;
        Ok(())
    }

    /// The row must have changed, on this run's backend.
    fn changed_one(&mut self, rows: &[postgres::Row]) -> anyhow::Result<()> {
        let Some(row) = rows.first() else {
            let why = format!("the channel's fence moved past {}: another holder took it", self.fence);
            self.lost = Some(why.clone());
            return Err(LockLost(why).into());
        };
        self.conn()?.check_backend(row.get(0))
    }
}

impl Lease for PgLease {
    fn announce(&mut self, holder: &Holder) -> anyhow::Result<()> {
        let command = serde_json::to_string(&super::capped(holder.command))?;
        let since = humantime::format_rfc3339_millis(holder.started_at).to_string();
        let (id, fence) = (self.id, self.fence);
        // From here until the run is recorded, the heartbeat thread has the connection.
        // Its first beat writes the holder's command and start with the command's pid,
        // while the command starts: no round trip between the grant and the spawn.
        if let (Some(conn), Some(alarm)) = (self.conn.take(), self.alarm.take()) {
            let (tx, rx) = mpsc::channel();
            let holder = HolderColumns { since, command, spawn_ticks: holder.spawn_ticks };
            let thread = std::thread::spawn(move || heartbeat(conn, id, fence, holder, rx, alarm));
            self.heartbeat = Some(Heartbeat { tx, thread });
        }
        Ok(())
    }

    fn pid_field(&self) -> Option<(RawFd, u64, usize)> {
        None
    }

    fn command_started(&mut self, pid: u32, ticks: u64) {
        if let Some(beat) = &self.heartbeat {
            let _ = beat.tx.send(Beat::CommandPid(pid, ticks));
        }
    }

    fn record(&mut self) -> Result<ChannelRecord, RecordError> {
        Ok(self.record.clone())
    }

    fn fence(&self) -> Option<i64> {
        Some(self.fence)
    }

    fn lost_grace(&self) -> Option<Duration> {
        Some(LOST_GRACE)
    }

    fn update(&mut self, change: &mut dyn FnMut(&mut ChannelRecord)) -> Result<(), RecordError> {
        self.write(change, None).map_err(write_error)
    }

    fn record_run(
        &mut self,
        change: &mut dyn FnMut(&mut ChannelRecord),
        entry: &mut dyn FnMut(&ChannelRecord) -> crate::history::Entry,
    ) -> (Result<(), RecordError>, anyhow::Result<()>) {
        (self.write(change, Some(entry)).map_err(write_error), Ok(()))
    }

    fn release(mut self: Box<Self>) -> anyhow::Result<()> {
        let id = self.id;
        let conn = self.conn()?;
        let rows = conn
            .client
            .query_typed(
                &format!("SELECT pg_advisory_unlock({NS}, $1), pg_backend_pid()"),
                &[(&id, Type::INT4)],
            )
            .map_err(|e| {
                anyhow!(
                    "cannot unlock the channel ({}); the server drops the lock as the connection closes",
                    pg_error(&e)
                )
            })?;
        let unlocked = rows.first().is_some_and(|r| r.get::<_, bool>(0));
        if !unlocked {
            let backend = rows.first().map(|r| r.get::<_, i32>(1));
            bail!(
                "the unlock found no lock of this session's on the channel (backend {backend:?}, expected {}); a pooler may keep it",
                conn.backend
            );
        }
        // Not closed politely: that waits for the backend to exit, and the channel is
        // already handed on. The socket closes as this process exits, which the server
        // takes as the quiet end of an idle session.
        if let Some(conn) = self.conn.take() {
            std::mem::forget(conn);
        }
        Ok(())
    }
}

/// A failed write: lock lost (typed), or a plain failure.
fn write_error(e: anyhow::Error) -> RecordError {
    match e.downcast::<LockLost>() {
        Ok(lost) => RecordError::LockLost(lost),
        Err(e) => RecordError::Failed(e),
    }
}

/// Step 5, on its own thread: beats until the main thread wants the connection back
/// (it drops the sender), or a beat fails: then the alarm stops the command.
fn heartbeat(
    mut conn: Conn,
    id: i32,
    fence: i64,
    holder: HolderColumns,
    rx: mpsc::Receiver<Beat>,
    alarm: LockLostAlarm,
) -> (Conn, Option<String>) {
    let mut started = None;
    let mut holder = Some(holder);
    loop {
        match rx.recv_timeout(BEAT) {
            Ok(Beat::CommandPid(pid, ticks)) => started = Some((pid, ticks)),
            Err(RecvTimeoutError::Disconnected) => return (conn, None),
            Err(RecvTimeoutError::Timeout) => {}
        }
        if let Err(why) = conn.beat(id, fence, started, holder.take()) {
            alarm.raise();
            return (conn, Some(why));
        }
    }
}

/// Takes libpq's TLS parameters out of the URL (the client library knows neither
/// `sslrootcert` nor `verify-*`): `Some(root)` when `sslmode` is `require`, `verify-ca`
/// or `verify-full` (all three verify the server's certificate and name: stricter than
/// libpq's `require`), with the CA file from `sslrootcert` or `PGSSLROOTCERT` (else the
/// system's store); `None` for no `sslmode` or `disable`/`allow`/`prefer`, which chan-run
/// takes as plain TCP: a certificate it cannot check is no better than none.
fn read_tls(url: &str) -> anyhow::Result<(String, Option<Option<std::path::PathBuf>>)> {
    let Some((base, query)) = url.split_once('?') else { return Ok((url.to_owned(), None)) };
    let mut kept = Vec::new();
    let mut tls = false;
    let mut root = std::env::var_os("PGSSLROOTCERT").filter(|r| !r.is_empty()).map(std::path::PathBuf::from);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslrootcert" => root = Some(percent_decode(value).into()),
            "sslmode" => match value {
                "disable" | "allow" | "prefer" => {}
                "require" | "verify-ca" | "verify-full" => tls = true,
                other => bail!(
                    "--store: sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ),
            },
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
    Ok((url, tls.then_some(root)))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).and_then(|&b| hex(b)), bytes.get(i + 2).and_then(|&b| hex(b))) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A TLS connector trusting `root` (a PEM file of CA certificates), else the system's
/// certificate store.
fn tls_connector(root: Option<std::path::PathBuf>) -> anyhow::Result<MakeRustlsConnect> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match &root {
        Some(path) => {
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| anyhow!("--store: cannot read sslrootcert {} ({e})", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| anyhow!("--store: sslrootcert {}: {e}", path.display()))?;
                roots.add(cert).map_err(|e| anyhow!("--store: sslrootcert {}: {e}", path.display()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert); // one odd certificate in the store is no reason to fail
            }
        }
    }
    if roots.is_empty() {
        bail!(
            "--store: sslmode asks for TLS but there is no CA certificate to verify the server with; name one with sslrootcert=FILE in the URL or PGSSLROOTCERT"
        );
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("TLS set-up: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// A jsonb column read as text, parsed (`None` if null or unreadable).
fn json_column<T: serde::de::DeserializeOwned>(row: &postgres::Row, i: usize) -> Option<T> {
    row.get::<_, Option<String>>(i).and_then(|t| serde_json::from_str(&t).ok())
}

/// `chan-run <pid> <host>` → (pid, host).
fn from_application_name(name: Option<&str>) -> (Option<u32>, Option<String>) {
    let Some(rest) = name.and_then(|n| n.strip_prefix("chan-run ")) else { return (None, None) };
    let (pid, host) = rest.split_once(' ').unwrap_or((rest, ""));
    (pid.parse().ok(), Some(host.to_owned()).filter(|h| !h.is_empty()))
}

fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

/// The server's message (with its detail and hint), or the client's error chain.
fn pg_error(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = db.message().to_owned();
        if let Some(hint) = db.hint() {
            text.push_str(&format!(" ({hint})"));
        }
        return text;
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

fn newer_schema(shown: &str, version: i32) -> String {
    format!(
        "the store at {shown} was set up by a newer chan-run (schema version {version}; this one knows {}): upgrade chan-run on this host",
        MIGRATIONS.len()
    )
}

fn pooled(shown: &str, what: &str) -> String {
    format!(
        "{shown}: {what}; a connection pooler in transaction mode (e.g. PgBouncer) voids session locks: point --store at PostgreSQL itself or at a session-mode pool"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_names_round_trip() {
        assert_eq!(from_application_name(Some("chan-run 42 gw-1")), (Some(42), Some("gw-1".into())));
        assert_eq!(from_application_name(Some("chan-run 42")), (Some(42), None));
        assert_eq!(from_application_name(Some("psql")), (None, None));
        let mut long = "é".repeat(40);
        truncate(&mut long, 63);
        assert_eq!(long.len(), 62);
    }

    #[test]
    fn urls_other_than_postgres_are_refused_with_the_fix() {
        let e = PgStore::open("mysql://x").err().unwrap().to_string();
        assert!(e.contains("postgres://USER@HOST"), "{e}");
        let e = PgStore::open("postgres://u@h/db?sslmode=bogus").err().unwrap().to_string();
        assert!(e.contains("sslmode=bogus is not one of"), "{e}");
        let e = PgStore::open("postgres://u@h/db?sslmode=verify-full&sslrootcert=/no/such%20file")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot read sslrootcert /no/such file"), "{e}");
        let (url, tls) =
            read_tls("postgres://u@h/db?options=-c%20x%3D1&sslmode=require&sslrootcert=%2Fca.pem").unwrap();
        assert_eq!(
            (url.as_str(), tls),
            ("postgres://u@h/db?options=-c%20x%3D1", Some(Some("/ca.pem".into())))
        );
        assert_eq!(read_tls("postgres://u@h/db?sslmode=prefer").unwrap(), ("postgres://u@h/db".into(), None));
        let shown = PgStore::open("postgres://u:secret@db.example:6432/bots").unwrap().shown;
        assert_eq!(shown, "db.example:6432/bots");
    }
}
