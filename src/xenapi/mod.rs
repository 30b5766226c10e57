//! The XenAPI client: XML-RPC over HTTP(S) to xapi on the pool master.
//!
//! Layers, bottom up: [`codec`] (XML-RPC bytes), [`transport`] and [`tls`] (HTTPS with a CA file,
//! a pinned fingerprint or, when configured, no verification), [`client`] (session, re-login,
//! master redirect), [`records`] (typed references and records), [`calls`] and [`task`] (the
//! calls the agent makes, `Async.*` tasks).

pub mod calls;
pub mod client;
pub mod codec;
pub mod error;
pub mod records;
pub mod task;
pub mod tls;
pub mod transport;

pub use calls::{NewVbd, NewVdi, SrSpec};
pub use client::{CallObserver, ClientSettings, ConnectionState, Password, XenApiClient};
pub use error::{ApiFailure, TransportError, XenApiError};
pub use records::*;
pub use task::TaskWait;
pub use tls::{Fingerprint, TlsTrust};
pub use transport::TransportSettings;
