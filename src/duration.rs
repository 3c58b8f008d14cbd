//! Durations as `timeout(1)` and people write them: a bare number is seconds and may
//! be fractional (`300`, `0.5`); suffixed forms (`250ms`, `1.5s`, `5m`, `1h30m`) go
//! through `humantime`.

use std::time::Duration;

pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let bad = || format!("'{text}' is not a duration; write seconds (300, 0.5) or 250ms, 1.5s, 5m, 1h30m");
    if text.is_empty() {
        return Err(bad());
    }
    let (d, nonzero) = if text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs: f64 = text.parse().map_err(|_| bad())?;
        (Duration::try_from_secs_f64(secs).map_err(|_| bad())?, secs > 0.0)
    } else {
        let d = humantime::parse_duration(text).map_err(|_| bad())?;
        (d, !d.is_zero())
    };
    // Below a millisecond a duration means nothing chan-run can keep (and `0` means
    // "none" for --timeout): say so rather than round it away.
    if nonzero && d < Duration::from_millis(1) {
        return Err(format!("'{text}' is shorter than 1ms; write 0 for none, or 1ms or more"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_spec_forms() {
        let ms = |n| Duration::from_millis(n);
        for (text, want) in [
            ("300", ms(300_000)),
            ("0.5", ms(500)),
            ("0", ms(0)),
            ("250ms", ms(250)),
            ("1.5s", ms(1500)),
            ("90s", ms(90_000)),
            ("5m", ms(300_000)),
            ("1h30m", ms(5_400_000)),
        ] {
            assert_eq!(parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_malformed() {
        for text in ["", "abc", "5x", "-1", "1..2", "1e3", "s", "nan", "inf", "0.0000000001", "999us", "1ns"]
        {
            assert!(parse(text).is_err(), "{text:?} was accepted");
        }
    }
}

/// A duration as people glance at it: `850ms`, `12s`, `3m`, `2h5m`, `3d4h`.
pub fn short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => match (s / 3600, s % 3600 / 60) {
            (h, 0) => format!("{h}h"),
            (h, m) => format!("{h}h{m}m"),
        },
        _ => match (s / 86400, s % 86400 / 3600) {
            (d, 0) => format!("{d}d"),
            (d, h) => format!("{d}d{h}h"),
        },
    }
}

#[cfg(test)]
mod short_tests {
    use super::*;

    #[test]
    fn glanceable() {
        let s = |n| short(Duration::from_secs(n));
        assert_eq!(short(Duration::from_millis(850)), "850ms");
        assert_eq!(
            (s(12), s(185), s(3600), s(7500), s(90000)),
            ("12s".into(), "3m".into(), "1h".into(), "2h5m".into(), "1d1h".into())
        );
    }
}
