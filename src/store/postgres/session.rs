//! The first statement of every connection: it checks the session before chan-run
//! trusts anything in it, and sets the session's settings.
//!
//! - **The schema**, chosen once: the first existing schema of the search path (the
//!   URL's `options=-c search_path=…`, else the role's). It must belong to chan-run's
//!   role, a superuser, or (`public` since PostgreSQL 15) `pg_database_owner` when the
//!   database is the role's or a superuser's; and no other role may create in it. Else
//!   another role could plant a table or a function (`public.nextval(text)`) that
//!   chan-run would use (exit 125). Every later statement names chan-run's objects in
//!   that schema and every function in `pg_catalog`, and the session's `search_path`
//!   becomes `pg_catalog, pg_temp`, so no name (operators and types included) can
//!   resolve anywhere else. The statement itself calls only `pg_catalog` functions.
//! - **A pooled session left as it was**: chan-run marks its session (`chan_run.client`);
//!   finding a mark means a pooler handed over a session another client used without
//!   resetting it (its advisory locks included): refused, naming the setting to change.
//! - **The encoding**: a database not in UTF8 cannot hold every channel name, command
//!   and session id: refused up front (the client's encoding is UTF8 in any case).
//! - **Settings**: no server timeout may cut a wait or a holder short; a dead waiter
//!   leaves the queue within a second (`client_connection_check_interval`); a silent
//!   client keeps its session [`SERVER_DROPS_AFTER`] at least (TCP keepalives and
//!   `tcp_user_timeout`); every commit is durable (`synchronous_commit = on`, whatever
//!   the role says: a fence or heartbeat lost in a crash would break the protocol).
//!   They are set with `set_config`, not as start-up options, which PgBouncer drops.

use super::PgStore;
use super::conn::Fault;
use anyhow::anyhow;
use postgres::Client;
use postgres::types::Type;
use std::time::Duration;

/// The server's bound, set per session: keepalives of 10 s idle + 3 × 5 s and
/// `tcp_user_timeout` 20 s, so a silent client keeps its lock at least this long.
pub const SERVER_DROPS_AFTER: Duration = Duration::from_secs(20);

/// The roles chan-run's role trusts: itself, superusers, and `pg_database_owner` when
/// the database belongs to one of those. Functions, not operators: the search path is
/// still the caller's here.
const TRUSTED: &str = "SELECT r.oid FROM pg_catalog.pg_roles r \
     WHERE pg_catalog.nameeq(r.rolname, current_user) OR r.rolsuper \
     OR (pg_catalog.nameeq(r.rolname, 'pg_database_owner') AND EXISTS (SELECT 1 \
         FROM pg_catalog.pg_database d JOIN pg_catalog.pg_roles o ON pg_catalog.oideq(o.oid, d.datdba) \
         WHERE pg_catalog.nameeq(d.datname, pg_catalog.current_database()) \
         AND (pg_catalog.nameeq(o.rolname, current_user) OR o.rolsuper)))";

/// What the first statement found, checked by [`PgStore::check_session`].
pub struct Session {
    pub backend: i32,
    /// chan-run's schema as an identifier, and as it goes inside a string literal.
    pub schema: String,
    pub schema_lit: String,
    found: Found,
}

struct Found {
    schema: Option<String>,
    owner: Option<String>,
    owner_trusted: bool,
    /// Other roles that may create in the schema (`PUBLIC` for everyone).
    creators: Option<String>,
    /// The mark of the client that used this session before, if it was not reset.
    previous: Option<String>,
    encoding: String,
    role: String,
    search_path: String,
}

/// Runs the first statement on a new connection (on its thread).
pub fn start(client: &mut Client, marker: &str) -> Result<Session, postgres::Error> {
    let sql = format!(
        "WITH s AS MATERIALIZED (SELECT c.*, n.nspowner, n.nspacl, \
             pg_catalog.quote_ident(n.nspname) AS quoted, pg_catalog.pg_get_userbyid(n.nspowner) AS owner \
           FROM (SELECT pg_catalog.current_schema() AS schema, \
             pg_catalog.current_setting('chan_run.client', true) AS previous, \
             pg_catalog.current_setting('server_encoding') AS encoding, current_user AS role, \
             pg_catalog.current_setting('search_path') AS search_path) c \
           LEFT JOIN pg_catalog.pg_namespace n ON pg_catalog.nameeq(n.nspname, c.schema)), \
         t AS MATERIALIZED ({TRUSTED}) \
         SELECT pg_catalog.pg_backend_pid(), s.schema::pg_catalog.text, s.quoted, s.owner::pg_catalog.text, \
           EXISTS (SELECT 1 FROM t WHERE pg_catalog.oideq(t.oid, s.nspowner)), \
           (SELECT pg_catalog.string_agg(CASE WHEN pg_catalog.oideq(a.grantee, 0::pg_catalog.oid) THEN 'PUBLIC' \
               ELSE pg_catalog.pg_get_userbyid(a.grantee)::pg_catalog.text END, ', ') \
             FROM pg_catalog.aclexplode(s.nspacl) a WHERE pg_catalog.texteq(a.privilege_type, 'CREATE') \
             AND NOT EXISTS (SELECT 1 FROM t WHERE pg_catalog.oideq(t.oid, a.grantee))), \
           s.previous, s.encoding, s.role::pg_catalog.text, s.search_path, \
           pg_catalog.set_config('chan_run.client', $1, false), \
           pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', false), \
           pg_catalog.set_config('client_encoding', 'UTF8', false), \
           pg_catalog.set_config('standard_conforming_strings', 'on', false), \
           pg_catalog.set_config('synchronous_commit', 'on', false), \
           pg_catalog.set_config('statement_timeout', '0', false), \
           pg_catalog.set_config('lock_timeout', '0', false), \
           pg_catalog.set_config('idle_in_transaction_session_timeout', '0', false), \
           pg_catalog.set_config('idle_session_timeout', '0', false), \
           pg_catalog.set_config('client_connection_check_interval', '1000', false), \
           pg_catalog.set_config('tcp_keepalives_idle', '10', false), \
           pg_catalog.set_config('tcp_keepalives_interval', '5', false), \
           pg_catalog.set_config('tcp_keepalives_count', '3', false), \
           pg_catalog.set_config('tcp_user_timeout', '{}', false) \
         FROM s",
        SERVER_DROPS_AFTER.as_millis()
    );
    // Unnamed statements only (`query_typed`: parse, bind and execute in one round trip),
    // here and wherever no transaction is open: a transaction-mode pooler would run a
    // named statement's parse and execute on different backends, and fail with
    // "prepared statement does not exist" instead of the pooler check's message.
    let row = client.query_typed_one(&sql, &[(&marker, Type::TEXT)])?;
    let quoted: Option<String> = row.get(2);
    Ok(Session {
        backend: row.get(0),
        schema_lit: quoted.as_deref().unwrap_or_default().replace('\'', "''"),
        schema: quoted.unwrap_or_default(),
        found: Found {
            schema: row.get(1),
            owner: row.get(3),
            owner_trusted: row.get(4),
            creators: row.get(5),
            previous: row.get::<_, Option<String>>(6).filter(|p| !p.is_empty()),
            encoding: row.get(7),
            role: row.get(8),
            search_path: row.get(9),
        },
    })
}

impl PgStore {
    /// Refuses a session chan-run cannot trust (exit 125), with what to change.
    pub(super) fn check_session(&self, session: Session) -> Result<Session, Fault> {
        let f = &session.found;
        let shown = &self.shown;
        if let Some(previous) = &f.previous {
            return Err(Fault::Failed(anyhow!(
                "{shown}: this server session was handed over by a connection pooler as another client ({previous}) left it, \
                 its advisory locks and settings included: a PgBouncer in session mode must reset sessions \
                 (server_reset_query = DISCARD ALL, its default, in pgbouncer.ini); one in transaction mode voids \
                 session locks: point --store at PostgreSQL itself or at a session-mode pool"
            )));
        }
        if f.encoding != "UTF8" {
            return Err(Fault::Failed(anyhow!(
                "{shown}: the database is encoded {}; chan-run keeps channel names, commands and session ids as \
                 UTF-8 text, which it cannot hold: use a database created with ENCODING 'UTF8' \
                 (CREATE DATABASE … ENCODING 'UTF8' TEMPLATE template0)",
                f.encoding
            )));
        }
        let role = &f.role;
        let Some(schema) = &f.schema else {
            return Err(Fault::Failed(anyhow!(
                "{shown}: no schema of the search path ({}) exists for chan-run's tables: create one that role {role} \
                 owns (CREATE SCHEMA chan_run AUTHORIZATION {role}) and name it in the URL \
                 (options=-c%20search_path%3Dchan_run) or with ALTER ROLE {role} SET search_path = chan_run",
                f.search_path
            )));
        };
        let owner = f.owner.as_deref().unwrap_or("?");
        if !f.owner_trusted {
            return Err(Fault::Failed(anyhow!(
                "{shown}: schema {schema} (the first of the search path, {}) belongs to role {owner}, not to {role} or a \
                 superuser: another role could plant tables or functions there for chan-run to use. Use a schema \
                 role {role} owns (CREATE SCHEMA chan_run AUTHORIZATION {role}; options=-c%20search_path%3Dchan_run in the URL)",
                f.search_path
            )));
        }
        if let Some(creators) = &f.creators {
            return Err(Fault::Failed(anyhow!(
                "{shown}: schema {schema} lets other roles create objects in it ({creators}): one could plant a table or \
                 a function there for chan-run to use. Revoke it (REVOKE CREATE ON SCHEMA {schema} FROM {creators}) \
                 or use a schema role {role} owns alone"
            )));
        }
        Ok(session)
    }
}
