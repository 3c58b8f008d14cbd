//! `--budget` and `--pool-budget`: checked before each attempt starts, holding the
//! channel (its record's `cost_today`) and the pools' seats (their ledgers), so runs in
//! flight are the only ones that can overshoot; and what a finished run adds to its
//! pools' ledgers.

use crate::channel::Channel;
use crate::cli::RunArgs;
use crate::pool::Pool;
use crate::spend;
use crate::state::ChannelRecord;
use crate::store::{Lease, NO_LEDGERS, Store};
use std::time::SystemTime;

/// What this store cannot do for the run is refused before anything runs.
pub fn refuse_unsupported(store: &dyn Store, args: &RunArgs) -> anyhow::Result<()> {
    if store.keeps_pool_ledgers() {
        return Ok(());
    }
    if args.pool_budget.is_some() {
        anyhow::bail!("--pool-budget {NO_LEDGERS}");
    }
    if args.retry.is_some() && !args.pools.is_empty() {
        anyhow::bail!("--retry with --pool (the pool's shared cool-down) {NO_LEDGERS}");
    }
    Ok(())
}

/// The line to say if the channel's or a pool's budget for today is spent.
pub fn spent(
    lease: &mut dyn Lease,
    record: &ChannelRecord,
    args: &RunArgs,
    channel: &Channel,
    pools: &[Pool],
    now: SystemTime,
) -> anyhow::Result<Option<String>> {
    let today = spend::totals(&record.extra, now).today_usd;
    if let Some(spent) = spend::over(today, args.budget, now) {
        return Ok(Some(format!(
            "channel {channel}: --budget reached: {}; nothing ran",
            spent.describe(now)
        )));
    }
    if args.pool_budget.is_none() {
        return Ok(None);
    }
    for pool in pools {
        let ledger = lease.update_pool_ledger(pool, &mut |_| {})?;
        let today = spend::totals(&ledger, now).today_usd;
        if let Some(spent) = spend::over(today, args.pool_budget, now) {
            return Ok(Some(format!(
                "pool {}: --pool-budget reached: {}; nothing ran on channel {channel}",
                pool.name(),
                spent.describe(now)
            )));
        }
    }
    Ok(None)
}

/// Adds a finished run's cost to each of its pools' ledgers (where the store keeps
/// them), while the run still holds its seats.
pub fn charge_pools(store: &dyn Store, lease: &mut dyn Lease, pools: &[Pool], cost: Option<f64>) {
    let Some(cost) = cost.filter(|c| *c > 0.0) else { return };
    if !store.keeps_pool_ledgers() {
        return;
    }
    let now = SystemTime::now();
    for pool in pools {
        let charged = lease.update_pool_ledger(pool, &mut |ledger| spend::add_cost(ledger, Some(cost), now));
        if let Err(e) = charged {
            crate::ui::warn(format!("the run's cost was not added to pool {}'s ledger ({e:#})", pool.name()));
        }
    }
}
