//! What `--store` says, made into the client's configuration: the parameters
//! (conninfo.rs), TLS (`sslmode`, `sslrootcert`; the server's certificate always
//! verified), the bound on connecting, how messages name the server (never with its
//! password), and a warning when the password sits on the command line.

use super::PgStore;
use super::conn::{CLIENT_GIVES_UP_AFTER, CONNECT_WITHIN, Fault, pg_error, transient};
use super::conninfo::{self, Params};
use anyhow::{anyhow, bail};
use postgres::config::{ChannelBinding, SslMode, TargetSessionAttrs};
use std::time::Duration;
use tokio_postgres_rustls::MakeRustlsConnect;

impl PgStore {
    pub fn open(text: &str) -> anyhow::Result<PgStore> {
        let given = conninfo::parse(text).inspect_err(|_| {
            if conninfo::may_hold_password(text) {
                warn_if_in_argv(text);
            }
        })?;
        if let Some(password) = given.get("password").filter(|p| !p.is_empty()) {
            warn_if_in_argv(password);
        }
        connect_within(&given)?;
        tls_mode(&given)?;
        let mut params = given.clone();
        conninfo::complete(&mut params)?;
        let mut config = postgres::Config::new();
        apply(&mut config, &params)?;
        let connect_within = connect_within(&params)?;
        let tls = match tls_mode(&params)? {
            None => None,
            Some(root) => Some(tls_connector(root)?),
        };
        config.ssl_mode(if tls.is_some() { SslMode::Require } else { SslMode::Disable });
        let port = params["port"].split(',').next().map(|p| format!(":{p}")).unwrap_or_default();
        let hosts = params.get("host").or(params.get("hostaddr")).cloned().unwrap_or_default();
        let shown = format!("{hosts}{port}/{}", params["dbname"]);
        let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
        let public_url = conninfo::url_without_password(&given);
        Ok(PgStore { config, shown, host, tls, connect_within, public_url })
    }

    /// The client's configuration for one connection: named after this process, its
    /// socket's timeouts set.
    pub(super) fn client_config(&self) -> postgres::Config {
        let mut config = self.config.clone();
        let mut name = format!("chan-run {} {}", std::process::id(), self.host);
        super::conn::truncate(&mut name, 63);
        config.application_name(&name);
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(2))
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3)
            .tcp_user_timeout(CLIENT_GIVES_UP_AFTER);
        if let Some(within) = self.connect_within {
            config.connect_timeout(within);
        }
        config
    }

    /// How long connecting may take: `connect_timeout` (at least 2 s, as libpq), else
    /// [`CONNECT_WITHIN`]; `None` for `connect_timeout=0` (libpq's "no limit").
    pub(super) fn connect_within(&self) -> Option<Duration> {
        self.connect_within
    }

    /// A failed connection, with what to check: retryable when the server is down,
    /// restarting or out of connection slots.
    pub(super) fn connect_fault(&self, e: &postgres::Error) -> Fault {
        let code = e.code().map(|c| c.code());
        let hint = match code {
            Some("53300") => {
                "; the server has no free connection slot (max_connections, or the role's CONNECTION LIMIT): try again later"
            }
            Some(c) if c.starts_with("28") => {
                "; check the user and password (the URL, PGUSER, PGPASSWORD, ~/.pgpass or PGPASSFILE)"
            }
            Some("3D000") => "; check the database name in --store / CHAN_RUN_STORE (or PGDATABASE)",
            Some(_) => "",
            None if pg_error(e).contains("password missing") => {
                "; the server asks for a password and none was given: check the user and password (~/.pgpass or PGPASSFILE, PGPASSWORD, or the URL)"
            }
            None if self.tls.is_some() && !transient(e) => {
                "; with sslmode=require chan-run verifies the server's certificate: name its CA with sslrootcert=FILE in the URL or PGSSLROOTCERT"
            }
            None if transient(e) => {
                "; is the server running, and are the host and port in --store / CHAN_RUN_STORE right?"
            }
            None => "; check --store / CHAN_RUN_STORE",
        };
        let error = anyhow!("cannot connect to PostgreSQL at {} ({}){hint}", self.shown, pg_error(e));
        if transient(e) { Fault::Unavailable(error) } else { Fault::Failed(error) }
    }
}

/// The parameters into the client library's configuration (TLS apart).
fn apply(config: &mut postgres::Config, params: &Params) -> anyhow::Result<()> {
    for (key, value) in params {
        match key.as_str() {
            "host" => {
                for host in value.split(',') {
                    match host.starts_with('/') {
                        true => config.host_path(host),
                        false => config.host(host),
                    };
                }
            }
            "hostaddr" => {
                for addr in value.split(',') {
                    config.hostaddr(
                        addr.parse()
                            .map_err(|_| anyhow!("--store: hostaddr {addr:?} is not an IP address"))?,
                    );
                }
            }
            "port" => {
                for port in value.split(',') {
                    config.port(
                        port.parse().map_err(|_| anyhow!("--store: port {port:?} is not a port number"))?,
                    );
                }
            }
            "dbname" => drop(config.dbname(value)),
            "user" => drop(config.user(value)),
            "password" => drop(config.password(value)),
            "options" => drop(config.options(value)),
            "target_session_attrs" => drop(config.target_session_attrs(match value.as_str() {
                "any" => TargetSessionAttrs::Any,
                "read-write" => TargetSessionAttrs::ReadWrite,
                other => bail!("--store: target_session_attrs={other} is not one of any, read-write"),
            })),
            "channel_binding" => drop(config.channel_binding(match value.as_str() {
                "disable" => ChannelBinding::Disable,
                "prefer" => ChannelBinding::Prefer,
                "require" => ChannelBinding::Require,
                other => bail!("--store: channel_binding={other} is not one of disable, prefer, require"),
            })),
            // Read elsewhere, or chan-run's own: its sessions are named `chan-run PID HOST`.
            _ => {}
        }
    }
    Ok(())
}

/// `Some(root)` when `sslmode` is `require`, `verify-ca` or `verify-full` (all three
/// verify the server's certificate and name: stricter than libpq's `require`), with the
/// CA file from `sslrootcert` (else the system's store); `None` for no `sslmode` or
/// `disable`/`allow`/`prefer`, which chan-run takes as plain TCP: a certificate it cannot
/// check is no better than none.
fn tls_mode(params: &Params) -> anyhow::Result<Option<Option<std::path::PathBuf>>> {
    match params.get("sslmode").map(String::as_str) {
        None | Some("disable" | "allow" | "prefer") => Ok(None),
        Some("require" | "verify-ca" | "verify-full") => Ok(Some(params.get("sslrootcert").map(Into::into))),
        Some(other) => bail!(
            "--store: sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
        ),
    }
}

/// `connect_timeout` as libpq reads it: whole seconds, at least 2; 0 or less: no limit.
fn connect_within(params: &Params) -> anyhow::Result<Option<Duration>> {
    match params.get("connect_timeout") {
        Some(t) => match t.trim().parse::<i64>() {
            Ok(s) if s <= 0 => Ok(None),
            Ok(s) => Ok(Some(Duration::from_secs(s.max(2) as u64))),
            Err(_) => bail!("--store: connect_timeout={t:?} is not a whole number of seconds"),
        },
        None => Ok(Some(CONNECT_WITHIN)),
    }
}

/// Warns when `secret` (the password `--store` gives, or all of a `--store` that seems
/// to hold one) is in this process's arguments, which every user of the host can read
/// (`ps`, `/proc/PID/cmdline`).
fn warn_if_in_argv(secret: &str) {
    let in_argv = std::env::args_os().any(|arg| {
        let arg = arg.to_string_lossy();
        arg.contains(secret) || arg.contains(&secret.replace('@', "%40"))
    });
    if in_argv {
        crate::ui::warn(
            "--store carries a password on the command line, where every user of this host can read it (ps); \
             keep it in ~/.pgpass (or PGPASSFILE), PGPASSWORD or CHAN_RUN_STORE instead",
        );
    }
}

/// A TLS connector trusting `root` (a PEM file of CA certificates), else the system's
/// certificate store.
fn tls_connector(root: Option<std::path::PathBuf>) -> anyhow::Result<MakeRustlsConnect> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match &root {
        Some(path) => {
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| anyhow!("--store: cannot read sslrootcert {} ({e})", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| anyhow!("--store: sslrootcert {}: {e}", path.display()))?;
                roots.add(cert).map_err(|e| anyhow!("--store: sslrootcert {}: {e}", path.display()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert); // one odd certificate in the store is no reason to fail
            }
        }
    }
    if roots.is_empty() {
        bail!(
            "--store: sslmode asks for TLS but there is no CA certificate to verify the server with; name one with sslrootcert=FILE in the URL or PGSSLROOTCERT"
        );
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("TLS set-up: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_other_than_postgres_are_refused_with_the_fix() {
        let e = PgStore::open("mysql://x").err().unwrap().to_string();
        assert!(e.contains("postgres://USER@HOST"), "{e}");
        let e = PgStore::open("postgres://u@h/db?sslmode=bogus").err().unwrap().to_string();
        assert!(e.contains("sslmode=bogus is not one of"), "{e}");
        let e = PgStore::open("postgres://u@h/db?sslmode=verify-full&sslrootcert=/no/such%20file")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot read sslrootcert /no/such file"), "{e}");
        let e = PgStore::open("postgres://u@h/db?connect_timeout=abc").err().unwrap().to_string();
        assert!(e.contains("connect_timeout=\"abc\""), "{e}");
        let store = PgStore::open("postgres://u:secret@db.example:6432/bots").unwrap();
        assert_eq!(store.shown, "db.example:6432/bots");
        assert_eq!(store.public_url, "postgres://u@db.example:6432/bots");
    }
}
