//! libpq's files, read as libpq reads them: the connection service file
//! (`pg_service.conf`) and the password file (`~/.pgpass`).

use super::conninfo::{KNOWN, Params, home, var};
use anyhow::{Context, bail};
use std::path::PathBuf;

/// The section `[name]` of the first service file that has it: `PGSERVICEFILE` or
/// `~/.pg_service.conf`, then `pg_service.conf` in `PGSYSCONFDIR` (else Debian's
/// `/etc/postgresql-common`).
pub fn service_section(name: &str) -> anyhow::Result<Vec<(String, String)>> {
    let user_file =
        var("PGSERVICEFILE").map(PathBuf::from).or_else(|| home().map(|h| h.join(".pg_service.conf")));
    let sysconf = var("PGSYSCONFDIR").unwrap_or_else(|| "/etc/postgresql-common".into());
    let files = user_file.into_iter().chain([PathBuf::from(sysconf).join("pg_service.conf")]);
    let mut looked = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            looked.push(file.display().to_string());
            continue;
        };
        let mut in_section = false;
        let mut found = None;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                in_section = section == name;
                if in_section {
                    found.get_or_insert_with(Vec::new);
                }
            } else if in_section && let Some((key, value)) = line.split_once('=') {
                let key = key.trim().to_owned();
                if !KNOWN.contains(&key.as_str()) || key == "service" {
                    bail!("{}: service {name:?} sets unknown parameter {key:?}", file.display());
                }
                found.get_or_insert_with(Vec::new).push((key, value.trim().to_owned()));
            }
        }
        if let Some(found) = found {
            return Ok(found);
        }
        looked.push(file.display().to_string());
    }
    bail!("--store: service {name:?} is not defined in {}", looked.join(" or "))
}

/// The password for these parameters in the password file, as libpq looks it up: the
/// first line `host:port:dbname:user:password` that matches (`*` matches anything; a
/// socket matches `localhost`). A file others may read is ignored, with a warning.
pub fn from_passfile(params: &Params) -> anyhow::Result<Option<String>> {
    let path = match params.get("passfile") {
        Some(file) => PathBuf::from(file),
        None => match home() {
            Some(home) => home.join(".pgpass"),
            None => return Ok(None),
        },
    };
    let Ok(meta) = std::fs::metadata(&path) else { return Ok(None) };
    if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0 {
        crate::ui::warn(format!(
            "password file {} has group or world access; it is ignored (chmod 0600 it, as libpq asks)",
            path.display()
        ));
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let first = |key: &str| params.get(key).map(|v| v.split(',').next().unwrap_or("").to_owned());
    let host =
        first("host").filter(|h| !h.is_empty() && !h.starts_with('/')).unwrap_or_else(|| "localhost".into());
    let wanted = [host, first("port").unwrap_or_default(), params["dbname"].clone(), params["user"].clone()];
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let fields = split_passfile_line(line);
        if fields.len() == 5 && fields[..4].iter().zip(&wanted).all(|(f, w)| f == "*" || f == w) {
            return Ok(Some(fields[4].clone()));
        }
    }
    Ok(None)
}

/// A password file line's fields: `:` separates, `\` escapes.
fn split_passfile_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut().unwrap().extend(chars.next()),
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_file_lines_split_on_unescaped_colons() {
        assert_eq!(split_passfile_line(r"h:5432:*:u:pa\:ss:x"), ["h", "5432", "*", "u", "pa:ss:x"]);
    }
}
