//! The one place that prints: chan-run's own lines on stderr (`chan-run: …`), what a
//! command prints on stdout, and the aligned tables of `status` and `history`. A leaf:
//! any layer may warn through it, and a failing stderr or stdout never becomes a panic
//! (exit 101) that would hide the command's status.

use std::fmt::Display;
use std::io::Write;

/// A line of chan-run's own on stderr: an error, or a note the caller did not silence.
pub fn say(message: impl Display) {
    let _ = writeln!(std::io::stderr(), "chan-run: {message}");
}

/// News about chan-run's own bookkeeping; printed even with `--quiet`.
pub fn warn(message: impl Display) {
    say(format_args!("warning: {message}"));
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
pub fn write_out(text: &str) -> std::io::Result<()> {
    match std::io::stdout().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e),
        _ => Ok(()),
    }
}

/// An aligned table: columns as wide as their widest cell (each capped at `caps[i]`
/// characters, the header's width at least; a cut cell ends in `…`), two spaces apart,
/// no trailing blanks.
pub fn table<const N: usize>(headers: [&str; N], caps: Option<[usize; N]>, rows: &[[String; N]]) -> String {
    let mut widths = headers.map(|h| h.chars().count());
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let cap = caps.map_or(usize::MAX, |c| c[i].max(headers[i].len()));
            widths[i] = widths[i].max(cell.chars().count()).min(cap);
        }
    }
    let mut out = String::new();
    for row in std::iter::once(headers.map(str::to_owned)).chain(rows.iter().cloned()) {
        let cells: Vec<String> =
            row.iter().zip(widths).map(|(cell, w)| format!("{:<w$}", fit(cell, w))).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Cuts `text` to `width` characters, marking the cut with `…`.
fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_cap() {
        let rows = [["a".to_owned(), "long cell here".to_owned()], ["bbb".to_owned(), "x".to_owned()]];
        let out = table(["H1", "H2"], Some([10, 6]), &rows);
        assert_eq!(out, "H1   H2\na    long …\nbbb  x\n");
        let out = table(["H1", "H2"], None, &rows);
        assert_eq!(out.lines().nth(1), Some("a    long cell here"));
    }
}
