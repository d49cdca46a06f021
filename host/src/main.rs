//! The `berth` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use berth::cli::{Cli, Command};
use berth::config::ServeConfig;
use clap::Parser as _;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("berth: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => {
                let config = match ServeConfig::resolve(&args) {
                    Ok(config) => config,
                    Err(error) => {
                        eprintln!("berth: {error}");
                        return ExitCode::from(2);
                    }
                };
                berth::telemetry::init_logging(config.log_format);
                match berth::server::serve(config).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("berth: {error}");
                        ExitCode::FAILURE
                    }
                }
            }
            command => match berth::cli::run(command).await {
                Ok(output) => {
                    println!("{output}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("berth: {error}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}
