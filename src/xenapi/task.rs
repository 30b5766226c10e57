//! Waiting for `Async.*` tasks: progress, cancellation, timeout, result decoding.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::client::XenApiClient;
use super::codec::{self, Value};
use super::error::{ApiFailure, XenApiError};
use super::records::{Ref, Task, TaskRecord, TaskStatus};

/// How to wait for a task.
pub struct TaskWait<'a> {
    pub poll_interval: Duration,
    /// Give up (and cancel the task) after this long.
    pub timeout: Option<Duration>,
    /// Give up (and cancel the task) when its progress has not moved for this long: a copy
    /// may rightly take hours, a hung one never moves.
    pub stall_timeout: Option<Duration>,
    /// Cancel the task when this token fires.
    pub cancel: &'a CancellationToken,
    /// Called with the task's progress (0.0 ..= 1.0) whenever it changes.
    pub on_progress: &'a mut (dyn FnMut(f64) + Send),
}

impl XenApiClient {
    /// Polls `task` until it ends and returns its decoded result. The task object is destroyed
    /// once it has ended, whatever the outcome, so it does not linger in xapi.
    pub async fn wait_task(
        &self,
        task: &Ref<Task>,
        wait: TaskWait<'_>,
    ) -> Result<Value, XenApiError> {
        let started = Instant::now();
        let mut last_progress = -1.0;
        let mut cancel_sent = false;
        let mut timed_out = None;
        let mut last_change = Instant::now();
        let record = loop {
            let record: TaskRecord = self.get_record(task).await?;
            if (record.progress - last_progress).abs() > f64::EPSILON {
                last_progress = record.progress;
                last_change = Instant::now();
                (wait.on_progress)(record.progress.clamp(0.0, 1.0));
            }
            if record.status.is_finished() {
                break record;
            }
            let overdue = if wait.timeout.is_some_and(|limit| started.elapsed() >= limit) {
                Some(Overdue::Total(started.elapsed()))
            } else if wait
                .stall_timeout
                .is_some_and(|limit| last_change.elapsed() >= limit)
            {
                Some(Overdue::Stalled(last_change.elapsed()))
            } else {
                None
            };
            if !cancel_sent && (wait.cancel.is_cancelled() || overdue.is_some()) {
                timed_out = overdue.filter(|_| !wait.cancel.is_cancelled());
                debug!(task = %task, ?timed_out, "cancelling XenAPI task");
                match self.task_cancel(task).await {
                    Ok(()) => {}
                    // Not cancellable (or already done): keep polling until it ends on its own.
                    Err(e) if e.is("OPERATION_NOT_ALLOWED") => {}
                    Err(e) => return Err(e),
                }
                cancel_sent = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait.poll_interval) => {}
                _ = wait.cancel.cancelled(), if !cancel_sent => {}
            }
        };
        if let Err(e) = self.task_destroy(task).await {
            warn!(task = %task, error = %e, "could not destroy finished XenAPI task");
        }
        let method = format!("task {}", record.name_label);
        match record.status {
            TaskStatus::Success => codec::decode_task_result(&record.result)
                .map_err(|reason| XenApiError::Protocol { method, reason }),
            TaskStatus::Cancelled => Err(task_ended_early(task, &record, timed_out)),
            TaskStatus::Failure
                if record
                    .error_info
                    .first()
                    .is_some_and(|c| c == "TASK_CANCELLED") =>
            {
                Err(task_ended_early(task, &record, timed_out))
            }
            _ => {
                let mut info = record.error_info.into_iter();
                Err(XenApiError::Api {
                    method: record.name_label,
                    failure: ApiFailure {
                        code: info.next().unwrap_or_else(|| "INTERNAL_ERROR".into()),
                        params: info.collect(),
                    },
                })
            }
        }
    }
}

/// Why the agent itself cancelled a task.
#[derive(Debug, Clone, Copy)]
enum Overdue {
    Total(Duration),
    Stalled(Duration),
}

fn task_ended_early(
    task: &Ref<Task>,
    record: &TaskRecord,
    overdue: Option<Overdue>,
) -> XenApiError {
    let (task, name) = (task.to_string(), record.name_label.clone());
    match overdue {
        Some(Overdue::Total(after)) => XenApiError::TaskTimeout {
            task,
            name,
            seconds: after.as_secs(),
        },
        Some(Overdue::Stalled(after)) => XenApiError::TaskStalled {
            task,
            name,
            seconds: after.as_secs(),
        },
        None => XenApiError::TaskCancelled { task, name },
    }
}
