//! What `--store` says: the URL read into the client's configuration, the password from
//! `PGPASSWORD`, TLS (`sslmode`, `sslrootcert`, the server's certificate always
//! verified), and how messages name the server (never with its password).

use super::PgStore;
use anyhow::{anyhow, bail};
use tokio_postgres_rustls::MakeRustlsConnect;

impl PgStore {
    pub fn open(url: &str) -> anyhow::Result<PgStore> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bail!(
                "--store {url:?} is not a store chan-run knows: use postgres://USER@HOST[:PORT]/DB, or leave --store and CHAN_RUN_STORE unset for the local state directory"
            );
        }
        let (url, tls) = read_tls(url)?;
        let mut config: postgres::Config = url.parse().map_err(|e| {
            anyhow!("--store: cannot read the URL ({e}); expected postgres://USER@HOST[:PORT]/DB")
        })?;
        let tls = match tls {
            None => {
                config.ssl_mode(postgres::config::SslMode::Disable);
                None
            }
            Some(root) => {
                config.ssl_mode(postgres::config::SslMode::Require);
                Some(tls_connector(root)?)
            }
        };
        if config.get_password().is_none()
            && let Some(password) = std::env::var_os("PGPASSWORD")
        {
            config.password(password.as_encoded_bytes());
        }
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                postgres::config::Host::Tcp(name) => name.clone(),
                postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let port = config.get_ports().first().map(|p| format!(":{p}")).unwrap_or_default();
        let shown = format!("{}{port}/{}", hosts.join(","), config.get_dbname().unwrap_or(""));
        let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
        Ok(PgStore { config, shown, host, tls })
    }
}

/// Takes libpq's TLS parameters out of the URL (the client library knows neither
/// `sslrootcert` nor `verify-*`): `Some(root)` when `sslmode` is `require`, `verify-ca`
/// or `verify-full` (all three verify the server's certificate and name: stricter than
/// libpq's `require`), with the CA file from `sslrootcert` or `PGSSLROOTCERT` (else the
/// system's store); `None` for no `sslmode` or `disable`/`allow`/`prefer`, which chan-run
/// takes as plain TCP: a certificate it cannot check is no better than none.
fn read_tls(url: &str) -> anyhow::Result<(String, Option<Option<std::path::PathBuf>>)> {
    let Some((base, query)) = url.split_once('?') else { return Ok((url.to_owned(), None)) };
    let mut kept = Vec::new();
    let mut tls = false;
    let mut root = std::env::var_os("PGSSLROOTCERT").filter(|r| !r.is_empty()).map(std::path::PathBuf::from);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslrootcert" => root = Some(percent_decode(value).into()),
            "sslmode" => match value {
                "disable" | "allow" | "prefer" => {}
                "require" | "verify-ca" | "verify-full" => tls = true,
                other => bail!(
                    "--store: sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ),
            },
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
    Ok((url, tls.then_some(root)))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).and_then(|&b| hex(b)), bytes.get(i + 2).and_then(|&b| hex(b))) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
        let (url, tls) =
            read_tls("postgres://u@h/db?options=-c%20x%3D1&sslmode=require&sslrootcert=%2Fca.pem").unwrap();
        assert_eq!(
            (url.as_str(), tls),
            ("postgres://u@h/db?options=-c%20x%3D1", Some(Some("/ca.pem".into())))
        );
        assert_eq!(read_tls("postgres://u@h/db?sslmode=prefer").unwrap(), ("postgres://u@h/db".into(), None));
        let shown = PgStore::open("postgres://u:secret@db.example:6432/bots").unwrap().shown;
        assert_eq!(shown, "db.example:6432/bots");
    }
}
