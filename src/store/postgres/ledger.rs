//! A pool's ledger on PostgreSQL: a row of `chan_run_pool_ledger` beside the pool's row
//! (removed with it by `gc`), shared by every host. It reads as the local store's
//! ledger does (`cost_usd_total`, `cost_today: {"day", "usd"}`, `cool_down`: see
//! cmd/cooldown.rs), so the commands never look behind the trait.
//!
//! - A run's cost is added in one statement (`usd_total + $cost`, the day rolled over
//!   by the server's UTC date): concurrent runs on any host never lose a charge.
//! - Any other change (a cool-down's) is a compare-and-set on the row's `version`: read,
//!   change in Rust, write `WHERE version = <read>`, else read again and redo it. No
//!   transaction stays open on the lease's connection (its heartbeat shares it).
//! - The probe lock is the advisory lock (the ledger table's oid, the pool's id), taken
//!   at session level on the lease's connection, so it goes with a dead probe's
//!   session; the pool's other runs wait for it in `pg_advisory_lock_shared` on a
//!   connection of their own, closed when it is granted or the wait is given up.

use super::PgStore;
use super::conn::{ANSWER_WITHIN, Conn, Fault};
use super::schema::ns_of;
use super::wait::Waiting;
use crate::channel::Channel;
use crate::control::Control;
use crate::pool::Pool;
use crate::store::{AcquireError, PoolLedger};
use anyhow::bail;
use postgres::error::SqlState;
use postgres::types::{ToSql, Type};
use serde_json::{Map, Value, json};
use std::time::Instant;

/// A compare-and-set lost this many times in a row is an error, not contention.
const MAX_TRIES: usize = 100;

/// The ledger's columns as read: `(pool, usd_total, usd_today, day, cool_down, version)`.
const READ: &str = "SELECT p.pool, l.usd_total::float8, l.usd_today::float8, pg_catalog.to_char(l.day, 'YYYY-MM-DD'), \
     l.cool_down::text, l.version FROM {s}.chan_run_pool p LEFT JOIN {s}.chan_run_pool_ledger l ON l.pool_id = p.id";

fn probe_ns() -> String {
    ns_of("chan_run_pool_ledger")
}

/// A ledger as read: its fields, and its row's version (`None`: no row yet).
struct Read {
    fields: Map<String, Value>,
    version: Option<i64>,
}

/// The row as the pool's name and its ledger.
fn fields_of(row: &postgres::Row) -> (String, Read) {
    let pool: String = row.get(0);
    let mut fields = Map::new();
    fields.insert("pool".into(), pool.clone().into());
    let version: Option<i64> = row.get(5);
    if let (Some(total), Some(today), Some(day)) =
        (row.get::<_, Option<f64>>(1), row.get::<_, Option<f64>>(2), row.get::<_, Option<String>>(3))
    {
        fields.insert("cost_usd_total".into(), total.into());
        fields.insert("cost_today".into(), json!({"day": day, "usd": today}));
    }
    if let Some(cool) = row.get::<_, Option<String>>(4).and_then(|t| serde_json::from_str::<Value>(&t).ok()) {
        fields.insert("cool_down".into(), cool);
    }
    (pool, Read { fields, version })
}

/// The columns a changed ledger writes: `(usd_total, usd_today, day, cool_down)`.
fn columns_of(fields: &Map<String, Value>) -> (f64, f64, Option<String>, Option<String>) {
    let today = fields.get("cost_today");
    (
        fields.get("cost_usd_total").and_then(Value::as_f64).unwrap_or(0.0),
        today.and_then(|t| t.get("usd")).and_then(Value::as_f64).unwrap_or(0.0),
        today.and_then(|t| t.get("day")).and_then(Value::as_str).map(str::to_owned),
        fields.get("cool_down").map(Value::to_string),
    )
}

impl PgStore {
    /// Reads `pool`'s ledger on `conn`; `None`: the pool has no row.
    fn read_ledger(&self, conn: &Conn, pool: &Pool) -> anyhow::Result<Option<Read>> {
        let sql = conn.sql(&format!("{READ} WHERE p.pool = $1"));
        let name = pool.name().to_owned();
        let row =
            conn.call(&Waiting::plain(), Some(ANSWER_WITHIN), "read the pool's ledger", move |client| {
                client.query_typed(&sql, &[(&name, Type::TEXT)])
            })?;
        Ok(row.first().map(|r| fields_of(r).1))
    }

    /// `Lease::update_pool_ledger`: a compare-and-set on the row's version.
    pub(super) fn update_ledger(
        &self,
        conn: &Conn,
        pool: &Pool,
        change: &mut dyn FnMut(&mut Map<String, Value>),
    ) -> anyhow::Result<Map<String, Value>> {
        let add = conn.sql(
            "INSERT INTO {s}.chan_run_pool_ledger (pool_id) SELECT id FROM {s}.chan_run_pool WHERE pool = $1 \
             ON CONFLICT (pool_id) DO NOTHING",
        );
        let write = conn.sql(
            "UPDATE {s}.chan_run_pool_ledger l SET usd_total = pg_catalog.round($3::numeric, 9), \
             usd_today = pg_catalog.round($4::numeric, 9), day = $5::date, cool_down = $6::jsonb, \
             version = l.version + 1 FROM {s}.chan_run_pool p WHERE p.id = l.pool_id AND p.pool = $1 \
             AND l.version = $2",
        );
        for _ in 0..MAX_TRIES {
            let Some(Read { fields: before, version }) = self.read_ledger(conn, pool)? else {
                bail!("pool {} has no row in the store (removed by gc while held?)", pool.name());
            };
            let mut fields = before.clone();
            change(&mut fields);
            if fields == before {
                return Ok(fields);
            }
            let Some(version) = version else {
                let (add, name) = (add.clone(), pool.name().to_owned());
                conn.call(&Waiting::plain(), Some(ANSWER_WITHIN), "add the pool's ledger", move |client| {
                    client.query_typed(&add, &[(&name, Type::TEXT)]).map(drop)
                })?;
                continue;
            };
            let (total, today, day, cool) = columns_of(&fields);
            let (write, name) = (write.clone(), pool.name().to_owned());
            let written = conn.call(
                &Waiting::plain(),
                Some(ANSWER_WITHIN),
                "write the pool's ledger",
                move |client| {
                    let params: [(&(dyn ToSql + Sync), Type); 6] = [
                        (&name, Type::TEXT),
                        (&version, Type::INT8),
                        (&total, Type::FLOAT8),
                        (&today, Type::FLOAT8),
                        (&day, Type::TEXT),
                        (&cool, Type::TEXT),
                    ];
                    client.execute_typed(&write, &params)
                },
            )?;
            if written == 1 {
                return Ok(fields);
            }
        }
        bail!("pool {}'s ledger kept changing under this run ({MAX_TRIES} tries)", pool.name())
    }

    /// `Lease::charge_pool`: adds `cost` in one statement, to the server's UTC day.
    pub(super) fn charge_ledger(&self, conn: &Conn, pool: &Pool, cost: f64) -> anyhow::Result<()> {
        let sql = conn.sql(
            "INSERT INTO {s}.chan_run_pool_ledger AS l (pool_id, usd_total, usd_today, day, version) \
             SELECT p.id, pg_catalog.round($2::numeric, 9), pg_catalog.round($2::numeric, 9), \
               (pg_catalog.now() AT TIME ZONE 'UTC')::date, 1 FROM {s}.chan_run_pool p WHERE p.pool = $1 \
             ON CONFLICT (pool_id) DO UPDATE SET usd_total = l.usd_total + EXCLUDED.usd_total, \
               usd_today = CASE WHEN l.day = EXCLUDED.day THEN l.usd_today ELSE 0 END + EXCLUDED.usd_today, \
               day = EXCLUDED.day, version = l.version + 1",
        );
        let name = pool.name().to_owned();
        let charged =
            conn.call(&Waiting::plain(), Some(ANSWER_WITHIN), "charge the pool's ledger", move |client| {
                client.execute_typed(&sql, &[(&name, Type::TEXT), (&cost, Type::FLOAT8)])
            })?;
        if charged != 1 {
            bail!("pool {} has no row in the store (removed by gc while held?)", pool.name());
        }
        Ok(())
    }

    /// `Lease::take_pool_probe`: tries the probe lock on the lease's connection; the
    /// pool's id if got.
    pub(super) fn try_probe(&self, conn: &Conn, pool: &Pool) -> anyhow::Result<Option<i32>> {
        let sql = conn.sql(&format!(
            "SELECT p.id, pg_catalog.pg_try_advisory_lock({}, p.id), pg_catalog.pg_backend_pid() \
             FROM {{s}}.chan_run_pool p WHERE p.pool = $1",
            probe_ns()
        ));
        let name = pool.name().to_owned();
        let rows =
            conn.call(&Waiting::plain(), Some(ANSWER_WITHIN), "try the pool's probe", move |client| {
                client.query_typed(&sql, &[(&name, Type::TEXT)])
            })?;
        let Some(row) = rows.first() else {
            bail!("pool {} has no row in the store (removed by gc while held?)", pool.name());
        };
        conn.check_backend(row.get(2))?;
        Ok(row.get::<_, bool>(1).then(|| row.get(0)))
    }

    /// Unlocks the probe locks `ids` (one unlock per take) on the lease's connection.
    pub(super) fn unlock_probes_sql(conn: &Conn) -> String {
        conn.sql(&format!(
            "SELECT pg_catalog.pg_advisory_unlock({}, id) FROM pg_catalog.unnest($1::int4[]) id",
            probe_ns()
        ))
    }

    /// `Lease::wait_pool_probe`: waits for the probe lock (shared) on a connection of
    /// its own, closed at once when granted: the probe's outcome is in the ledger.
    pub(super) fn wait_probe(
        &self,
        pool: &Pool,
        deadline: Option<Instant>,
        control: &'static Control,
    ) -> Result<(), AcquireError> {
        let waiting = Waiting::watched(control, deadline);
        let conn = self.connect(&waiting)?;
        let sql = conn.sql(&format!(
            "SELECT pg_catalog.pg_backend_pid(), pg_catalog.pg_advisory_lock_shared({}, p.id)::text \
             FROM {{s}}.chan_run_pool p WHERE p.pool = $1",
            probe_ns()
        ));
        let name = pool.name().to_owned();
        let got = conn.call(&waiting, None, "wait for the pool's probe", move |client| {
            client.query_typed(&sql, &[(&name, Type::TEXT)])
        });
        match got {
            Ok(rows) => {
                if let Some(row) = rows.first() {
                    conn.check_backend(row.get(0))?;
                }
                Ok(())
            }
            Err(Fault::Busy) => Err(AcquireError::Busy),
            Err(other) => Err(other.into()),
        }
    }

    /// `Store::pool_ledgers`: every pool (or the named ones) that has a ledger row.
    pub(super) fn ledgers(&self, only: &[Channel]) -> anyhow::Result<Vec<PoolLedger>> {
        let wait = Waiting::plain();
        let conn = self.connect(&wait)?;
        let names: Vec<String> = only.iter().map(|c| c.name().to_owned()).collect();
        let sql = conn.sql(&format!(
            "{READ} WHERE l.pool_id IS NOT NULL AND (pg_catalog.cardinality($1::text[]) = 0 OR p.pool = ANY($1)) \
             ORDER BY p.pool"
        ));
        let rows = conn.call(&wait, Some(ANSWER_WITHIN), "read the pools' ledgers", move |client| {
            match client.query_typed(&sql, &[(&names, Type::TEXT_ARRAY)]) {
                // A schema older than the table (status never migrates).
                Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(Vec::new()),
                other => other,
            }
        })?;
        Ok(rows
            .iter()
            .map(|r| {
                let (pool, read) = fields_of(r);
                PoolLedger { pool, fields: read.fields }
            })
            .collect())
    }
}
