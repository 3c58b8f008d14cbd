//! Step 1, the connection. It lives on a thread of its own and every statement runs
//! there, so the caller's thread only ever waits in `Control` (or a channel): for the
//! answer, its deadline, or a forwarded signal. No network wait is unbounded or deaf to
//! SIGINT/SIGTERM/SIGHUP; a statement given up on is cancelled on the server.
//!
//! Connecting (TCP, TLS, start-up, authentication and the first statement) must end
//! within `connect_timeout` ([`CONNECT_WITHIN`] by default) and every later statement
//! within [`ANSWER_WITHIN`], except the wait in the channel's queue (only `--wait` ends
//! that); the caller's `--wait` deadline bounds them all. The first statement (session.rs)
//! checks the session and schema and sets the session's settings. *Death*: the server
//! notices the closed socket; nothing was taken yet.

use super::PgStore;
use super::session::{self, Session};
use super::wait::{Gave, Waiting};
use crate::control::Waker;
use anyhow::{anyhow, bail};
use postgres::{CancelToken, Client, NoTls};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

/// The client socket's bound on a beat over a dead network (`tcp_user_timeout`, and
/// keepalives of 2 s idle + 3 × 1 s).
pub const CLIENT_GIVES_UP_AFTER: Duration = Duration::from_secs(5);
/// Connecting, unless the URL's `connect_timeout` (or `PGCONNECT_TIMEOUT`) says otherwise.
pub const CONNECT_WITHIN: Duration = Duration::from_secs(10);
/// Any statement but the queue wait: a server that takes longer is taken as unavailable.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// How long a cancel request (leaving the queue, stopping a late statement) may take.
const CANCEL_WITHIN: Duration = Duration::from_secs(1);

type Job = Box<dyn FnOnce(&mut Client) + Send>;

/// A connection's handle: statements go to its thread, answers come back. Clones share
/// the connection (the heartbeat thread holds one); the last one dropped closes it.
#[derive(Clone)]
pub struct Conn {
    jobs: mpsc::Sender<Job>,
    /// The backend the connection started with: every statement checks it is still the
    /// one (a transaction-mode pooler would switch it and void session locks).
    pub backend: i32,
    session: Arc<Session>,
    cancel: Arc<(CancelToken, Option<tokio_postgres_rustls::MakeRustlsConnect>)>,
    shown: Arc<str>,
}

/// How a wait ended, other than with the answer.
#[derive(Debug)]
pub enum Fault {
    /// The caller's `--wait` (or `-n`'s budget) ran out: the busy code.
    Busy,
    /// A forwarded signal arrived: 128+N, nothing ran.
    Interrupted(i32),
    /// The server could not be reached or did not answer in time: worth a retry.
    Unavailable(anyhow::Error),
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for Fault {
    fn from(e: anyhow::Error) -> Fault {
        Fault::Failed(e)
    }
}

impl From<Fault> for anyhow::Error {
    fn from(f: Fault) -> anyhow::Error {
        match f {
            Fault::Busy => anyhow!("the store stayed busy"),
            Fault::Interrupted(sig) => anyhow!("interrupted by signal {sig}"),
            Fault::Unavailable(e) => crate::store::Unavailable(e).into(),
            Fault::Failed(e) => e,
        }
    }
}

impl From<Fault> for crate::store::AcquireError {
    fn from(f: Fault) -> crate::store::AcquireError {
        use crate::store::AcquireError;
        match f {
            Fault::Busy => AcquireError::Busy,
            Fault::Interrupted(sig) => AcquireError::Interrupted(sig),
            other => AcquireError::Failed(other.into()),
        }
    }
}

impl PgStore {
    /// Connects on a new thread and runs the first statement there (session.rs); the
    /// caller waits at most `connect_timeout`.
    pub(super) fn connect(&self, wait: &Waiting) -> Result<Conn, Fault> {
        let config = self.client_config();
        let tls = self.tls.clone();
        let marker = format!("chan-run {} {}", std::process::id(), self.host);
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (tx, rx) = mpsc::sync_channel(1);
        let waker = wait.waker.clone();
        std::thread::spawn(move || {
            let connected = match &tls {
                Some(tls) => config.connect(tls.clone()),
                None => config.connect(NoTls),
            };
            let started = connected.and_then(|mut client| {
                let session = session::start(&mut client, &marker)?;
                Ok((client, session))
            });
            let (mut client, session) = match started {
                Ok(ok) => ok,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return wake(waker.as_deref());
                }
            };
            let _ = tx.send(Ok((session, client.cancel_token())));
            wake(waker.as_deref());
            for job in inbox {
                job(&mut client);
            }
        });
        let within = self.connect_within();
        let (session, token) = match wait.wait_for(&rx, within) {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return Err(self.connect_fault(&e)),
            Err(gave) => return Err(self.gave_up(gave, "connect", within.unwrap_or_default())),
        };
        let session = self.check_session(session)?;
        Ok(Conn {
            jobs,
            backend: session.backend,
            session: Arc::new(session),
            cancel: Arc::new((token, self.tls.clone())),
            shown: self.shown.as_str().into(),
        })
    }

    /// A wait given up on, as a fault.
    pub(super) fn gave_up(&self, gave: Gave, what: &str, within: Duration) -> Fault {
        gave_up(&self.shown, gave, what, within)
    }
}

fn wake(waker: Option<&Waker>) {
    if let Some(waker) = waker {
        waker.wake();
    }
}

fn gave_up(shown: &str, gave: Gave, what: &str, within: Duration) -> Fault {
    match gave {
        Gave::Busy => Fault::Busy,
        Gave::Signal(sig) => Fault::Interrupted(sig),
        Gave::Late => Fault::Unavailable(anyhow!(
            "PostgreSQL at {shown} did not answer within {} (while trying to {what}); is it overloaded, stopped, or behind a full connection pool?",
            crate::duration::short(within)
        )),
        Gave::Gone => Fault::Unavailable(anyhow!(
            "the connection to PostgreSQL at {shown} is gone (while trying to {what})"
        )),
    }
}

impl Conn {
    /// Runs `f` on the connection's thread and waits for its answer at most `within`
    /// (`None`: no bound of its own) and never past the caller's deadline. A statement
    /// given up on is cancelled on the server before this returns (bounded).
    pub fn call<T, F>(&self, wait: &Waiting, within: Option<Duration>, what: &str, f: F) -> Result<T, Fault>
    where
        T: Send + 'static,
        F: FnOnce(&mut Client) -> Result<T, postgres::Error> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        let waker = wait.waker.clone();
        let job: Job = Box::new(move |client| {
            let _ = tx.send(f(client));
            wake(waker.as_deref());
        });
        if self.jobs.send(job).is_err() {
            return Err(gave_up(&self.shown, Gave::Gone, what, Duration::ZERO));
        }
        match wait.wait_for(&rx, within) {
            Ok(answer) => answer.map_err(|e| fault(&self.shown, what, &e)),
            Err(gave) => {
                self.cancel();
                Err(gave_up(&self.shown, gave, what, within.unwrap_or_default()))
            }
        }
    }

    /// Asks the server to cancel the statement running on this connection, waiting at
    /// most [`CANCEL_WITHIN`] for the request to go out.
    pub fn cancel(&self) {
        let cancel = Arc::clone(&self.cancel);
        let (tx, rx) = mpsc::sync_channel(1);
        std::thread::spawn(move || {
            let (token, tls) = &*cancel;
            let _ = match tls {
                Some(tls) => token.cancel_query(tls.clone()),
                None => token.cancel_query(NoTls),
            };
            let _ = tx.send(());
        });
        let _ = rx.recv_timeout(CANCEL_WITHIN);
    }

    /// `template` with chan-run's schema in place of `{s}` (an identifier) and `{s_lit}`
    /// (inside a string literal, as for `::regclass`).
    pub fn sql(&self, template: &str) -> String {
        template.replace("{s_lit}", &self.session.schema_lit).replace("{s}", &self.session.schema)
    }

    pub fn check_backend(&self, backend: i32) -> anyhow::Result<()> {
        if backend != self.backend {
            bail!(pooled(
                "the server",
                &format!("the backend changed from pid {} to {backend} between two statements", self.backend)
            ));
        }
        Ok(())
    }

    pub fn shown(&self) -> &str {
        &self.shown
    }
}

/// A failed statement as a fault: retryable when the server went away or is overloaded.
pub fn fault(shown: &str, what: &str, e: &postgres::Error) -> Fault {
    let error = anyhow!("PostgreSQL at {shown}: cannot {what}: {}", pg_error(e));
    if transient(e) { Fault::Unavailable(error) } else { Fault::Failed(error) }
}

/// Whether `e` says the server is (for now) unreachable, restarting or out of
/// connection slots, rather than that the request or the set-up is wrong.
pub fn transient(e: &postgres::Error) -> bool {
    if let Some(code) = e.code() {
        let code = code.code();
        return code.starts_with("08") || matches!(code, "53300" | "57P01" | "57P02" | "57P03");
    }
    if e.is_closed() {
        return true;
    }
    use std::io::ErrorKind::*;
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | BrokenPipe
                    | TimedOut
                    | UnexpectedEof
                    | NotConnected
                    | HostUnreachable
                    | NetworkUnreachable
                    | NetworkDown
                    | AddrNotAvailable
            );
        }
        source = s.source();
    }
    false
}

/// `chan-run <pid> <host>` → (pid, host).
pub fn from_application_name(name: Option<&str>) -> (Option<u32>, Option<String>) {
    let Some(rest) = name.and_then(|n| n.strip_prefix("chan-run ")) else { return (None, None) };
    let (pid, host) = rest.split_once(' ').unwrap_or((rest, ""));
    (pid.parse().ok(), Some(host.to_owned()).filter(|h| !h.is_empty()))
}

pub fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

/// The server's message (with its hint), or the client's error chain.
pub fn pg_error(e: &postgres::Error) -> String {
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

pub fn pooled(shown: &str, what: &str) -> String {
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
}
