//! Pools (`--pool NAME:N`): a cap of N runs at once shared by every channel that names
//! the pool. A pool's name follows the channel rules (and has the same injective file
//! stem); its seats are numbered 1 to N, and a caller takes only a seat among the first
//! N it names, so callers that agree on N share a cap of exactly N.

use crate::channel::Channel;

/// The most seats a pool may have.
pub const MAX_SEATS: u32 = 10_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: Channel,
    /// The seats this caller may take: 1 to `seats`.
    pub seats: u32,
}

impl Pool {
    pub fn name(&self) -> &str {
        self.name.name()
    }
}

/// `NAME:N`, split at the last `:` (a name may hold colons: `anthropic:opus:2`).
pub fn parse(text: &str) -> Result<Pool, String> {
    let Some((name, seats)) = text.rsplit_once(':') else {
        return Err(format!("'{text}' has no seat count; write NAME:N, e.g. --pool account:4"));
    };
    let seats = match seats.parse::<u32>() {
        Ok(0) => return Err("a pool needs at least 1 seat; write NAME:N with N from 1 to 10000".into()),
        Ok(n) if n <= MAX_SEATS => n,
        Ok(_) | Err(_) if seats.bytes().all(|b| b.is_ascii_digit()) && !seats.is_empty() => {
            return Err(format!("{seats} seats is more than the limit of {MAX_SEATS}"));
        }
        _ => return Err(format!("'{seats}' is not a seat count; write NAME:N with N from 1 to {MAX_SEATS}")),
    };
    let name = Channel::new(name).map_err(|e| e.to_string().replacen("channel name", "pool name", 1))?;
    Ok(Pool { name, seats })
}

/// Checks a run's pools: no name twice. Returns them in name order (the order seats are
/// taken in, so two callers naming the same pools never wait for each other in a
/// circle).
pub fn in_taking_order(mut pools: Vec<Pool>) -> Result<Vec<Pool>, String> {
    pools.sort_by(|a, b| a.name().as_bytes().cmp(b.name().as_bytes()));
    if let Some(twice) = pools.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(format!("pool {} is named twice; give each pool once", twice[0].name()));
    }
    Ok(pools)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_at_the_last_colon() {
        let pool = parse("anthropic:opus:2").unwrap();
        assert_eq!((pool.name(), pool.seats), ("anthropic:opus", 2));
        assert_eq!(parse("p:10000").unwrap().seats, 10_000);
    }

    #[test]
    fn bad_counts_and_names_are_refused_with_the_fix() {
        for (text, says) in [
            ("p", "no seat count"),
            ("p:0", "at least 1 seat"),
            ("p:10001", "limit of 10000"),
            ("p:99999999999", "limit of 10000"),
            ("p:two", "not a seat count"),
            ("p:", "not a seat count"),
            ("p:-1", "not a seat count"),
            (":3", "pool name is empty"),
            ("a\u{7}b:3", "pool name has a control character"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn pools_are_taken_in_name_order_and_never_named_twice() {
        let pools = vec![parse("opus:2").unwrap(), parse("account:6").unwrap()];
        let names: Vec<_> = in_taking_order(pools).unwrap().iter().map(|p| p.name().to_owned()).collect();
        assert_eq!(names, ["account", "opus"]);
        assert!(in_taking_order(vec![parse("a:1").unwrap(), parse("a:2").unwrap()]).is_err());
    }
}
