//! Where image bytes come from and go to: uploads through the control socket, http(s) URLs
//! (Glance serves image data at `/v2/images/{id}/file`), and downloads back to the caller.

use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

use super::ImageError;

/// An http(s) location with extra request headers (e.g. `X-Auth-Token`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UrlSpec {
    pub url: String,
    #[serde(default)]
    pub headers: Vec<String>,
}

impl UrlSpec {
    /// Checks the URL and the headers (`Name: value`) before any work starts.
    pub fn validate(&self) -> Result<(reqwest::Url, reqwest::header::HeaderMap), String> {
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| format!("{:?} is not a URL: {e}", self.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "{:?}: only http and https URLs are supported",
                self.url
            ));
        }
        let mut headers = reqwest::header::HeaderMap::new();
        for header in &self.headers {
            let (name, value) = header.split_once(':').ok_or_else(|| {
                format!(
                    "header {:?} is not of the form 'Name: value'",
                    redact(header)
                )
            })?;
            let name = reqwest::header::HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| format!("header name {:?} is not valid", name.trim()))?;
            let value = reqwest::header::HeaderValue::from_str(value.trim())
                .map_err(|_| format!("the value of header {name} is not valid"))?;
            headers.append(name, value);
        }
        Ok((url, headers))
    }

    /// The URL without its query string, for messages (queries may carry signatures).
    pub fn display(&self) -> String {
        self.url.split('?').next().unwrap_or_default().to_string()
    }
}

/// Header values may be tokens: never print them.
fn redact(header: &str) -> String {
    match header.split_once(':') {
        Some((name, _)) => format!("{name}: ..."),
        None => format!("{}...", header.chars().take(12).collect::<String>()),
    }
}

fn http_client() -> Result<reqwest::Client, ImageError> {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .read_timeout(std::time::Duration::from_secs(300))
        .build()
        .map_err(|e| ImageError::Refused(format!("cannot set up the HTTP client: {e}")))
}

/// A readable body.
pub type Body = Pin<Box<dyn AsyncRead + Send>>;

/// GETs `spec` and returns its body and, if announced, its length.
pub async fn download(spec: &UrlSpec) -> Result<(Body, Option<u64>), ImageError> {
    let (url, headers) = spec.validate().map_err(ImageError::Refused)?;
    let response = http_client()?
        .get(url)
        .headers(headers)
        .send()
        .await
        .map_err(|e| ImageError::Io {
            context: format!("downloading {}", spec.display()),
            source: std::io::Error::other(e),
        })?;
    if !response.status().is_success() {
        return Err(ImageError::Io {
            context: format!("downloading {}", spec.display()),
            source: std::io::Error::other(format!("HTTP {}", response.status())),
        });
    }
    let length = response.content_length();
    let stream = response.bytes_stream().map_err(std::io::Error::other);
    Ok((Box::pin(tokio_util::io::StreamReader::new(stream)), length))
}

/// PUTs the bytes arriving on `chunks` to `spec`.
pub async fn upload(spec: &UrlSpec, chunks: mpsc::Receiver<Chunk>) -> Result<(), ImageError> {
    let (url, headers) = spec.validate().map_err(ImageError::Refused)?;
    let stream = chunk_stream(chunks);
    let response = http_client()?
        .put(url)
        .headers(headers)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .map_err(|e| ImageError::Io {
            context: format!("uploading to {}", spec.display()),
            source: std::io::Error::other(e),
        })?;
    if !response.status().is_success() {
        return Err(ImageError::Io {
            context: format!("uploading to {}", spec.display()),
            source: std::io::Error::other(format!("HTTP {}", response.status())),
        });
    }
    Ok(())
}

/// Told how many bytes just went through (the agent's byte counters).
pub type Tally = Box<dyn Fn(u64) + Send + Sync>;

/// Counts the bytes read through it, for progress, and optionally tells a [`Tally`].
pub struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
    tally: Option<Tally>,
}

impl<R> Counting<R> {
    pub fn new(inner: R) -> (Self, Arc<AtomicU64>) {
        Self::build(inner, None)
    }

    /// Also hands every read's byte count to `tally` as it happens.
    pub fn tallied(inner: R, tally: Tally) -> (Self, Arc<AtomicU64>) {
        Self::build(inner, Some(tally))
    }

    fn build(inner: R, tally: Option<Tally>) -> (Self, Arc<AtomicU64>) {
        let count = Arc::new(AtomicU64::new(0));
        (
            Counting {
                inner,
                count: count.clone(),
                tally,
            },
            count,
        )
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        self.count.fetch_add(read, Ordering::Relaxed);
        if let Some(tally) = &self.tally
            && read > 0
        {
            tally(read);
        }
        result
    }
}

/// One piece of a streamed image: bytes, or the error that ended the stream early (so a reader
/// never takes a truncated image for a complete one).
pub type Chunk = Result<Bytes, std::io::Error>;

/// A blocking writer whose bytes come out of an async channel: lets synchronous encoders
/// (tar, gzip) feed an HTTP body without holding the whole output.
pub struct ChannelWriter {
    sender: mpsc::Sender<Chunk>,
    buffer: Vec<u8>,
}

/// Chunk size handed to the channel.
const CHUNK: usize = 1 << 20;

impl ChannelWriter {
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<Chunk>) {
        let (sender, receiver) = mpsc::channel(capacity);
        (
            ChannelWriter {
                sender,
                buffer: Vec::with_capacity(CHUNK),
            },
            receiver,
        )
    }

    /// Ends the stream with an error instead of a clean end.
    pub fn fail(mut self, message: String) {
        self.buffer.clear();
        let _ = self
            .sender
            .blocking_send(Err(std::io::Error::other(message)));
    }

    fn send_buffer(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(CHUNK),
        ));
        self.sender.blocking_send(Ok(chunk)).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the receiver went away")
        })
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CHUNK {
            self.send_buffer()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_buffer()
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        let _ = self.send_buffer();
    }
}

/// The chunks of a channel as a stream (for HTTP bodies).
pub fn chunk_stream(
    receiver: mpsc::Receiver<Chunk>,
) -> impl futures_util::Stream<Item = Chunk> + Send + 'static {
    futures_util::stream::unfold(receiver, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_checked_and_never_echoed() {
        let spec = UrlSpec {
            url: "https://glance.example/v2/images/x/file".into(),
            headers: vec!["X-Auth-Token: secret-token".into()],
        };
        assert!(spec.validate().is_ok());
        let bad = UrlSpec {
            url: spec.url.clone(),
            headers: vec!["X-Auth-Token secret-token".into()],
        };
        let message = bad.validate().unwrap_err();
        assert!(!message.contains("secret-token"), "{message}");
        let ftp = UrlSpec {
            url: "ftp://x/y".into(),
            headers: vec![],
        };
        assert!(ftp.validate().unwrap_err().contains("only http and https"));
    }
}
