//! Telling systemd how the agent is doing: READY, STATUS, WATCHDOG, STOPPING.

use std::sync::Mutex;

/// Where service state notifications go. The real one is systemd's `NOTIFY_SOCKET`; tests can
/// record them instead.
pub trait Notifier: Send + Sync + std::fmt::Debug {
    fn ready(&self);
    fn status(&self, text: &str);
    fn watchdog(&self);
    fn reloading(&self);
    fn stopping(&self);
}

/// Sends to `NOTIFY_SOCKET` (nothing happens when the variable is unset, as outside systemd).
#[derive(Debug, Default)]
pub struct SystemdNotifier {
    /// The last STATUS sent, so repeated identical lines are not sent again.
    last_status: Mutex<String>,
}

fn send(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "could not notify systemd");
    }
}

impl Notifier for SystemdNotifier {
    fn ready(&self) {
        send(&[sd_notify::NotifyState::Ready]);
    }

    fn status(&self, text: &str) {
        let mut last = self.last_status.lock().expect("lock poisoned");
        if *last != text {
            send(&[sd_notify::NotifyState::Status(text)]);
            *last = text.to_string();
        }
    }

    fn watchdog(&self) {
        send(&[sd_notify::NotifyState::Watchdog]);
    }

    fn reloading(&self) {
        let now = sd_notify::NotifyState::monotonic_usec_now();
        match now {
            Ok(stamp) => send(&[sd_notify::NotifyState::Reloading, stamp]),
            Err(_) => send(&[sd_notify::NotifyState::Reloading]),
        }
    }

    fn stopping(&self) {
        send(&[sd_notify::NotifyState::Stopping]);
    }
}
