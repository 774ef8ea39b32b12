//! `broker serve`: run the broker from a config file (production).

use super::exit::{Exit, ExitOnError, Outcome};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long, short, env = "BROKER_CONFIG")]
    config: PathBuf,
}

pub async fn run(args: ServeArgs) -> Outcome {
    let cfg = super::load_config(&args.config)?;
    let _traces = broker::telemetry::init(cfg.log.format, &cfg.log.level, &cfg.telemetry)
        .exit(Exit::Usage)?;
    tracing::info!(config = %cfg, "starting");
    broker::app::serve(cfg, |_| {}).await?;
    Ok(Exit::Ok)
}
