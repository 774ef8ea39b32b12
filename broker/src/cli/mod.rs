//! The `broker` command line: one module per subcommand, each with its clap arguments and its
//! `run`. `main.rs` only parses and dispatches; every run ends in an [`exit::Exit`] from the one
//! table in `exit.rs`.
//!
//! Invariant: nothing printed here (stdout aside, where a chosen output format asks for a
//! secret) holds a secret; errors carry fixed texts and reason codes.

pub mod admin;
pub mod audit;
pub mod dev;
pub mod exchange;
pub mod exit;
pub mod job;
pub mod keys;
pub mod leak;
pub mod migrate;
pub mod policy;
pub mod require;
pub mod revoke;
pub mod serve;
pub mod ssh_krl;

use anyhow::Context;
use broker::config::Config;
use broker::store::Store;
use clap::Args;
use exit::{Exit, ExitOnError, Failure};
use std::path::{Path, PathBuf};

/// A non-empty environment variable.
pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Load and validate a config file; any problem in it is a usage error.
pub fn load_config(path: &Path) -> Result<Config, Failure> {
    Config::load(path).exit(Exit::Usage)
}

/// Create `path` with mode 0600 and write `text`. Never replaces an existing file: a key or an
/// operator token written over by mistake could not be recovered.
pub fn write_new_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Where a store subcommand finds the broker's database.
#[derive(Args)]
pub struct StoreArg {
    /// Take the store from this config file.
    #[arg(long, short, env = "BROKER_CONFIG", conflicts_with = "store")]
    pub config: Option<PathBuf>,
    /// Store URL (`postgres://…` or `sqlite:PATH`).
    #[arg(long, env = "BROKER_STORE_URL")]
    pub store: Option<String>,
}

impl StoreArg {
    pub async fn open(&self) -> Result<Store, Failure> {
        let url = match (&self.config, &self.store) {
            (_, Some(u)) => broker::secret::Sensitive::new(u.clone()),
            (Some(c), None) => load_config(c)?.store.url.resolve().exit(Exit::Usage)?,
            (None, None) => return Err(exit::usage("give --config or --store")),
        };
        Ok(Store::connect(url.expose()).await?)
    }
}
