//! The PostgreSQL store (`--store postgres://…`): one server keeps the locks, queues,
//! state and holder introspection of channels served by several hosts.
//!
//! # Tables (in one checked schema; schema.rs, session.rs)
//! `chan_run_meta` (the schema version), `chan_run_channel` (one row per channel: its
//! record and `fence`), `chan_run_lease` (the current or last unclean holder: host,
//! pids, backend, heartbeat, the bound its command stops within), `chan_run_history`
//! (the last runs per channel), the sequence `chan_run_fence`, and for pools
//! `chan_run_pool` and `chan_run_seat` (pool.rs has their protocol) with
//! `chan_run_pool_ledger` (a pool's spend and cool-down: ledger.rs), and for `--collect`
//! `chan_run_message` (collect.rs has its protocol).
//!
//! # Protocol of one run
//! Each step's detail, with what a death at that step leaves, sits beside its code.
//! 1. Connect on a thread of the connection's own (every wait bounded and interruptible:
//!    conn.rs, wait.rs); the first statement checks the schema, the encoding and a
//!    pooler's session, and sets the session's settings (session.rs).
//! 2. Find the channel's row and try its session-level advisory lock, on this
//!    connection's own backend only (queue.rs).
//! 3. Busy: wait in the server's queue of that lock, which grants in arrival order;
//!    `--wait` or a signal leaves it at once, a wait the server ends is queued again
//!    (queue.rs).
//! 4. Granted: prove the lock in `pg_locks`, take a new fence, read the record, and once
//!    the previous holder's lease (if it ended uncleanly) has certainly run out, write
//!    this run's lease row (grant.rs).
//! 5. While the command runs, a heartbeat proves the lease; one not confirmed in time
//!    stops the command within the bound the lease row promises (heartbeat.rs).
//! 6. Write the record and history and end the lease only under this run's fence, then
//!    unlock (lease.rs).
//!
//! config.rs, conninfo.rs and pgfiles.rs read `--store` as libpq would; verbs.rs is the
//! `Store` interface: acquire, status, history, gc. pool.rs takes a run's seats in
//! pools (`--pool`) after step 4 and releases them in step 6. collect.rs (`--collect`)
//! queues a waiting caller's message before step 3, reads its fate right after it, takes
//! the batch before the command and answers it in step 6's statement. A lease row found
//! at step 4 (the previous holder ended uncleanly) is also written to the history as a
//! `died` run by the run that finds it.

mod collect;
mod config;
mod conn;
mod conninfo;
mod grant;
mod heartbeat;
mod lease;
mod ledger;
mod pgfiles;
mod pool;
mod queue;
mod schema;
mod session;
mod verbs;
mod wait;

use std::time::Duration;
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Clone)]
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
