//! `--budget` and `--pool-budget`: checked before each attempt starts, holding the
//! channel (its record's `cost_today`) and the pools' seats (their ledgers), so runs in
//! flight are the only ones that can overshoot; and what a finished run adds to its
//! pools' ledgers.

use crate::channel::Channel;
use crate::cli::RunArgs;
use crate::pool::Pool;
use crate::spend;
use crate::state::ChannelRecord;
use crate::store::Lease;
use std::time::SystemTime;

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

/// Adds a finished run's cost to each of its pools' ledgers, while the run still holds
/// its seats.
pub fn charge_pools(lease: &mut dyn Lease, pools: &[Pool], cost: Option<f64>) {
    let Some(cost) = cost.filter(|c| c.is_finite() && *c > 0.0) else { return };
    for pool in pools {
        if let Err(e) = lease.charge_pool(pool, cost) {
            crate::ui::warn(format!("the run's cost was not added to pool {}'s ledger ({e:#})", pool.name()));
        }
    }
}
