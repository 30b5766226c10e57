//! `volume create --image`, `volume import`, `volume export`: moving image bytes between the
//! caller's files (or stdin/stdout) and the daemon, or handing the daemon a URL.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::api::client::{ApiClient, ClientError};
use crate::image::ImageFormat;
use crate::image::transfer::Counting;
use crate::jobs::Job;

/// Where a download is written.
type Sink = std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>;

/// Where image bytes come from or go to, as written on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    File(PathBuf),
    /// `-`: stdin or stdout.
    Stdio,
    Url(String),
}

impl Location {
    pub fn parse(text: &str) -> Location {
        if text == "-" {
            Location::Stdio
        } else if text.starts_with("http://") || text.starts_with("https://") {
            Location::Url(text.to_string())
        } else {
            Location::File(PathBuf::from(text))
        }
    }
}

fn io_error(context: String) -> impl FnOnce(std::io::Error) -> ClientError {
    move |e| ClientError::Http(format!("{context}: {e}"))
}

fn bar(length: Option<u64>, prefix: &str, quiet: bool) -> indicatif::ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match length {
        Some(length) => {
            let bar = indicatif::ProgressBar::new(length);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar
        }
        None => {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {prefix} {bytes} {bytes_per_sec}",
                )
                .expect("static template"),
            );
            bar
        }
    };
    bar.set_prefix(prefix.to_string());
    bar
}

/// Sends an image to `api_path` (an import endpoint) and returns the finished job.
pub async fn send_image(
    client: &ApiClient,
    api_path: &str,
    source: &Location,
    headers: &[String],
    quiet: bool,
) -> Result<Job, ClientError> {
    if let Location::Url(url) = source {
        let job: Job = client
            .request(
                "POST",
                api_path,
                Some(json!({"url": url, "headers": headers})),
            )
            .await?;
        return super::follow(client, &job, quiet).await;
    }
    if !headers.is_empty() {
        return Err(ClientError::Http(
            "--header applies only to http(s) URLs".into(),
        ));
    }
    let (reader, length): (
        std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>,
        Option<u64>,
    ) = match source {
        Location::File(path) => {
            let file = tokio::fs::File::open(path)
                .await
                .map_err(io_error(format!("cannot read {}", path.display())))?;
            let length = file.metadata().await.ok().map(|m| m.len());
            (Box::pin(file), length)
        }
        _ => (Box::pin(tokio::io::stdin()), None),
    };
    let (reader, sent) = Counting::new(reader);
    let progress = bar(length, "uploading", quiet);
    let stream = tokio_util::io::ReaderStream::with_capacity(reader, 1 << 20);
    let ticker = {
        let progress = progress.clone();
        tokio::spawn(async move {
            loop {
                progress.set_position(sent.load(std::sync::atomic::Ordering::Relaxed));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
    };
    let frames = futures_util::TryStreamExt::map_ok(stream, Frame::data);
    let body = StreamBody::new(frames).boxed_unsync();
    let response = client
        .send_body("POST", api_path, "application/octet-stream", body)
        .await;
    ticker.abort();
    progress.finish_and_clear();
    ApiClient::decode(response?).await
}

/// Receives an export from `api_path` into `destination` (a file is written under a temporary
/// name and renamed when complete), or asks the daemon to PUT it to a URL.
pub async fn receive_image(
    client: &ApiClient,
    volume_path: &str,
    format: ImageFormat,
    destination: &Location,
    headers: &[String],
    quiet: bool,
) -> Result<u64, ClientError> {
    if let Location::Url(url) = destination {
        let job: Job = client
            .request(
                "POST",
                &format!("{volume_path}/export"),
                Some(json!({"url": url, "headers": headers, "format": format})),
            )
            .await?;
        let job = super::follow(client, &job, quiet).await?;
        return super::finished(job).map(|result| result["bytes"].as_u64().unwrap_or(0));
    }
    if !headers.is_empty() {
        return Err(ClientError::Http(
            "--header applies only to http(s) URLs".into(),
        ));
    }
    let response = client
        .send(
            "GET",
            &format!("{volume_path}/export?format={format}"),
            None,
        )
        .await?;
    if !response.status().is_success() {
        ApiClient::decode::<serde_json::Value>(response).await?;
        unreachable!("decode fails on an error status");
    }
    let (mut sink, partial): (Sink, Option<(PathBuf, PathBuf)>) = match destination {
        Location::File(path) => {
            let temporary = path.with_file_name(format!(
                ".{}.partial",
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            let file = tokio::fs::File::create(&temporary)
                .await
                .map_err(io_error(format!("cannot write {}", temporary.display())))?;
            (Box::pin(file), Some((temporary, path.clone())))
        }
        _ => (Box::pin(tokio::io::stdout()), None),
    };
    let progress = bar(None, "downloading", quiet);
    let mut body = response.into_body();
    let mut total = 0u64;
    let outcome: Result<(), ClientError> = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Http(format!("the export failed: {e}")))?;
            if let Ok(data) = frame.into_data() {
                sink.write_all(&data)
                    .await
                    .map_err(io_error("writing the image".into()))?;
                total += data.len() as u64;
                progress.set_position(total);
            }
        }
        sink.flush()
            .await
            .map_err(io_error("writing the image".into()))?;
        Ok(())
    }
    .await;
    progress.finish_and_clear();
    match (outcome, partial) {
        (Ok(()), Some((temporary, path))) => {
            std::fs::rename(&temporary, &path)
                .map_err(io_error(format!("cannot write {}", path.display())))?;
            Ok(total)
        }
        (Ok(()), None) => Ok(total),
        (Err(e), partial) => {
            if let Some((temporary, _)) = partial {
                let _ = std::fs::remove_file(temporary);
            }
            Err(e)
        }
    }
}

/// Writes where the export of `bytes` went.
pub fn report_export(
    out: &mut dyn Write,
    json: bool,
    destination: &Location,
    format: ImageFormat,
    bytes: u64,
) {
    if matches!(destination, Location::Stdio) {
        return;
    }
    let target = match destination {
        Location::File(path) => path.display().to_string(),
        Location::Url(url) => url.split('?').next().unwrap_or_default().to_string(),
        Location::Stdio => unreachable!(),
    };
    if json {
        let _ = writeln!(
            out,
            "{}",
            json!({"destination": target, "format": format, "bytes": bytes})
        );
    } else {
        let _ = writeln!(out, "exported {bytes} bytes of {format} to {target}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_files_stdio_or_urls() {
        assert_eq!(Location::parse("-"), Location::Stdio);
        assert_eq!(
            Location::parse("https://glance/v2/images/x/file"),
            Location::Url("https://glance/v2/images/x/file".into())
        );
        assert_eq!(
            Location::parse("disk.qcow2"),
            Location::File("disk.qcow2".into())
        );
        assert_eq!(
            Location::parse("./http:x"),
            Location::File("./http:x".into())
        );
    }
}
