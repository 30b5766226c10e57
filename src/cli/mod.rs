//! The `xenapinfs` command line: talks to `xenapinfsd` over its socket.

mod images;
mod output;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::api::client::{ApiClient, ClientError};
use crate::api::{CopyRequest, Deleted, StatusReport};
use crate::image::ImageFormat;
use crate::jobs::{Job, JobState};
use crate::volume::{ConnectionInfo, Stats, Volume, VolumeId};

#[derive(Debug, Parser)]
#[command(
    name = "xenapinfs",
    version,
    about = "Manage volumes on a XenServer NFS share through xenapinfsd"
)]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(
        long,
        global = true,
        env = "XENAPINFS_SOCKET",
        default_value = "/run/xenapinfs/xenapinfs.sock"
    )]
    pub socket: PathBuf,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Volumes: create, delete, list, copy, extend, attach.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Capacity of the share: total, free, provisioned.
    Stats,
    /// Version, mode (local/remote and why), XenAPI host and session state, jobs running.
    Status,
    /// Long operations.
    #[command(subcommand)]
    Job(JobCommand),
}

#[derive(Debug, Args)]
pub struct Wait {
    /// Print the job and return at once instead of waiting for it.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume: a new NFS SR with one VDI, optionally filled from an image.
    Create {
        /// Size in GiB (from the image when --image is given without it).
        #[arg(long, required_unless_present = "image")]
        size: Option<u64>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Image to fill the volume with: a file, `-` for stdin, or an http(s) URL.
        #[arg(long)]
        image: Option<String>,
        #[command(flatten)]
        image_options: ImageOptions,
    },
    /// Overwrite a volume with an image (the old content stays until the import has succeeded).
    Import {
        id: VolumeId,
        /// A file, `-` for stdin, or an http(s) URL.
        src: String,
        #[command(flatten)]
        image_options: ImageOptions,
    },
    /// Write a volume out as an image.
    Export {
        id: VolumeId,
        /// A file, `-` for stdout, or an http(s) URL (PUT).
        dest: String,
        /// vhd-tgz, vhd, qcow2, vmdk or raw.
        #[arg(long)]
        format: ImageFormat,
        /// Extra HTTP header for a URL, `Name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
    },
    /// Delete a volume and its SR.
    Delete { id: VolumeId },
    /// List the volumes on the share.
    List,
    /// Show one volume.
    Show { id: VolumeId },
    /// Deep-copy a volume into a new SR (a snapshot).
    Snapshot {
        id: VolumeId,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Make a new volume from a snapshot, optionally larger.
    FromSnapshot {
        snap_id: VolumeId,
        /// Size in GiB (at least the snapshot's).
        #[arg(long)]
        size: Option<u64>,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Copy a live volume into a new volume.
    Clone {
        id: VolumeId,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Grow a volume (shrinking is refused).
    Extend {
        id: VolumeId,
        /// New size in GiB.
        #[arg(long)]
        size: u64,
    },
    /// The xensm connection info Nova attaches with.
    Connection { id: VolumeId },
    /// Attach the volume to this VM (local mode) and print the device path.
    Attach { id: VolumeId },
    /// Detach the volume from this VM.
    Detach { id: VolumeId },
}

#[derive(Debug, Args)]
pub struct ImageOptions {
    /// vhd-tgz, vhd, qcow2, vmdk, vdi, vhdx or raw; detected from the content when absent,
    /// and a mismatch is refused.
    #[arg(long)]
    pub image_format: Option<ImageFormat>,
    /// Extra HTTP header for a URL source, `Name: value` (repeatable), e.g. `X-Auth-Token: ...`.
    #[arg(long = "header")]
    pub headers: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Running and recent jobs.
    List,
    /// One job.
    Show { id: String },
    /// Ask a job to stop.
    Cancel { id: String },
}

/// Runs one CLI invocation, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut dyn Write) -> Result<(), ClientError> {
    let client = ApiClient::new(&cli.socket);
    let json = cli.json;
    match cli.command {
        Command::Status => {
            let status: StatusReport = client.get("/v1/status").await?;
            output::emit(out, json, &status, output::status);
        }
        Command::Stats => {
            let stats: Stats = client.get("/v1/stats").await?;
            output::emit(out, json, &stats, output::stats);
        }
        Command::Job(command) => {
            let job: Option<Job> = match command {
                JobCommand::List => {
                    let jobs: Vec<Job> = client.get("/v1/jobs").await?;
                    output::emit(out, json, &jobs, output::jobs);
                    None
                }
                JobCommand::Show { id } => Some(client.get(&format!("/v1/jobs/{id}")).await?),
                JobCommand::Cancel { id } => Some(
                    client
                        .request("POST", &format!("/v1/jobs/{id}/cancel"), None)
                        .await?,
                ),
            };
            if let Some(job) = job {
                output::emit(out, json, &job, output::job);
            }
        }
        Command::Volume(command) => volume(&client, command, json, out).await?,
    }
    Ok(())
}

fn path(id: &VolumeId) -> String {
    format!("/v1/volumes/{}/{}", id.sr, id.vdi)
}

async fn volume(
    client: &ApiClient,
    command: VolumeCommand,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), ClientError> {
    match command {
        VolumeCommand::Create {
            size,
            name,
            description,
            image: None,
            ..
        } => {
            let body = json!({"size_gb": size, "name": name.unwrap_or_default(), "description": description.unwrap_or_default()});
            let volume: Volume = client.request("POST", "/v1/volumes", Some(body)).await?;
            output::emit(out, json, &volume, output::volume);
        }
        VolumeCommand::Create {
            size,
            name,
            description,
            image: Some(image),
            image_options,
        } => {
            let mut query = vec![
                format!("name={}", encode(&name.unwrap_or_default())),
                format!("description={}", encode(&description.unwrap_or_default())),
            ];
            query.extend(size.map(|size| format!("size_gb={size}")));
            query.extend(image_options.image_format.map(|f| format!("format={f}")));
            let path = format!("/v1/volumes/import?{}", query.join("&"));
            import(client, &path, &image, &image_options, json, out).await?;
        }
        VolumeCommand::Import {
            id,
            src,
            image_options,
        } => {
            let query = image_options
                .image_format
                .map(|f| format!("?format={f}"))
                .unwrap_or_default();
            let path = format!("{}/import{query}", path(&id));
            import(client, &path, &src, &image_options, json, out).await?;
        }
        VolumeCommand::Export {
            id,
            dest,
            format,
            headers,
        } => {
            let destination = images::Location::parse(&dest);
            let bytes =
                images::receive_image(client, &path(&id), format, &destination, &headers, json)
                    .await?;
            images::report_export(out, json, &destination, format, bytes);
        }
        VolumeCommand::Delete { id } => {
            let deleted: Deleted = client.request("DELETE", &path(&id), None).await?;
            output::emit(out, json, &deleted, |out, d| {
                let _ = writeln!(out, "deleted {}", d.id);
            });
        }
        VolumeCommand::List => {
            let volumes: Vec<Volume> = client.get("/v1/volumes").await?;
            output::emit(out, json, &volumes, output::volumes);
        }
        VolumeCommand::Show { id } => {
            let volume: Volume = client.get(&path(&id)).await?;
            output::emit(out, json, &volume, output::volume);
        }
        VolumeCommand::Snapshot { id, name, wait } => {
            copy(
                client,
                &id,
                "snapshot",
                CopyRequest {
                    name,
                    size_gb: None,
                },
                wait,
                json,
                out,
            )
            .await?;
        }
        VolumeCommand::FromSnapshot {
            snap_id,
            size,
            name,
            wait,
        } => {
            copy(
                client,
                &snap_id,
                "from-snapshot",
                CopyRequest {
                    name,
                    size_gb: size,
                },
                wait,
                json,
                out,
            )
            .await?;
        }
        VolumeCommand::Clone { id, name, wait } => {
            copy(
                client,
                &id,
                "clone",
                CopyRequest {
                    name,
                    size_gb: None,
                },
                wait,
                json,
                out,
            )
            .await?;
        }
        VolumeCommand::Extend { id, size } => {
            let volume: Volume = client
                .request(
                    "POST",
                    &format!("{}/extend", path(&id)),
                    Some(json!({"size_gb": size})),
                )
                .await?;
            output::emit(out, json, &volume, output::volume);
        }
        VolumeCommand::Connection { id } => {
            let info: ConnectionInfo = client.get(&format!("{}/connection", path(&id))).await?;
            output::emit(out, true, &info, |_, _| {});
        }
        VolumeCommand::Attach { id } => {
            let info: crate::volume::AttachInfo = client
                .request("POST", &format!("{}/attach", path(&id)), None)
                .await?;
            output::emit(out, json, &info, |out, info| {
                let _ = writeln!(out, "{}", info.device);
            });
        }
        VolumeCommand::Detach { id } => {
            let _: serde_json::Value = client
                .request("POST", &format!("{}/detach", path(&id)), None)
                .await?;
            if json {
                output::emit(out, true, &json!({"id": id, "detached": true}), |_, _| {});
            } else {
                let _ = writeln!(out, "detached {id}");
            }
        }
    }
    Ok(())
}

/// Starts a copy job and, unless told not to, follows it with a progress bar (on a terminal)
/// until it ends; Ctrl-C cancels the job.
async fn copy(
    client: &ApiClient,
    id: &VolumeId,
    action: &str,
    request: CopyRequest,
    wait: Wait,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), ClientError> {
    let body = serde_json::to_value(&request).expect("requests serialise");
    let job: Job = client
        .request("POST", &format!("{}/{action}", path(id)), Some(body))
        .await?;
    if wait.no_wait {
        output::emit(out, json, &job, output::job);
        return Ok(());
    }
    let job = follow(client, &job, json).await?;
    emit_new_volume(out, json, job)
}

/// Sends an image to an import endpoint and prints the volume it filled.
async fn import(
    client: &ApiClient,
    api_path: &str,
    source: &str,
    options: &ImageOptions,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), ClientError> {
    let source = images::Location::parse(source);
    let job = images::send_image(client, api_path, &source, &options.headers, json).await?;
    emit_new_volume(out, json, job)
}

/// Prints the volume a finished job made, or returns the job's failure.
fn emit_new_volume(out: &mut dyn Write, json: bool, job: Job) -> Result<(), ClientError> {
    let volume: Volume =
        serde_json::from_value(finished(job)?).map_err(|e| ClientError::Decode(e.to_string()))?;
    output::emit(out, json, &volume, output::volume);
    Ok(())
}

/// The result of a finished job, or its failure as an error.
fn finished(job: Job) -> Result<serde_json::Value, ClientError> {
    match job.state {
        JobState::Succeeded => Ok(job.result.unwrap_or_default()),
        state => Err(ClientError::Api {
            status: 0,
            kind: job
                .error
                .as_ref()
                .map_or("failed".into(), |e| e.kind.clone()),
            message: format!("job {} {}: {}", job.id, state_word(state), job.message),
        }),
    }
}

/// Percent-encodes a query value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn state_word(state: JobState) -> &'static str {
    match state {
        JobState::Running => "is running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "was cancelled",
    }
}

async fn follow(client: &ApiClient, job: &Job, json: bool) -> Result<Job, ClientError> {
    let bar = if json || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(100);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {prefix} [{bar:40}] {pos:>3}% {msg}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_prefix(job.kind.clone());
        bar
    };
    let mut on_update = |job: &Job| {
        bar.set_position(job.progress.round() as u64);
        bar.set_message(job.message.clone());
    };
    let following = client.follow_job(&job.id, &mut on_update);
    tokio::pin!(following);
    let finished = tokio::select! {
        result = &mut following => result,
        _ = tokio::signal::ctrl_c() => {
            bar.println("cancelling...");
            let _: Job = client.request("POST", &format!("/v1/jobs/{}/cancel", job.id), None).await?;
            following.await
        }
    };
    bar.finish_and_clear();
    finished
}
