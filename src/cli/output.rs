//! Human and JSON output of the CLI.

use std::io::Write;

use serde::Serialize;

use crate::api::StatusReport;
use crate::jobs::Job;
use crate::volume::{Stats, Volume};

/// Writes `value` as pretty JSON, or through `human` for people.
pub fn emit<T: Serialize>(
    out: &mut dyn Write,
    json: bool,
    value: &T,
    human: impl Fn(&mut dyn Write, &T),
) {
    if json {
        let text = serde_json::to_string_pretty(value).expect("API types serialise");
        let _ = writeln!(out, "{text}");
    } else {
        human(out, value);
    }
}

fn rows(out: &mut dyn Write, rows: &[(&str, String)]) {
    for (name, value) in rows {
        let _ = writeln!(out, "{name:<13} {value}");
    }
}

fn size(bytes: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else {
        format!("{:.1} MiB", b / MIB)
    }
}

pub fn status(out: &mut dyn Write, status: &StatusReport) {
    rows(
        out,
        &[
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
            (
                "last error",
                status
                    .xenapi
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "-".into()),
            ),
            (
                "nfs",
                format!("{}:{}", status.nfs.server, status.nfs.serverpath),
            ),
            ("sr base path", status.nfs.sr_base_path.clone()),
            ("jobs running", status.jobs_running.to_string()),
            ("uptime", format!("{} s", status.uptime_seconds)),
        ],
    );
}

pub fn stats(out: &mut dyn Write, stats: &Stats) {
    rows(
        out,
        &[
            ("total", format!("{:.2} GiB", stats.total_capacity_gb)),
            ("free", format!("{:.2} GiB", stats.free_capacity_gb)),
            (
                "provisioned",
                format!("{:.2} GiB", stats.provisioned_capacity_gb),
            ),
            (
                "allocated",
                format!("{:.2} GiB", stats.allocated_capacity_gb),
            ),
            ("volumes", stats.volumes.to_string()),
        ],
    );
}

pub fn volume(out: &mut dyn Write, volume: &Volume) {
    let chain: Vec<String> = volume.chain.iter().map(ToString::to_string).collect();
    rows(
        out,
        &[
            ("id", volume.id.to_string()),
            ("name", volume.name.clone()),
            ("description", volume.description.clone()),
            ("size", size(volume.size_bytes)),
            ("allocated", size(volume.allocated_bytes)),
            ("chain", chain.join(" <- ")),
        ],
    );
    if let Some(problem) = &volume.problem {
        rows(out, &[("problem", problem.clone())]);
    }
}

pub fn volumes(out: &mut dyn Write, volumes: &Vec<Volume>) {
    let _ = writeln!(
        out,
        "{:<73}  {:>10}  {:>10}  NAME",
        "ID", "SIZE", "ALLOCATED"
    );
    for v in volumes {
        let name = match &v.problem {
            Some(problem) => format!("{} (problem: {problem})", v.name),
            None => v.name.clone(),
        };
        let _ = writeln!(
            out,
            "{:<73}  {:>10}  {:>10}  {name}",
            v.id.to_string(),
            size(v.size_bytes),
            size(v.allocated_bytes)
        );
    }
}

pub fn job(out: &mut dyn Write, job: &Job) {
    rows(
        out,
        &[
            ("id", job.id.clone()),
            ("kind", job.kind.clone()),
            ("volume", job.volume.clone().unwrap_or_else(|| "-".into())),
            ("state", format!("{:?}", job.state).to_lowercase()),
            ("progress", format!("{:.0}%", job.progress)),
            ("message", job.message.clone()),
        ],
    );
}

pub fn jobs(out: &mut dyn Write, jobs: &Vec<Job>) {
    let _ = writeln!(
        out,
        "{:<36}  {:<13}  {:<10}  {:>5}  MESSAGE",
        "ID", "KIND", "STATE", "DONE"
    );
    for job in jobs {
        let state = format!("{:?}", job.state).to_lowercase();
        let _ = writeln!(
            out,
            "{:<36}  {:<13}  {state:<10}  {:>4.0}%  {}",
            job.id, job.kind, job.progress, job.message
        );
    }
}
