//! `chan-run gc --idle-for DUR [--dry-run]`: removes what idle channels left behind.

use crate::cli::GcArgs;
use crate::exit_code::ExitCode;
use crate::store::Store;

pub fn gc(
    store: &dyn Store,
    args: GcArgs,
    control: &'static crate::control::Control,
) -> anyhow::Result<ExitCode> {
    let report = store.gc(args.idle_for, args.dry_run, control)?;
    let items = report.items;
    let mut out = String::new();
    let verb = if args.dry_run { "would remove" } else { "removed" };
    for item in &items {
        let idle = crate::duration::short(item.idle);
        let what = if item.pool { format!("pool {}", item.channel) } else { item.channel.clone() };
        match item.kept {
            None => out.push_str(&format!("{verb} {what} (idle {idle})\n")),
            Some(why) => out.push_str(&format!("kept {what} (idle {idle}): {why}\n")),
        }
    }
    if items.is_empty() {
        out.push_str("no channel idle that long\n");
    }
    for note in &report.notes {
        out.push_str(note);
        out.push('\n');
    }
    crate::ui::write_out(&out)?;
    Ok(ExitCode::OK)
}
