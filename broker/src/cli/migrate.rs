//! `broker migrate`: apply the store's migrations and exit.

use super::StoreArg;
use super::exit::{Exit, Outcome};
use clap::Args;

#[derive(Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    store: StoreArg,
}

pub async fn run(args: MigrateArgs) -> Outcome {
    args.store.open().await?.migrate().await?;
    println!("migrations applied");
    Ok(Exit::Ok)
}
