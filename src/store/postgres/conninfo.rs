//! `--store` read as libpq reads a connection string: a URL (`postgres://…`,
//! `postgresql://…`) or `key=value` words, then filled in, as psql would, from the
//! service file (`service=`, `PGSERVICE`), libpq's environment (`PGHOST`, `PGPORT`,
//! `PGUSER`, `PGDATABASE`, `PGPASSWORD`, `PGSSLMODE`, …), the password file
//! (`PGPASSFILE`, `~/.pgpass`) and libpq's defaults. Messages never show a password:
//! a string that cannot be read is described, not echoed.

use super::pgfiles;
use anyhow::{anyhow, bail};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The parameters chan-run takes (libpq's names); others are refused by name.
pub const KNOWN: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "connect_timeout",
    "options",
    "sslmode",
    "sslrootcert",
    "service",
    "target_session_attrs",
    "channel_binding",
    "application_name",
    "fallback_application_name",
];

/// libpq's environment variable for each parameter it has one for.
const ENV: &[(&str, &str)] = &[
    ("host", "PGHOST"),
    ("hostaddr", "PGHOSTADDR"),
    ("port", "PGPORT"),
    ("dbname", "PGDATABASE"),
    ("user", "PGUSER"),
    ("password", "PGPASSWORD"),
    ("passfile", "PGPASSFILE"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("options", "PGOPTIONS"),
    ("sslmode", "PGSSLMODE"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("target_session_attrs", "PGTARGETSESSIONATTRS"),
    ("channel_binding", "PGCHANNELBINDING"),
];

/// Connection parameters by libpq name.
pub type Params = BTreeMap<String, String>;

/// The parameters as `text` gives them, checked by name (nothing filled in yet).
pub fn parse(text: &str) -> anyhow::Result<Params> {
    let text = text.trim();
    let params = match text.split_once("://") {
        Some((scheme, rest)) if is_postgres(scheme) => parse_url(rest)?,
        Some((scheme, _)) if scheme.len() < 40 && !scheme.contains(['@', ' ', '=']) => bail!(
            "--store: {scheme}:// is not a PostgreSQL URL: use postgres://USER@HOST[:PORT]/DB (or libpq's key=value words), \
             or leave --store and CHAN_RUN_STORE unset for the local state directory"
        ),
        _ if text.contains('=') => parse_words(text)?,
        _ => bail!(
            "--store: not a PostgreSQL URL (postgres://USER@HOST[:PORT]/DB) nor libpq's key=value words; leave --store \
             and CHAN_RUN_STORE unset for the local state directory"
        ),
    };
    for key in params.keys() {
        if !KNOWN.contains(&key.as_str()) {
            bail!("--store: unknown parameter {key:?} (chan-run takes libpq's {})", KNOWN.join(", "));
        }
    }
    Ok(params)
}

/// Whether `text`, unreadable as it may be, seems to carry a password (`user:pw@`,
/// `password=`).
pub fn may_hold_password(text: &str) -> bool {
    let userinfo = text.split_once("://").and_then(|(_, rest)| rest.split('/').next()?.rsplit_once('@'));
    text.contains("password") || userinfo.is_some_and(|(info, _)| info.contains(':'))
}

fn is_postgres(scheme: &str) -> bool {
    scheme.eq_ignore_ascii_case("postgres") || scheme.eq_ignore_ascii_case("postgresql")
}

/// `[user[:password]@][host[:port][,…]][/dbname][?key=value&…]`, percent-decoded.
fn parse_url(rest: &str) -> anyhow::Result<Params> {
    let mut params = Params::new();
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, dbname) = rest.split_once('/').unwrap_or((rest, ""));
    let hosts = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = userinfo.split_once(':').map_or((userinfo, None), |(u, p)| (u, Some(p)));
            put(&mut params, "user", decode(user, "the user name")?);
            if let Some(password) = password {
                params.insert("password".into(), decode(password, "the password")?);
            }
            hosts
        }
        None => authority,
    };
    let (mut names, mut ports) = (Vec::new(), Vec::new());
    for spec in hosts.split(',').filter(|s| !s.is_empty()) {
        let (name, port) = split_host_port(spec)?;
        names.push(decode(name, "a host name")?);
        ports.push(port.to_owned());
    }
    put(&mut params, "host", names.join(","));
    if ports.iter().any(|p| !p.is_empty()) {
        params.insert("port".into(), ports.join(","));
    }
    put(&mut params, "dbname", decode(dbname, "the database name")?);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(key, "a parameter's name")?;
        let value = decode(value, &format!("parameter {key:?}"))?;
        params.insert(key, value);
    }
    Ok(params)
}

fn put(params: &mut Params, key: &str, value: String) {
    if !value.is_empty() {
        params.insert(key.into(), value);
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(spec: &str) -> anyhow::Result<(&str, &str)> {
    if let Some(v6) = spec.strip_prefix('[') {
        let (addr, after) =
            v6.split_once(']').ok_or_else(|| anyhow!("--store: an IPv6 host lacks its ']'"))?;
        return Ok((addr, after.strip_prefix(':').unwrap_or(after)));
    }
    Ok(spec.rsplit_once(':').unwrap_or((spec, "")))
}

/// Percent-decoding; `what` names the part in an error (never its value).
fn decode(text: &str, what: &str) -> anyhow::Result<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(byte.ok_or_else(|| anyhow!("--store: {what} has a bad %-escape"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| anyhow!("--store: {what} is not UTF-8 once decoded"))
}

/// libpq's `key=value` words: values bare (`\` escapes) or single-quoted.
fn parse_words(text: &str) -> anyhow::Result<Params> {
    let mut params = Params::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(params);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            bail!("--store: {key:?} lacks its \"=\" (libpq's words are key=value)");
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => bail!("--store: the value of {key:?} lacks its closing quote"),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        params.insert(key, value);
    }
}

/// Fills in what `params` leaves out: the service's section, libpq's environment, the
/// password file, libpq's defaults.
pub fn complete(params: &mut Params) -> anyhow::Result<()> {
    let service = params.get("service").cloned().or_else(|| var("PGSERVICE"));
    if let Some(service) = service {
        for (key, value) in pgfiles::service_section(&service)? {
            params.entry(key).or_insert(value);
        }
    }
    for (key, var_name) in ENV {
        if !params.contains_key(*key)
            && let Some(value) = var(var_name)
        {
            params.insert((*key).into(), value);
        }
    }
    params.entry("port".into()).or_insert_with(|| "5432".into());
    if !params.contains_key("user") {
        let user = os_user().ok_or_else(|| {
            anyhow!(
                "--store names no user, PGUSER is not set and this user has no name: add USER@ to the URL"
            )
        })?;
        params.insert("user".into(), user);
    }
    let user = params["user"].clone();
    params.entry("dbname".into()).or_insert(user);
    if !params.contains_key("host") && !params.contains_key("hostaddr") {
        params.insert("host".into(), default_host(&params["port"]));
    }
    if !params.contains_key("password")
        && let Some(password) = pgfiles::from_passfile(params)?
    {
        params.insert("password".into(), password);
    }
    Ok(())
}

/// This process's user name, as libpq takes it: the effective uid's in `/etc/passwd`
/// (`USER` or `LOGNAME` where that has none).
fn os_user() -> Option<String> {
    let uid = rustix::process::geteuid().as_raw().to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let name = passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)? == uid).then(|| name.to_owned())
    });
    name.or_else(|| var("USER")).or_else(|| var("LOGNAME"))
}

pub(super) fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

pub(super) fn home() -> Option<PathBuf> {
    var("HOME").map(PathBuf::from)
}

/// libpq's default: the server's socket where Debian and the sources put it, else TCP
/// to localhost.
fn default_host(port: &str) -> String {
    let port = port.split(',').next().unwrap_or("5432");
    ["/run/postgresql", "/var/run/postgresql", "/tmp"]
        .into_iter()
        .find(|dir| std::path::Path::new(&format!("{dir}/.s.PGSQL.{port}")).exists())
        .unwrap_or("localhost")
        .to_owned()
}

/// The parameters as a URL without the password (what the command's `CHAN_RUN_STORE`
/// gets), percent-encoded.
pub fn url_without_password(params: &Params) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                b => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let mut url = String::from("postgres://");
    if let Some(user) = params.get("user") {
        url.push_str(&format!("{}@", enc(user)));
    }
    let hosts: Vec<&str> = params.get("host").map(|h| h.split(',').collect()).unwrap_or_default();
    let ports: Vec<&str> = params.get("port").map(|p| p.split(',').collect()).unwrap_or_default();
    let specs: Vec<String> = (0..hosts.len().max(ports.len()))
        .map(|i| {
            let host = hosts.get(i).copied().unwrap_or("");
            let host = if host.contains(':') { format!("[{host}]") } else { enc(host) };
            let port = ports.get(i).or(ports.first()).filter(|p| !p.is_empty());
            port.map_or(host.clone(), |p| format!("{host}:{p}"))
        })
        .collect();
    url.push_str(&specs.join(","));
    if let Some(db) = params.get("dbname") {
        url.push_str(&format!("/{}", enc(db)));
    }
    let query: Vec<String> = params
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "user" | "password" | "host" | "port" | "dbname"))
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect();
    if !query.is_empty() {
        url.push_str(&format!("?{}", query.join("&")));
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Params {
        pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    #[test]
    fn urls_and_words_read_as_libpq_reads_them() {
        let url =
            parse(" POSTGRESQL://bot:s%40cret@db.example:6432/bots?options=-c%20search_path%3Dx ").unwrap();
        assert_eq!(
            url,
            p(&[
                ("user", "bot"),
                ("password", "s@cret"),
                ("host", "db.example"),
                ("port", "6432"),
                ("dbname", "bots"),
                ("options", "-c search_path=x")
            ])
        );
        let words = parse(r"host=db port = 5433 password='a b\'c' dbname=bo\ ts").unwrap();
        assert_eq!(words, p(&[("host", "db"), ("port", "5433"), ("password", "a b'c"), ("dbname", "bo ts")]));
        assert_eq!(parse("postgres://[::1]:5,h2/db").unwrap()["host"], "::1,h2");
        assert_eq!(
            url_without_password(&url),
            "postgres://bot@db.example:6432/bots?options=-c%20search_path%3Dx"
        );
    }

    #[test]
    fn refusals_name_the_problem_and_never_the_password() {
        for (text, says) in [
            ("postgresql+psycopg2://u:hunter2@h/db", "postgresql+psycopg2:// is not a PostgreSQL URL"),
            ("mysql://u:hunter2@h/db", "mysql://"),
            ("postgres://u:hunter2@h/db?sslcert=x", "unknown parameter \"sslcert\""),
            ("host=h password=hunter2 bogus=1", "unknown parameter \"bogus\""),
            ("host=h password='hunter2", "lacks its closing quote"),
            ("hunter2", "not a PostgreSQL URL"),
            ("postgres://u:hunt%zzer2@h/db", "the password has a bad %-escape"),
        ] {
            let e = format!("{:#}", parse(text).unwrap_err());
            assert!(e.contains(says), "{text}: {e}");
            assert!(!e.contains("hunter2") && !e.contains("hunt"), "{text}: {e}");
        }
    }
}
