//! The PostgreSQL store (`--store postgres://…`): one server keeps the locks, queues,
//! state and holder introspection of channels served by several hosts.
//!
//! # Tables (in the first schema of the connection's `search_path`; schema.rs)
//! `chan_run_meta` (the schema version), `chan_run_channel` (one row per channel: its
//! record, `fence`, and the holder's host, pid, backend pid, since, heartbeat, command),
//! `chan_run_history` (the last runs per channel), and the sequence `chan_run_fence`.
//!
//! # Protocol of one run
//! Each step's detail, with what a death at that step leaves, sits beside its code.
//! 1. Connect, and set the session's timeouts and keepalives (conn.rs).
//! 2. Find the channel's row and try its session-level advisory lock, on this
//!    connection's own backend only (queue.rs).
//! 3. Busy: wait in the server's queue of that lock, which grants in arrival order;
//!    `--wait`, a signal or a death leaves it at once (queue.rs).
//! 4. Granted: prove the lock in `pg_locks`, take a new fence, record the holder, read
//!    the record, kill what a holder that died on this host left (lease.rs).
//! 5. While the command runs, a heartbeat proves the lease; a failed beat stops the
//!    command before the server could hand the lock on (heartbeat.rs).
//! 6. Write the record and history only under this run's fence, then unlock (lease.rs).
//!
//! config.rs reads `--store`; verbs.rs is the `Store` interface: acquire, status,
//! history, gc.

mod config;
mod conn;
mod conninfo;
mod heartbeat;
mod lease;
mod queue;
mod schema;
mod session;
mod verbs;

use std::time::Duration;
use tokio_postgres_rustls::MakeRustlsConnect;

pub struct PgStore {
    config: postgres::Config,
    /// The server as messages name it (never the password).
    shown: String,
    host: String,
    /// TLS, when `sslmode` asks for it (the server's certificate verified).
    tls: Option<MakeRustlsConnect>,
    /// The bound on connecting; `None`: `connect_timeout=0`.
    connect_within: Option<Duration>,
    /// `--store` as given, without its password: the command's `CHAN_RUN_STORE`.
    public_url: String,
}
