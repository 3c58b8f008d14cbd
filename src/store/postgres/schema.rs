//! The tables and the SQL shared by the steps: migrations (applied in one transaction
//! under a transaction-level advisory lock, a newer schema refused), the channels' lock
//! namespace, and the `pg_locks` checks every grant and beat rests on.
//!
//! SQL here names chan-run's objects as `{s}.chan_run_…` (`{s_lit}` inside a string
//! literal), which `Conn::sql` fills with the schema the first statement checked, and
//! every function as `pg_catalog.…`; types and operators resolve through the session's
//! search path, which that statement set to `pg_catalog, pg_temp`.

use super::PgStore;
use super::conn::{ANSWER_WITHIN, Conn, Fault};
use super::wait::Waiting;
use anyhow::anyhow;

/// The schema versions, in order; `chan_run_meta.version` counts the ones applied.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE SEQUENCE {s}.chan_run_fence;
CREATE TABLE {s}.chan_run_channel (
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
    created            timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE TABLE {s}.chan_run_history (
    channel_id int NOT NULL REFERENCES {s}.chan_run_channel (id) ON DELETE CASCADE,
    run_no     bigint NOT NULL,
    entry      jsonb NOT NULL,
    PRIMARY KEY (channel_id, run_no)
);
"#,
    r#"
ALTER TABLE {s}.chan_run_channel
    ADD COLUMN holder_space         text,
    ADD COLUMN holder_spawn_ticks   bigint,
    ADD COLUMN holder_spawned_ticks bigint;
"#,
    // The lease moves to a table of its own: a transaction that locks a channel's row
    // (an administrator's edit) no longer holds up the holder's heartbeat.
    r#"
CREATE TABLE {s}.chan_run_lease (
    channel_id    int PRIMARY KEY REFERENCES {s}.chan_run_channel (id) ON DELETE CASCADE,
    fence         bigint NOT NULL,
    host          text,
    pid           int,
    pid_ticks     bigint,
    backend       int NOT NULL,
    since         timestamptz NOT NULL,
    heartbeat     timestamptz NOT NULL,
    stops_within  interval NOT NULL,
    command       jsonb,
    command_pid   int,
    space         text,
    spawn_ticks   bigint,
    spawned_ticks bigint
);
INSERT INTO {s}.chan_run_lease (channel_id, fence, host, pid, backend, since, heartbeat, stops_within,
        command, command_pid, space, spawn_ticks, spawned_ticks)
    SELECT id, fence, holder_host, holder_pid, holder_backend, holder_since, heartbeat, interval '10 s',
        holder_command, holder_command_pid, holder_space, holder_spawn_ticks, holder_spawned_ticks
    FROM {s}.chan_run_channel
    WHERE heartbeat IS NOT NULL AND holder_backend IS NOT NULL AND holder_since IS NOT NULL;
ALTER TABLE {s}.chan_run_channel
    DROP COLUMN holder_host, DROP COLUMN holder_pid, DROP COLUMN holder_backend, DROP COLUMN holder_since,
    DROP COLUMN holder_command, DROP COLUMN holder_command_pid, DROP COLUMN heartbeat,
    DROP COLUMN holder_space, DROP COLUMN holder_spawn_ticks, DROP COLUMN holder_spawned_ticks;
"#,
    // Pools (pool.rs): a row per pool (its gate's lock key), a row per seat (its lock
    // key, and its current or last unclean holder, named by the holder's lease fence).
    r#"
CREATE TABLE {s}.chan_run_pool (
    id      int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pool    text NOT NULL UNIQUE,
    created timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE TABLE {s}.chan_run_seat (
    id       int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pool_id  int NOT NULL REFERENCES {s}.chan_run_pool (id) ON DELETE CASCADE,
    seat     int NOT NULL,
    fence    bigint,
    channel  text,
    host     text,
    pid      int,
    backend  int,
    seats    int,
    since    timestamptz,
    released timestamptz,
    UNIQUE (pool_id, seat)
);
CREATE INDEX chan_run_lease_fence ON {s}.chan_run_lease (fence);
"#,
    // `--collect` (collect.rs): a waiting caller's message, found by its backend in the
    // channel's lock queue; taken under a runner's fence; answered with its verdict. And
    // the history's rows of runs whose chan-run died.
    r#"
CREATE TABLE {s}.chan_run_message (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel_id    int NOT NULL REFERENCES {s}.chan_run_channel (id) ON DELETE CASCADE,
    token         text NOT NULL UNIQUE,
    backend       int NOT NULL,
    backend_start timestamptz NOT NULL,
    fingerprint   text NOT NULL,
    message       bytea NOT NULL CHECK (octet_length(message) <= 1048576),
    state         text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'taken', 'answered')),
    fence         bigint,
    code          int,
    runner_pid    int,
    messages      int,
    touched       timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE INDEX chan_run_message_channel ON {s}.chan_run_message (channel_id, fence);
-- A run whose chan-run died (lease.rs) is not counted; its history row comes after the
-- last recorded run's: (run_no, dead_no > 0).
ALTER TABLE {s}.chan_run_history ADD COLUMN dead_no int NOT NULL DEFAULT 0,
    DROP CONSTRAINT chan_run_history_pkey, ADD PRIMARY KEY (channel_id, run_no, dead_no);
"#,
    // Pool ledgers (ledger.rs): what a pool's runs spent, in all and on one UTC day, and
    // its cool-down; `version` counts the writes. The table's oid names the probe locks.
    r#"
CREATE TABLE {s}.chan_run_pool_ledger (
    pool_id   int PRIMARY KEY REFERENCES {s}.chan_run_pool (id) ON DELETE CASCADE,
    usd_total numeric NOT NULL DEFAULT 0,
    usd_today numeric NOT NULL DEFAULT 0,
    day       date,
    cool_down jsonb,
    version   bigint NOT NULL DEFAULT 0
);
"#,
];

/// History rows kept per channel.
pub const HISTORY_KEEP: i64 = 1000;

/// The lock namespace: the channel table's oid, as the int4 with its bits (so
/// `pg_locks.classid` shows the oid itself).
pub const NS: &str =
    "((('{s_lit}.chan_run_channel'::regclass::oid::int8 + 2147483648) % 4294967296) - 2147483648)::int4";
/// A lock namespace: the oid of chan-run's table `table`, as an int4 (as [`NS`]).
pub fn ns_of(table: &str) -> String {
    format!("(((('{{s_lit}}.{table}'::regclass::oid::int8 + 2147483648) % 4294967296) - 2147483648)::int4)")
}

/// The advisory locks of namespace `table` in `pg_locks` (as `alias`), in this database.
pub fn lock_rows_of(table: &str, alias: &str) -> String {
    format!(
        "{alias}.locktype = 'advisory' AND {alias}.classid = '{{s_lit}}.{table}'::regclass \
         AND {alias}.objsubid = 2 AND {alias}.database = (SELECT d.oid FROM pg_catalog.pg_database d \
         WHERE d.datname = pg_catalog.current_database())"
    )
}

/// The channels' advisory locks in `pg_locks` (as `l`), in this database.
pub const LOCK_ROWS: &str = "l.locktype = 'advisory' AND l.classid = '{s_lit}.chan_run_channel'::regclass \
     AND l.objsubid = 2 AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d \
     WHERE d.datname = pg_catalog.current_database())";

/// SQL: whether this session's backend holds the lock of the channel whose row id is
/// the SQL expression `id`: the proof the try, the grant and every beat rest on.
pub fn held_here(id: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM pg_catalog.pg_locks l WHERE {LOCK_ROWS} AND l.objid::int8 = {id} \
         AND l.pid = pg_catalog.pg_backend_pid() AND l.granted)"
    )
}

/// SQL: how many callers wait for the lock of the channel whose row id is `id`.
pub fn waiting_for(id: &str) -> String {
    format!(
        "(SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks l WHERE {LOCK_ROWS} AND l.objid::int8 = {id} \
         AND NOT l.granted)"
    )
}

/// A timestamp as `to_char` writes RFC 3339 UTC with milliseconds.
pub const UTC_MS: &str = r#"'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'"#;

impl PgStore {
    /// Creates or upgrades the tables (first use), refusing a newer schema.
    pub(super) fn migrate(&self, conn: &Conn, wait: &Waiting) -> Result<(), Fault> {
        let known = MIGRATIONS.len() as i32;
        let steps: Vec<String> = MIGRATIONS.iter().map(|m| conn.sql(m)).collect();
        let (create, read, insert, update) = (
            conn.sql("CREATE TABLE IF NOT EXISTS {s}.chan_run_meta (version int NOT NULL)"),
            conn.sql("SELECT version FROM {s}.chan_run_meta"),
            conn.sql("INSERT INTO {s}.chan_run_meta VALUES (0)"),
            conn.sql("UPDATE {s}.chan_run_meta SET version = $1"),
        );
        let found = conn.call(
            wait,
            Some(ANSWER_WITHIN),
            "create or upgrade chan-run's tables (the role needs CREATE on its schema)",
            move |client| {
                let mut tx = client.transaction()?;
                // One key for every installation's migrations: rare, short, and never a
                // channel lock (those use the two-key form).
                tx.execute("SELECT pg_catalog.pg_advisory_xact_lock(7523094288207667809)", &[])?;
                tx.batch_execute(&create)?;
                let version: Option<i32> = tx.query_opt(&read, &[])?.map(|r| r.get(0));
                let version = version.unwrap_or(0);
                if version > known {
                    return Ok(version); // rolled back as `tx` drops
                }
                if version == 0 {
                    tx.execute(&insert, &[])?;
                }
                for step in steps.iter().skip(version as usize) {
                    tx.batch_execute(step)?;
                }
                tx.execute(&update, &[&known])?;
                tx.commit()?;
                Ok(version)
            },
        );
        match found? {
            version if version > known => Err(Fault::Failed(anyhow!(newer_schema(&self.shown, version)))),
            _ => Ok(()),
        }
    }
}

pub fn newer_schema(shown: &str, version: i32) -> String {
    format!(
        "the store at {shown} was set up by a newer chan-run (schema version {version}; this one knows {}): upgrade chan-run on this host",
        MIGRATIONS.len()
    )
}

/// A jsonb column read as text, parsed (`None` if null or unreadable).
pub fn json_column<T: serde::de::DeserializeOwned>(row: &postgres::Row, i: usize) -> Option<T> {
    row.get::<_, Option<String>>(i).and_then(|t| serde_json::from_str(&t).ok())
}
