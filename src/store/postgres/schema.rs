//! The tables and the SQL shared by the steps: migrations (applied in one transaction
//! under a transaction-level advisory lock, a newer schema refused), the channels' lock
//! namespace, and the `pg_locks` checks every grant and beat rests on.

use super::PgStore;
use super::conn::{Conn, pg_error};
use anyhow::{anyhow, bail};

/// The schema versions, in order; `chan_run_meta.version` counts the ones applied.
pub const MIGRATIONS: &[&str] = &[
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

/// History rows kept per channel.
pub const HISTORY_KEEP: i64 = 1000;

/// The lock namespace: the channel table's oid, as the int4 with its bits (so
/// `pg_locks.classid` shows the oid itself).
pub const NS: &str =
    "(('chan_run_channel'::regclass::oid::int8 + 2147483648) % 4294967296 - 2147483648)::int4";
/// The channels' advisory locks in `pg_locks` (as `l`), in this database.
pub const LOCK_ROWS: &str = "l.locktype = 'advisory' AND l.classid = 'chan_run_channel'::regclass AND l.objsubid = 2 \
     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// SQL: whether this session's backend holds the lock of the channel whose row id is
/// the SQL expression `id`: the proof the try, the grant and every beat rest on.
pub fn held_here(id: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM pg_locks l WHERE {LOCK_ROWS} AND l.objid::int8 = {id} \
         AND l.pid = pg_backend_pid() AND l.granted)"
    )
}

/// SQL: how many callers wait for the lock of the channel whose row id is `id`.
pub fn waiting_for(id: &str) -> String {
    format!("(SELECT count(*) FROM pg_locks l WHERE {LOCK_ROWS} AND l.objid::int8 = {id} AND NOT l.granted)")
}

/// A timestamp as `to_char` writes RFC 3339 UTC with milliseconds.
pub const UTC_MS: &str = r#"'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'"#;

impl PgStore {
    /// Creates or upgrades the tables (first use), refusing a newer schema.
    pub(super) fn migrate(&self, conn: &mut Conn) -> anyhow::Result<()> {
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
