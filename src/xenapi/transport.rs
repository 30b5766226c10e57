//! HTTP(S) transport for XML-RPC: one POST per call, pooled connections, explicit timeouts.

use std::time::Duration;

use super::error::TransportError;
use super::tls::{TlsTrust, client_config};

/// Connection settings of the transport.
#[derive(Debug, Clone)]
pub struct TransportSettings {
    pub trust: TlsTrust,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Sent as the `originator` header and used as the login originator, so xapi groups (and
    /// limits) our sessions apart from everyone else's.
    pub originator: String,
}

/// Posts XML-RPC bodies to a XenAPI endpoint.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    client: reqwest::Client,
    request_timeout: Duration,
}

impl HttpTransport {
    pub fn new(settings: &TransportSettings) -> Result<Self, TransportError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(format!("xenapinfs/{}", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(30))
            .http1_only();
        if let Some(config) = client_config(&settings.trust).map_err(TransportError::Tls)? {
            builder = builder.tls_backend_preconfigured(config);
        }
        let client = builder
            .build()
            .map_err(|e| TransportError::Other(error_chain(&e)))?;
        Ok(HttpTransport {
            client,
            request_timeout: settings.request_timeout,
        })
    }

    /// Sends one call and returns the response body of a 200 answer.
    pub async fn post(
        &self,
        url: &reqwest::Url,
        originator: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, TransportError> {
        let response = self
            .client
            .post(url.clone())
            .header("content-type", "text/xml")
            .header("originator", originator)
            .body(body)
            .send()
            .await
            .map_err(|e| self.classify(&e))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| self.classify(&e))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
            return Err(TransportError::Status {
                status: status.as_u16(),
                body: text,
            });
        }
        Ok(bytes.to_vec())
    }

    fn classify(&self, error: &reqwest::Error) -> TransportError {
        let chain = error_chain(error);
        if error.is_timeout() {
            TransportError::Timeout(self.request_timeout.as_secs())
        } else if is_tls_failure(&chain) {
            TransportError::Tls(chain)
        } else if error.is_connect() {
            TransportError::Connect(chain)
        } else {
            TransportError::Other(chain)
        }
    }
}

fn is_tls_failure(chain: &str) -> bool {
    let lower = chain.to_ascii_lowercase();
    ["certificate", "tls", "handshake", "fingerprint"]
        .iter()
        .any(|word| lower.contains(word))
}

/// reqwest's top-level message hides the cause ("error sending request"); operators need it.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
