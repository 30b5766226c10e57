//! The XenAPI client: one long-lived session per agent, re-established transparently.
//!
//! - A `SESSION_INVALID` answer (xapi restarted, session expired) or `HOST_IS_SLAVE` (the
//!   pool master moved) triggers one fresh login and a retry of the call.
//! - A login answered with `HOST_IS_SLAVE` is repeated against the master it names, and every
//!   later call goes there.
//! - The password is sent only in the login call and never appears in errors or logs.

use std::sync::{Arc, Mutex, RwLock};

use reqwest::Url;
use tracing::{debug, info, warn};

use super::codec::{self, Decoded, Value};
use super::error::XenApiError;
use super::transport::{HttpTransport, TransportSettings};

/// A password that does not print itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(secret: impl Into<String>) -> Self {
        Password(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(******)")
    }
}

/// What the client needs to reach and log in to a pool.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub url: Url,
    pub username: String,
    pub password: Password,
    pub transport: TransportSettings,
}

/// Told about every request the client sends, as it completes (the agent's metrics count
/// them). Kept here so the client depends on nothing above it.
pub trait CallObserver: Send + Sync + std::fmt::Debug {
    /// `method` was sent; `error` is why it failed, if it did.
    fn call_finished(&self, method: &str, error: Option<&XenApiError>);
}

/// How many times a login may be sent on to another pool member.
const MAX_MASTER_REDIRECTS: usize = 3;

/// A snapshot of the connection for status reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnectionState {
    /// Where calls go now (the pool master after a redirect).
    pub url: String,
    pub logged_in: bool,
    pub logins: u64,
    pub last_error: Option<String>,
}

#[derive(Debug)]
struct Current {
    url: Url,
    session: Option<String>,
    logins: u64,
    last_error: Option<String>,
}

/// How to reach and log in to the pool.
#[derive(Debug)]
struct Link {
    transport: HttpTransport,
    username: String,
    password: Password,
    originator: String,
}

impl Link {
    fn new(settings: &ClientSettings) -> Result<Self, XenApiError> {
        let transport =
            HttpTransport::new(&settings.transport).map_err(|source| XenApiError::Transport {
                method: "(setup)".into(),
                url: settings.url.to_string(),
                source,
            })?;
        Ok(Link {
            transport,
            username: settings.username.clone(),
            password: settings.password.clone(),
            originator: settings.transport.originator.clone(),
        })
    }
}

/// XenAPI client bound to one pool.
#[derive(Debug)]
pub struct XenApiClient {
    /// Replaced whole by [`XenApiClient::reconfigure`].
    link: RwLock<Arc<Link>>,
    current: RwLock<Current>,
    /// Serialises logins so that concurrent calls after an expiry make one login, not many.
    login_gate: tokio::sync::Mutex<()>,
    calls: Mutex<u64>,
    observer: Option<Arc<dyn CallObserver>>,
}

impl XenApiClient {
    pub fn new(settings: ClientSettings) -> Result<Self, XenApiError> {
        Self::build(settings, None)
    }

    /// A client that reports each request it sends to `observer`.
    pub fn with_observer(
        settings: ClientSettings,
        observer: Arc<dyn CallObserver>,
    ) -> Result<Self, XenApiError> {
        Self::build(settings, Some(observer))
    }

    fn build(
        settings: ClientSettings,
        observer: Option<Arc<dyn CallObserver>>,
    ) -> Result<Self, XenApiError> {
        Ok(XenApiClient {
            link: RwLock::new(Arc::new(Link::new(&settings)?)),
            current: RwLock::new(Current {
                url: settings.url,
                session: None,
                logins: 0,
                last_error: None,
            }),
            login_gate: tokio::sync::Mutex::new(()),
            calls: Mutex::new(0),
            observer,
        })
    }

    /// Switches to new connection settings (a configuration reload): later calls log in
    /// afresh with them. The old session is simply dropped; xapi expires it.
    pub fn reconfigure(&self, settings: ClientSettings) -> Result<(), XenApiError> {
        let link = Arc::new(Link::new(&settings)?);
        *self.link.write().expect("lock poisoned") = link;
        let mut current = self.current.write().expect("lock poisoned");
        current.url = settings.url;
        current.session = None;
        current.last_error = None;
        Ok(())
    }

    fn link(&self) -> Arc<Link> {
        self.link.read().expect("lock poisoned").clone()
    }

    /// Logs in now (instead of at the first call), so configuration errors surface at start.
    pub async fn connect(&self) -> Result<(), XenApiError> {
        self.session().await.map(|_| ())
    }

    /// Calls `method` with the session as first argument, re-logging in once if the session
    /// has become invalid.
    pub async fn call(&self, method: &str, args: &[Value]) -> Result<Value, XenApiError> {
        self.call_inner(method, args, false).await
    }

    /// Calls a `session.*` method whose `self` argument is our own session.
    pub async fn call_on_own_session(&self, method: &str) -> Result<Value, XenApiError> {
        self.call_inner(method, &[], true).await
    }

    async fn call_inner(
        &self,
        method: &str,
        args: &[Value],
        session_is_self: bool,
    ) -> Result<Value, XenApiError> {
        let mut retried = false;
        loop {
            let (url, session) = self.session().await?;
            let mut params = Vec::with_capacity(args.len() + 2);
            params.push(Value::String(session.clone()));
            if session_is_self {
                params.push(Value::String(session.clone()));
            }
            params.extend_from_slice(args);
            match self.send(&url, method, &params).await {
                Err(e) if (e.is("SESSION_INVALID") || e.is("HOST_IS_SLAVE")) && !retried => {
                    info!(
                        method,
                        code = e.code().unwrap_or_default(),
                        "XenAPI session is no longer valid here; logging in again"
                    );
                    self.forget_session(&session);
                    retried = true;
                }
                result => return self.remember(result),
            }
        }
    }

    /// Ends the session (best effort: the session dies with xapi anyway).
    pub async fn logout(&self) {
        let taken = {
            let mut current = self.current.write().expect("lock poisoned");
            current.session.take().map(|s| (current.url.clone(), s))
        };
        if let Some((url, session)) = taken
            && let Err(e) = self
                .send(&url, "session.logout", &[Value::String(session)])
                .await
        {
            debug!(error = %e, "XenAPI logout failed");
        }
    }

    pub fn state(&self) -> ConnectionState {
        let current = self.current.read().expect("lock poisoned");
        ConnectionState {
            url: current.url.to_string(),
            logged_in: current.session.is_some(),
            logins: current.logins,
            last_error: current.last_error.clone(),
        }
    }

    /// Number of XenAPI requests sent, logins included.
    pub fn calls_sent(&self) -> u64 {
        *self.calls.lock().expect("lock poisoned")
    }

    async fn session(&self) -> Result<(Url, String), XenApiError> {
        if let Some(found) = self.cached_session() {
            return Ok(found);
        }
        let _gate = self.login_gate.lock().await;
        if let Some(found) = self.cached_session() {
            return Ok(found);
        }
        let result = self.login().await;
        if let Err(e) = &result {
            // A refused login (a wrong password, a redirect loop) leaves no session just as an
            // unreachable host does: the connection state must say why.
            self.current.write().expect("lock poisoned").last_error = Some(e.to_string());
            return result;
        }
        self.remember(result)
    }

    fn cached_session(&self) -> Option<(Url, String)> {
        let current = self.current.read().expect("lock poisoned");
        current.session.clone().map(|s| (current.url.clone(), s))
    }

    async fn login(&self) -> Result<(Url, String), XenApiError> {
        let mut url = self.current.read().expect("lock poisoned").url.clone();
        let link = self.link();
        let params = [
            Value::String(link.username.clone()),
            Value::String(link.password.expose().to_string()),
            Value::String("1.0".into()),
            Value::String(link.originator.clone()),
        ];
        for _ in 0..=MAX_MASTER_REDIRECTS {
            match self
                .send(&url, "session.login_with_password", &params)
                .await
            {
                Ok(value) => {
                    let session = value.as_str().filter(|s| !s.is_empty()).ok_or_else(|| {
                        XenApiError::Protocol {
                            method: "session.login_with_password".into(),
                            reason: format!("expected a session reference, got {value:?}"),
                        }
                    })?;
                    let mut current = self.current.write().expect("lock poisoned");
                    current.url = url.clone();
                    current.session = Some(session.to_string());
                    current.logins += 1;
                    info!(url = %url, user = %link.username, "logged in to XenAPI");
                    return Ok((url, session.to_string()));
                }
                Err(e) if e.is("HOST_IS_SLAVE") => {
                    let address = e.params().first().cloned().unwrap_or_default();
                    let master = master_url(&url, &address)?;
                    warn!(from = %url, to = %master, "XenAPI host is a pool member, not the master; following to the master");
                    url = master;
                }
                Err(e) => return Err(e),
            }
        }
        Err(XenApiError::TooManyRedirects {
            last: url.to_string(),
        })
    }

    fn forget_session(&self, stale: &str) {
        let mut current = self.current.write().expect("lock poisoned");
        if current.session.as_deref() == Some(stale) {
            current.session = None;
        }
    }

    fn remember<T>(&self, result: Result<T, XenApiError>) -> Result<T, XenApiError> {
        let mut current = self.current.write().expect("lock poisoned");
        current.last_error = match &result {
            Err(e) if e.is_unreachable() => Some(e.to_string()),
            _ => None,
        };
        result
    }

    async fn send(&self, url: &Url, method: &str, params: &[Value]) -> Result<Value, XenApiError> {
        let result = self.send_once(url, method, params).await;
        if let Some(observer) = &self.observer {
            observer.call_finished(method, result.as_ref().err());
        }
        result
    }

    async fn send_once(
        &self,
        url: &Url,
        method: &str,
        params: &[Value],
    ) -> Result<Value, XenApiError> {
        *self.calls.lock().expect("lock poisoned") += 1;
        debug!(method, "XenAPI call");
        let body = codec::encode_call(method, params);
        let link = self.link();
        let response = link
            .transport
            .post(url, &link.originator, body)
            .await
            .map_err(|source| XenApiError::Transport {
                method: method.to_string(),
                url: url.to_string(),
                source,
            })?;
        match codec::decode_response(&response) {
            Ok(Decoded::Success(value)) => Ok(value),
            Ok(Decoded::Failure(failure)) => Err(XenApiError::Api {
                method: method.to_string(),
                failure,
            }),
            Err(reason) => Err(XenApiError::Protocol {
                method: method.to_string(),
                reason,
            }),
        }
    }
}

/// The URL of the master named in `HOST_IS_SLAVE`: xapi sends an address (normally an IP); a
/// `host:port` form is accepted too. Scheme and path stay those of the configured URL.
fn master_url(current: &Url, address: &str) -> Result<Url, XenApiError> {
    let bad = || XenApiError::BadMasterAddress {
        address: address.to_string(),
    };
    let address = address.trim();
    if address.is_empty() {
        return Err(bad());
    }
    let (host, port) = if let Ok(ip) = address.parse::<std::net::IpAddr>() {
        (
            match ip {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                std::net::IpAddr::V4(v4) => v4.to_string(),
            },
            None,
        )
    } else if let Ok(socket) = address.parse::<std::net::SocketAddr>() {
        let host = match socket.ip() {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            std::net::IpAddr::V4(v4) => v4.to_string(),
        };
        (host, Some(socket.port()))
    } else {
        match address.rsplit_once(':') {
            Some((host, port)) => (
                host.to_string(),
                Some(port.parse::<u16>().map_err(|_| bad())?),
            ),
            None => (address.to_string(), None),
        }
    };
    let mut url = current.clone();
    url.set_host(Some(&host)).map_err(|_| bad())?;
    if let Some(port) = port {
        url.set_port(Some(port)).map_err(|_| bad())?;
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_address_replaces_the_host_and_keeps_scheme_and_port() {
        let current = Url::parse("https://10.0.0.2/").unwrap();
        assert_eq!(
            master_url(&current, "10.0.0.1").unwrap().as_str(),
            "https://10.0.0.1/"
        );
        assert_eq!(
            master_url(&current, "10.0.0.1:8443").unwrap().as_str(),
            "https://10.0.0.1:8443/"
        );
        assert_eq!(
            master_url(&current, "fd00::1").unwrap().as_str(),
            "https://[fd00::1]/"
        );
        assert_eq!(
            master_url(&current, "master.example").unwrap().as_str(),
            "https://master.example/"
        );
        assert!(master_url(&current, "").is_err());
        assert!(master_url(&current, "a b:x").is_err());
    }

    #[test]
    fn password_is_not_printed() {
        let p = Password::new("hunter2");
        assert!(!format!("{p:?}").contains("hunter2"));
    }
}
