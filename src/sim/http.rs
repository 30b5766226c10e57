//! The HTTP/1.1 side, shaped like xapi's: `POST /` and `POST /RPC2`, persistent connections,
//! xapi's response headers, HTTP 500 with an HTML page for bodies that are not XML-RPC, and a
//! 300 KiB limit on request bodies.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dispatch::{self, Reply, Role};
use super::state::SimState;

/// xapi's `http_limit_max_rpc_size`.
pub const MAX_BODY: usize = 300 * 1024;
const THUMBPRINT_REQUEST: &str = "x-xenapi-request-host-certificate-thumbprint";
const THUMBPRINT_RESPONSE: &str = "x-xenapi-response-host-certificate-thumbprint";

/// Accepts connections until `shutdown`; each connection is served on its own task, which
/// finishes its current request and closes when `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    role: Role,
    sim: Arc<SimState>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, _) = match accepted {
            Ok(x) => x,
            Err(e) => {
                eprintln!("xenapinfs-sim: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let sim = sim.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            match tls {
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                            .await;
                    if let Ok(Ok(stream)) = handshake {
                        serve_connection(TokioIo::new(stream), role, sim, shutdown, true).await;
                    }
                }
                None => serve_connection(TokioIo::new(stream), role, sim, shutdown, false).await,
            }
        });
    }
}

async fn serve_connection<I>(
    io: I,
    role: Role,
    sim: Arc<SimState>,
    shutdown: CancellationToken,
    tls: bool,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let sim = sim.clone();
        async move { Ok::<_, Infallible>(respond(request, role, sim, tls).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        .auto_date_header(false)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(60));
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(30), connection).await;
        }
    }
}

fn wants_close(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        || request.version() == hyper::Version::HTTP_10
}

async fn respond(
    request: Request<Incoming>,
    role: Role,
    sim: Arc<SimState>,
    tls: bool,
) -> Response<Full<Bytes>> {
    let close = wants_close(&request);
    let path = request.uri().path().to_string();
    if request.method() != Method::POST || path.starts_with("/json") {
        return html(
            StatusCode::NOT_FOUND,
            None,
            "<html><body><h1>HTTP 404 not found</h1>The requested URL was not found on this server</body></html>",
        );
    }
    let wants_thumbprint = request.headers().contains_key(THUMBPRINT_REQUEST);
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return too_large();
    }
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return too_large();
        }
        Err(_) => {
            return html(
                StatusCode::BAD_REQUEST,
                None,
                "<html><body><h1>HTTP 400 bad request</h1></body></html>",
            );
        }
    };
    let handled = tokio::task::spawn_blocking(move || {
        let reply = dispatch::handle(&sim, role, &body);
        (reply, sim)
    })
    .await;
    let (reply, sim) = match handled {
        Ok(x) => x,
        Err(e) => {
            return html(
                StatusCode::INTERNAL_SERVER_ERROR,
                Some("Internal Error"),
                &internal_error_page(&format!("simulator handler crashed: {e}")),
            );
        }
    };
    match reply {
        Reply::Xml {
            body,
            host_is_slave,
        } => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            let headers = response.headers_mut();
            headers.insert(
                header::CONNECTION,
                HeaderValue::from_static(if close { "close" } else { "keep-alive" }),
            );
            headers.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("no-cache, no-store"),
            );
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/xml"));
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("X-Requested-With"),
            );
            if host_is_slave
                && tls
                && wants_thumbprint
                && let Some(fp) = sim
                    .fingerprint
                    .as_deref()
                    .and_then(|f| HeaderValue::from_str(f).ok())
            {
                headers.insert(THUMBPRINT_RESPONSE, fp);
            }
            response
        }
        Reply::Malformed(e) => html(
            StatusCode::INTERNAL_SERVER_ERROR,
            Some("Internal Error"),
            &internal_error_page(&e.to_string()),
        ),
    }
}

fn too_large() -> Response<Full<Bytes>> {
    html(
        StatusCode::PAYLOAD_TOO_LARGE,
        None,
        "<html><body><h1>HTTP 413 request entity too large</h1>The request body exceeds the limit of 307200 bytes</body></html>",
    )
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn internal_error_page(detail: &str) -> String {
    format!(
        "<html><body><h1>HTTP 500 internal server error</h1>An unexpected error occurred; please wait a while and try again. If the problem persists, please contact your support representative.<h1> Additional information </h1>{}</body></html>",
        escape_html(detail)
    )
}

/// An error page; these always close the connection, as xapi does.
fn html(status: StatusCode, reason: Option<&'static str>, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    if let Some(reason) = reason {
        response
            .extensions_mut()
            .insert(hyper::ext::ReasonPhrase::from_static(reason.as_bytes()));
    }
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store"),
    );
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    response
}
