use std::process::ExitCode;

use clap::Parser;
use xenapinfs::cli::{Cli, run};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli, &mut std::io::stdout()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xenapinfs: {e}");
            ExitCode::FAILURE
        }
    }
}
