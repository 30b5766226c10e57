//! `xenapinfs-sim`: a XenAPI simulator backed by real files. Prints the URL it serves on the first
//! line of stdout (the pool supporter's on the second with `--pool-slave`), serves until SIGTERM
//! or SIGINT, unplugs every plugged VBD and exits 0.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use xenapinfs::sim::{self, FaultSpec, Listeners, SimConfig};

#[derive(Debug, Parser)]
#[command(
    name = "xenapinfs-sim",
    version,
    about = "XenAPI simulator for xenapinfs, backed by real files"
)]
struct Args {
    /// Address to serve XenAPI on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The NFS export directory: SRs are `<export>/<sr_uuid>/`.
    #[arg(long)]
    export: PathBuf,
    /// Where plugged VBDs of the appliance VM appear (`xvdb`, `xvdc`, ...).
    #[arg(long)]
    dev_dir: PathBuf,
    /// Root password; without it any password is accepted for root.
    #[arg(long, env = "XENAPINFS_SIM_PASSWORD")]
    password: Option<String>,
    /// Create the appliance VM with this uuid (running on the master, root disk at userdevice 0).
    #[arg(long)]
    vm_uuid: Option<String>,
    /// The NFS server name SR.create must be given.
    #[arg(long, default_value = "nfs.example")]
    nfs_server: String,
    /// The NFS server path SR.create must be given.
    #[arg(long, default_value = "/volumes")]
    nfs_path: String,
    /// Serve HTTPS with a certificate generated at start.
    #[arg(long)]
    tls: bool,
    /// Write the PEM of the CA that signed the TLS certificate here.
    #[arg(long)]
    tls_ca_out: Option<PathBuf>,
    /// Also serve a pool supporter (its URL on the second line) that answers HOST_IS_SLAVE.
    #[arg(long)]
    pool_slave: bool,
    /// How long a failed login waits before answering, in milliseconds (xapi: 5000).
    #[arg(long, default_value_t = 5000)]
    auth_failure_delay_ms: u64,
    /// Fail the Nth call of METHOD: `METHOD:N:CODE[:PARAM...]` (repeatable).
    #[arg(long = "fault", value_parser = FaultSpec::parse)]
    faults: Vec<FaultSpec>,
    /// Slow METHOD down: `METHOD:MILLISECONDS` (repeatable).
    #[arg(long = "delay", value_parser = sim::hooks::parse_delay)]
    delays: Vec<(String, u64)>,
    /// Append one JSON line per XenAPI call to this file.
    #[arg(long)]
    call_log: Option<PathBuf>,
    /// Never use FUSE: plugged VBDs are raw copies written back on unplug.
    #[arg(long)]
    no_fuse: bool,
    /// The qemu-storage-daemon binary (default: found on PATH).
    #[arg(long)]
    qemu_storage_daemon: Option<PathBuf>,
}

impl Args {
    fn config(&self) -> SimConfig {
        SimConfig {
            password: self.password.clone(),
            vm_uuid: self.vm_uuid.clone(),
            nfs_server: self.nfs_server.clone(),
            nfs_path: self.nfs_path.clone(),
            tls: self.tls,
            pool_slave: self.pool_slave,
            auth_failure_delay: Duration::from_millis(self.auth_failure_delay_ms),
            faults: self.faults.clone(),
            delays: self.delays.clone(),
            call_log: self.call_log.clone(),
            no_fuse: self.no_fuse,
            qemu_storage_daemon: self.qemu_storage_daemon.clone(),
            ..SimConfig::new(&self.export, &self.dev_dir)
        }
    }
}

fn bind(args: &Args) -> std::io::Result<Listeners> {
    let master = TcpListener::bind(args.listen)?;
    let slave = if args.pool_slave {
        Some(TcpListener::bind(SocketAddr::new(args.listen.ip(), 0))?)
    } else {
        None
    };
    Ok(Listeners { master, slave })
}

async fn serve(args: Args) -> Result<(), String> {
    let listeners = bind(&args).map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let shutdown = CancellationToken::new();
    let running = sim::start(listeners, args.config(), shutdown.clone())
        .await
        .map_err(|e| e.to_string())?;
    if let Some(fingerprint) = &running.fingerprint {
        eprintln!("xenapinfs-sim: TLS certificate SHA-256 fingerprint: {fingerprint}");
    }
    if let (Some(path), Some(pem)) = (&args.tls_ca_out, &running.ca_pem) {
        std::fs::write(path, pem)
            .map_err(|e| format!("cannot write the CA to {}: {e}", path.display()))?;
    }
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{}", running.url);
    if let Some(url) = &running.slave_url {
        let _ = writeln!(stdout, "{url}");
    }
    let _ = stdout.flush();
    drop(stdout);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    shutdown.cancel();
    running.wait().await;
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("xenapinfs-sim: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xenapinfs-sim: {e}");
            ExitCode::from(1)
        }
    }
}
