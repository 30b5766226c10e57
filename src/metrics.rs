//! The agent's metrics, served at `GET /metrics` in the OpenMetrics text format (which
//! Prometheus scrapes natively).
//!
//! One [`Metrics`] belongs to each agent and is handed to the parts that count: the XenAPI
//! client (through [`CallObserver`]), the job manager and the API handlers. Nothing is global.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `xenapinfs_operations_total` | counter | `operation`, `outcome` (`succeeded`, `failed`, `cancelled`) |
//! | `xenapinfs_operation_duration_seconds` | histogram | `operation` |
//! | `xenapinfs_imported_bytes_total`, `xenapinfs_exported_bytes_total` | counter | |
//! | `xenapinfs_xenapi_calls_total` | counter | `method` |
//! | `xenapinfs_xenapi_errors_total` | counter | `method`, `code` (xapi's error code, or `transport`, `protocol`) |
//! | `xenapinfs_jobs_running` | gauge | |

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::jobs::JobState;
use crate::xenapi::CallObserver;
use crate::xenapi::XenApiError;

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The operations the agent offers, so that every series exists (at zero) from the start.
const OPERATIONS: [&str; 11] = [
    "create",
    "delete",
    "extend",
    "attach",
    "detach",
    "snapshot",
    "clone",
    "from-snapshot",
    "import",
    "create-from-image",
    "export",
];

/// Upper bounds of the duration buckets, in seconds: from quick metadata calls to hour-long
/// copies of large volumes.
const DURATION_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
];

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }

    /// The outcome of an operation answered with an error of API `kind`.
    pub fn of_error_kind(kind: &str) -> Outcome {
        if kind == "cancelled" {
            Outcome::Cancelled
        } else {
            Outcome::Failed
        }
    }
}

impl From<JobState> for Outcome {
    /// The outcome of a finished job (a running one counts as not yet succeeded: failed).
    fn from(state: JobState) -> Self {
        match state {
            JobState::Succeeded => Outcome::Succeeded,
            JobState::Cancelled => Outcome::Cancelled,
            JobState::Failed | JobState::Running => Outcome::Failed,
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OperationLabels {
    operation: String,
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OperationLabel {
    operation: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    method: String,
    code: String,
}

type DurationFamily = Family<OperationLabel, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The registry and the metrics in it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    operations: Family<OperationLabels, Counter>,
    durations: DurationFamily,
    imported_bytes: Counter,
    exported_bytes: Counter,
    xenapi_calls: Family<MethodLabel, Counter>,
    xenapi_errors: Family<ErrorLabels, Counter>,
    jobs_running: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("xenapinfs");
        let operations = Family::<OperationLabels, Counter>::default();
        registry.register(
            "operations",
            "Volume operations finished, by operation and outcome",
            operations.clone(),
        );
        let durations = DurationFamily::new_with_constructor(duration_histogram);
        registry.register_with_unit(
            "operation_duration",
            "How long volume operations took, from request (or job start) to their end",
            Unit::Seconds,
            durations.clone(),
        );
        let imported_bytes = Counter::default();
        registry.register_with_unit(
            "imported",
            "Image bytes received for imports (uploads and downloads)",
            Unit::Bytes,
            imported_bytes.clone(),
        );
        let exported_bytes = Counter::default();
        registry.register_with_unit(
            "exported",
            "Image bytes sent by exports (to callers and to URLs)",
            Unit::Bytes,
            exported_bytes.clone(),
        );
        let xenapi_calls = Family::<MethodLabel, Counter>::default();
        registry.register(
            "xenapi_calls",
            "XenAPI requests sent, logins included, by method",
            xenapi_calls.clone(),
        );
        let xenapi_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "xenapi_errors",
            "XenAPI requests that failed, by method and XenAPI error code (transport: no answer; protocol: an answer that is not XenAPI)",
            xenapi_errors.clone(),
        );
        let jobs_running = Gauge::default();
        registry.register(
            "jobs_running",
            "Jobs (long operations) running now",
            jobs_running.clone(),
        );
        for operation in OPERATIONS {
            for outcome in [Outcome::Succeeded, Outcome::Failed, Outcome::Cancelled] {
                operations.get_or_create_owned(&OperationLabels {
                    operation: operation.to_string(),
                    outcome,
                });
            }
            durations.get_or_create_owned(&OperationLabel {
                operation: operation.to_string(),
            });
        }
        Metrics {
            registry,
            operations,
            durations,
            imported_bytes,
            exported_bytes,
            xenapi_calls,
            xenapi_errors,
            jobs_running,
        }
    }

    /// Counts a finished operation and how long it took.
    pub fn operation_finished(&self, operation: &str, outcome: Outcome, took: Duration) {
        self.operations
            .get_or_create(&OperationLabels {
                operation: operation.to_string(),
                outcome,
            })
            .inc();
        self.durations
            .get_or_create(&OperationLabel {
                operation: operation.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts image bytes received for an import.
    pub fn imported(&self, bytes: u64) {
        self.imported_bytes.inc_by(bytes);
    }

    /// Counts image bytes sent by an export.
    pub fn exported(&self, bytes: u64) {
        self.exported_bytes.inc_by(bytes);
    }

    /// The exposition, with the jobs gauge set to `jobs_running` (read when scraped, so it
    /// cannot drift from the job table).
    pub fn encode(&self, jobs_running: usize) -> String {
        self.jobs_running
            .set(i64::try_from(jobs_running).unwrap_or(i64::MAX));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// The label of a failed XenAPI request: xapi's code, or what kept xapi from answering.
fn error_code(error: &XenApiError) -> String {
    match error {
        XenApiError::Api { failure, .. } => failure.code.clone(),
        XenApiError::Transport { .. } => "transport".into(),
        XenApiError::Protocol { .. } => "protocol".into(),
        XenApiError::TaskCancelled { .. } => "task_cancelled".into(),
        XenApiError::TaskTimeout { .. } => "task_timeout".into(),
        XenApiError::TaskStalled { .. } => "task_stalled".into(),
        XenApiError::TooManyRedirects { .. } | XenApiError::BadMasterAddress { .. } => {
            "redirect".into()
        }
    }
}

impl CallObserver for Metrics {
    fn call_finished(&self, method: &str, error: Option<&XenApiError>) {
        self.xenapi_calls
            .get_or_create(&MethodLabel {
                method: method.to_string(),
            })
            .inc();
        if let Some(error) = error {
            self.xenapi_errors
                .get_or_create(&ErrorLabels {
                    method: method.to_string(),
                    code: error_code(error),
                })
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xenapi::{ApiFailure, TransportError};

    /// The value of the sample whose name and labels are exactly `series`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .filter_map(|line| line.rsplit_once(' '))
            .find(|(name, _)| *name == series)
            .and_then(|(_, value)| value.parse().ok())
    }

    #[test]
    fn operations_are_counted_by_kind_and_outcome_and_timed() {
        let metrics = Metrics::new();
        metrics.operation_finished("snapshot", Outcome::Succeeded, Duration::from_millis(300));
        metrics.operation_finished("snapshot", Outcome::Failed, Duration::from_secs(2));
        metrics.operation_finished("snapshot", Outcome::Succeeded, Duration::from_secs(20));
        let text = metrics.encode(0);
        assert_eq!(
            sample(
                &text,
                r#"xenapinfs_operations_total{operation="snapshot",outcome="succeeded"}"#
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"xenapinfs_operations_total{operation="snapshot",outcome="failed"}"#
            ),
            Some(1.0)
        );
        // Known operations are there at zero before they first happen.
        assert_eq!(
            sample(
                &text,
                r#"xenapinfs_operations_total{operation="extend",outcome="cancelled"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"xenapinfs_operation_duration_seconds_count{operation="snapshot"}"#
            ),
            Some(3.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"xenapinfs_operation_duration_seconds_bucket{le="1.0",operation="snapshot"}"#
            )
            .or_else(|| sample(
                &text,
                r#"xenapinfs_operation_duration_seconds_bucket{operation="snapshot",le="1.0"}"#
            )),
            Some(1.0),
            "{text}"
        );
    }

    #[test]
    fn xenapi_errors_are_labelled_with_the_code_or_transport() {
        let metrics = Metrics::new();
        let refused = XenApiError::Api {
            method: "VDI.resize".into(),
            failure: ApiFailure {
                code: "SR_FULL".into(),
                params: vec![],
            },
        };
        let unreachable = XenApiError::Transport {
            method: "session.login_with_password".into(),
            url: "https://10.0.0.1/".into(),
            source: TransportError::Timeout(10),
        };
        metrics.call_finished("VDI.resize", None);
        metrics.call_finished("VDI.resize", Some(&refused));
        metrics.call_finished("session.login_with_password", Some(&unreachable));
        let text = metrics.encode(0);
        assert_eq!(
            sample(
                &text,
                r#"xenapinfs_xenapi_calls_total{method="VDI.resize"}"#
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"xenapinfs_xenapi_errors_total{method="VDI.resize",code="SR_FULL"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"xenapinfs_xenapi_errors_total{method="session.login_with_password",code="transport"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn bytes_and_running_jobs_appear_and_the_exposition_is_complete() {
        let metrics = Metrics::new();
        metrics.imported(1000);
        metrics.imported(24);
        metrics.exported(5);
        let text = metrics.encode(3);
        assert_eq!(
            sample(&text, "xenapinfs_imported_bytes_total"),
            Some(1024.0)
        );
        assert_eq!(sample(&text, "xenapinfs_exported_bytes_total"), Some(5.0));
        assert_eq!(sample(&text, "xenapinfs_jobs_running"), Some(3.0));
        assert!(
            text.contains("# TYPE xenapinfs_operations counter"),
            "{text}"
        );
        assert!(
            text.contains("# UNIT xenapinfs_imported_bytes bytes"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(
            sample(&metrics.encode(0), "xenapinfs_jobs_running"),
            Some(0.0)
        );
    }
}
