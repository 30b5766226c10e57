use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use xenapinfs::config;
use xenapinfs::service::notify::SystemdNotifier;
use xenapinfs::service::{self, Agent, logging};

/// Exit status for a configuration that cannot work; systemd's `RestartPreventExitStatus=`
/// uses it to stop a restart loop.
const EXIT_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(name = "xenapinfsd", version, about = "The xenapinfs storage agent")]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, default_value = config::DEFAULT_CONFIG_PATH, conflicts_with = "cinder_conf")]
    config: PathBuf,
    /// Read the old XenAPINFS driver's options from this cinder.conf instead.
    #[arg(long)]
    cinder_conf: Option<PathBuf>,
    /// Section of the cinder.conf holding the options.
    #[arg(long, default_value = "DEFAULT", requires = "cinder_conf")]
    backend: String,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(std::env::var_os("JOURNAL_STREAM").is_some());
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    let loaded = match &args.cinder_conf {
        Some(path) => config::load_cinder(path, &args.backend, credentials.as_deref()),
        None => config::load(&args.config, credentials.as_deref()),
    };
    let settings = match loaded {
        Ok(settings) => settings,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("xenapinfsd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check_config {
        println!("{}: configuration is valid", settings.source.display());
        return ExitCode::SUCCESS;
    }
    match serve(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("xenapinfsd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(settings: config::Settings) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("xenapinfsd")
        .build()
        .context("starting the async runtime")?;
    let watchdog = sd_notify::watchdog_enabled();
    runtime.block_on(async {
        let (listener, activated) = match service::activated_socket()? {
            Some(listener) => (listener, true),
            None => (service::bind_socket(&settings.socket)?, false),
        };
        let socket = settings.socket.clone();
        let agent = Arc::new(Agent::new(settings)?);
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        tracing::info!(socket = %socket.display(), activated, "serving the control API");
        let notifier = Arc::new(SystemdNotifier::default());
        let result = service::run(listener, agent, notifier, watchdog, shutdown).await;
        // A socket systemd made is systemd's to remove.
        if !activated {
            let _ = std::fs::remove_file(&socket);
        }
        result.map_err(anyhow::Error::from)
    })
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping on signal");
    shutdown.cancel();
}
