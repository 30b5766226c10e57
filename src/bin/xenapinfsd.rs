use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use tokio_util::sync::CancellationToken;
use xenapinfs::config;
use xenapinfs::service::notify::{Notifier, SystemdNotifier};
use xenapinfs::service::{self, Agent, logging};

/// Exit status for a configuration that cannot work; systemd's `RestartPreventExitStatus=`
/// uses it to stop a restart loop.
const EXIT_CONFIG: u8 = 78;

#[derive(Debug, Clone, Parser)]
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

impl Args {
    fn load(&self) -> Result<config::Settings, config::ConfigError> {
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        match &self.cinder_conf {
            Some(path) => config::load_cinder(path, &self.backend, credentials.as_deref()),
            None => config::load(&self.config, credentials.as_deref()),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(std::env::var_os("JOURNAL_STREAM").is_some());
    let settings = match args.load() {
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
    // Not a configuration error (78): the mount may come up later, and a restart will see it.
    if settings.share_mount_check
        && let Err(e) = service::mount::check_share(Path::new(service::mount::MOUNTINFO), &settings)
    {
        SystemdNotifier::default().status(&format!("refusing to start: {e}"));
        tracing::error!("{e}");
        eprintln!("xenapinfsd: {e}");
        return ExitCode::FAILURE;
    }
    match serve(args, settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("xenapinfsd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: Args, settings: config::Settings) -> anyhow::Result<()> {
    // A second SIGTERM or SIGINT while shutting down ends the process at once; the clean-up a
    // graceful stop would have done is redone at the next start.
    let terminating = Arc::new(AtomicBool::new(false));
    for signal in [SIGTERM, SIGINT] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, terminating.clone())
            .context("installing signal handlers")?;
        signal_hook::flag::register(signal, terminating.clone())
            .context("installing signal handlers")?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("xenapinfsd")
        .build()
        .context("starting the async runtime")?;
    let watchdog = sd_notify::watchdog_enabled();
    runtime.block_on(async {
        let (listener, activated) = match service::activated_socket()? {
            Some(listener) => (listener, true),
            None => (
                service::bind_socket(&settings.socket, &settings.socket_group)?,
                false,
            ),
        };
        let socket = settings.socket.clone();
        let agent = Arc::new(Agent::new(settings)?);
        let notifier: Arc<dyn Notifier> = Arc::new(SystemdNotifier::default());
        let shutdown = CancellationToken::new();
        tokio::spawn(handle_signals(
            args,
            agent.clone(),
            notifier.clone(),
            shutdown.clone(),
        ));
        tracing::info!(socket = %socket.display(), activated, "serving the control API");
        let result = service::run(listener, agent, notifier, watchdog, shutdown).await;
        // A socket systemd made is systemd's to remove.
        if !activated {
            let _ = std::fs::remove_file(&socket);
        }
        result.map_err(anyhow::Error::from)
    })
}

/// SIGTERM/SIGINT stop the daemon; SIGHUP reloads the configuration, keeping the old one if
/// the new one is not valid.
async fn handle_signals(
    args: Args,
    agent: Arc<Agent>,
    notifier: Arc<dyn Notifier>,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                notifier.reloading();
                match args.load().map_err(anyhow::Error::from).and_then(|new| agent.reload(new).map_err(anyhow::Error::from)) {
                    Ok(ignored) if ignored.is_empty() => {}
                    Ok(ignored) => tracing::warn!(keys = ?ignored, "these settings change only with a restart"),
                    Err(e) => {
                        tracing::error!("reload refused, keeping the running configuration: {e:#}");
                        notifier.status(&format!("reload refused: {e:#}"));
                    }
                }
                service::warn_about_transport(&agent.settings());
                notifier.ready();
            }
        }
    }
    tracing::info!("stopping on signal");
    shutdown.cancel();
}
