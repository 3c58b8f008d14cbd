//! `chan-run history CHANNEL`: the channel's last runs, newest first.

use crate::channel::Channel;
use crate::cli::HistoryArgs;
use crate::exit_code::ExitCode;
use crate::store::Store;

pub fn history(store: Option<&dyn Store>, args: HistoryArgs) -> anyhow::Result<ExitCode> {
    let channel = Channel::new(&args.channel)?;
    let entries = match store {
        Some(store) => store.history(&channel, args.count)?,
        None => Vec::new(),
    };
    let mut out = String::new();
    if args.json {
        for e in &entries {
            out.push_str(&serde_json::to_string(e)?);
            out.push('\n');
        }
    } else if entries.is_empty() {
        out.push_str(&format!("no runs recorded for channel {channel}\n"));
    } else {
        let rows: Vec<[String; 6]> = entries
            .iter()
            .map(|e| {
                let named = crate::state::named(e.outcome, e.kind, e.api_status);
                let mut ended = match (e.exit_code, e.signal) {
                    (_, Some(sig)) => format!("{named} sig{sig}"),
                    (Some(code), None) => format!("{named} {code}"),
                    (None, None) => named,
                };
                if let Some(note) = &e.session_note {
                    ended.push_str(&format!(" [{note}]"));
                }
                let session = match (&e.session_before, &e.session_after) {
                    (before, after) if before == after => short_id(after),
                    (before, after) => format!("{} -> {}", short_id(before), short_id(after)),
                };
                [
                    e.started_at.clone(),
                    crate::duration::short(std::time::Duration::from_millis(e.duration_ms)),
                    ended,
                    e.spent.cost_usd.map_or_else(|| "-".to_owned(), crate::spend::shown),
                    e.pid.to_string(),
                    session,
                ]
            })
            .collect();
        out = crate::ui::table(["STARTED", "TOOK", "ENDED", "COST", "PID", "SESSION"], None, &rows);
    }
    crate::ui::write_out(&out)?;
    Ok(ExitCode::OK)
}

fn short_id(id: &Option<String>) -> String {
    match id {
        None => "-".to_owned(),
        Some(id) if id.chars().count() > 13 => format!("{}…", id.chars().take(12).collect::<String>()),
        Some(id) => id.clone(),
    }
}
