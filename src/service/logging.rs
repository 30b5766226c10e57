//! Logging: to journald when started by systemd, to stderr otherwise.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber. `RUST_LOG` overrides the default level (`info`).
/// `to_journal` is decided by the caller (systemd sets `JOURNAL_STREAM`); if journald cannot be
/// reached the logs go to stderr instead.
pub fn init(to_journal: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let journal = to_journal.then(|| tracing_journald::layer().ok()).flatten();
    let stderr = journal.is_none().then(|| {
        // Colours only for a terminal: a log file or a pipe gets plain text.
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
    });
    // A second init (tests starting several daemons in one process) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(journal)
        .with(stderr)
        .try_init();
}
