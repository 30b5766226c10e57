//! The `xenapinfs` command line: talks to `xenapinfsd` over its socket.

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::api::StatusReport;
use crate::api::client::{ApiClient, ClientError};

#[derive(Debug, Parser)]
#[command(name = "xenapinfs", version, about = "Manage volumes on a XenServer NFS share through xenapinfsd")]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "XENAPINFS_SOCKET", default_value = "/run/xenapinfs/xenapinfs.sock")]
    pub socket: PathBuf,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Version, mode (local/remote and why), XenAPI host and session state.
    Status,
}

/// Runs one CLI invocation, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut dyn Write) -> Result<(), ClientError> {
    let client = ApiClient::new(&cli.socket);
    match cli.command {
        Command::Status => {
            let status: StatusReport = client.get("/v1/status").await?;
            if cli.json {
                print_json(out, &status);
            } else {
                print_status(out, &status);
            }
        }
    }
    Ok(())
}

fn print_json(out: &mut dyn Write, value: &impl serde::Serialize) {
    let text = serde_json::to_string_pretty(value).expect("API types serialise");
    let _ = writeln!(out, "{text}");
}

fn print_status(out: &mut dyn Write, status: &StatusReport) {
    let rows = [
        ("version", status.version.clone()),
        ("mode", format!("{} ({})", status.mode, status.mode_reason)),
        ("vm", status.vm_uuid.clone().unwrap_or_else(|| "-".into())),
        ("xenapi", status.xenapi.url.clone()),
        (
            "session",
            format!(
                "{} ({} logins, {} calls)",
                status.xenapi.session, status.xenapi.logins, status.xenapi.calls
            ),
        ),
        ("last error", status.xenapi.last_error.clone().unwrap_or_else(|| "-".into())),
        ("nfs", format!("{}:{}", status.nfs.server, status.nfs.serverpath)),
        ("sr base path", status.nfs.sr_base_path.clone()),
        ("jobs running", status.jobs_running.to_string()),
        ("uptime", format!("{} s", status.uptime_seconds)),
    ];
    for (name, value) in rows {
        let _ = writeln!(out, "{name:<13} {value}");
    }
}
