//! Private files (mode 0600 in a 0700 directory) and `broker require`'s check that the job's
//! exchange wrote them.

use super::shape::{Format, Shaped};
use super::{ClientError, io_err};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Create (or replace) `path` with mode 0600 and write `text`.
pub fn write_private(path: &Path, text: &str) -> Result<(), ClientError> {
    // Remove first so an existing file with wider permissions is not reused.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path, e)),
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(|e| io_err(path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| io_err(path, e))
}

/// Write every secret of the grant into `dir` (created with mode 0700): one file per variable
/// (`DIR/<VAR>`, mode 0600), the shape's own files (`.pgpass`, the AWS profile files), `DIR/env`
/// (the `export` lines) and `DIR/dotenv`. `shaped` must come from `grant.shape(_, Some(dir))`.
/// Returns the paths.
pub fn write_dir(dir: &Path, shaped: &Shaped) -> Result<Vec<PathBuf>, ClientError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir).map_err(|e| io_err(dir, e))?;
    // An existing directory keeps its mode on create: make sure it is private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err(dir, e))?;
    }
    let mut written = Vec::new();
    for (name, v) in shaped.vars.iter().chain(&shaped.files) {
        let p = dir.join(name);
        write_private(&p, v.expose())?;
        written.push(p);
    }
    for (file, format) in [("env", Format::Env), ("dotenv", Format::Dotenv)] {
        let p = dir.join(file);
        write_private(&p, &shaped.render(format))?;
        written.push(p);
    }
    Ok(written)
}

/// `broker require`: the job's exchange ran. A job whose own `before_script` replaced the
/// component's has neither the secrets directory nor `BROKER_GRANT_ID` from its `env` file; the
/// check fails so the job fails instead of running without its credentials. Returns the grant id.
pub fn require_exchanged(
    dir: Option<&Path>,
    grant_id_env: Option<&str>,
) -> Result<String, ClientError> {
    let missing = |why: &str| {
        ClientError::NoExchange(format!(
            "{why}: the job's credentials were never fetched. A job with its own before_script \
             must start it with `!reference [.broker-credentials, before_script]`"
        ))
    };
    let Some(dir) = dir else {
        return Err(missing("BROKER_SECRETS_DIR is not set"));
    };
    let file = dir.join("BROKER_GRANT_ID");
    let on_disk = match std::fs::read_to_string(&file) {
        Ok(s) => s.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(missing(&format!("{} does not exist", file.display())));
        }
        Err(e) => return Err(io_err(&file, e)),
    };
    match grant_id_env.map(str::trim) {
        Some(g) if !g.is_empty() && g == on_disk => Ok(on_disk),
        Some(g) if !g.is_empty() => Err(missing(
            "BROKER_GRANT_ID does not match the secrets directory's grant",
        )),
        _ => Err(missing(&format!(
            "BROKER_GRANT_ID is not set ({}/env was not sourced)",
            dir.display()
        ))),
    }
}
