//! Long operations as jobs: started at once, run in the background, observable and cancellable.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

/// How many finished jobs are remembered for `job list` / `job show`.
const FINISHED_KEPT: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_finished(self) -> bool {
        self != JobState::Running
    }
}

/// Why a job failed: a stable kind and a message for people.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobError {
    pub kind: String,
    pub message: String,
}

/// A job as reported to callers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub kind: String,
    /// The volume the job works on, if any.
    pub volume: Option<String>,
    pub state: JobState,
    /// Percent done, 0 to 100.
    pub progress: f64,
    pub message: String,
    pub result: Option<Value>,
    pub error: Option<JobError>,
    pub created: String,
    pub finished: Option<String>,
}

/// Handed to a job's body: report progress, notice cancellation.
#[derive(Debug, Clone)]
pub struct JobContext {
    updates: watch::Sender<Job>,
    pub cancel: CancellationToken,
}

impl JobContext {
    /// Records progress (percent, clamped to 0..=100 and never going back) and a status line.
    pub fn progress(&self, percent: f64, message: impl Into<String>) {
        let message = message.into();
        self.updates.send_modify(|job| {
            job.progress = job.progress.max(percent.clamp(0.0, 100.0));
            job.message = message;
        });
    }

    pub fn id(&self) -> String {
        self.updates.borrow().id.clone()
    }
}

#[derive(Debug)]
struct Entry {
    updates: watch::Sender<Job>,
    cancel: CancellationToken,
}

/// All jobs of the agent.
#[derive(Debug, Default)]
pub struct JobManager {
    jobs: Mutex<BTreeMap<String, Entry>>,
    tracker: TaskTracker,
    /// Cancelled at shutdown; every job's token is a child of it.
    root: CancellationToken,
    /// Where finished jobs are counted, if anywhere.
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl JobManager {
    /// A job manager that counts each finished job in `metrics`.
    pub fn with_metrics(metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        JobManager {
            metrics: Some(metrics),
            ..JobManager::default()
        }
    }

    /// Starts `body` in the background and returns the new job.
    pub fn start<F, Fut>(&self, kind: &str, volume: Option<String>, body: F) -> Job
    where
        F: FnOnce(JobContext) -> Fut,
        Fut: Future<Output = Result<Value, JobError>> + Send + 'static,
    {
        let id = uuid::Uuid::new_v4().to_string();
        let job = Job {
            id: id.clone(),
            kind: kind.to_string(),
            volume: volume.clone(),
            state: JobState::Running,
            progress: 0.0,
            message: "started".into(),
            result: None,
            error: None,
            created: now(),
            finished: None,
        };
        let (updates, _) = watch::channel(job.clone());
        let cancel = self.root.child_token();
        let context = JobContext {
            updates: updates.clone(),
            cancel: cancel.clone(),
        };
        {
            let mut jobs = self.jobs.lock().expect("lock poisoned");
            forget_oldest_finished(&mut jobs);
            jobs.insert(
                id.clone(),
                Entry {
                    updates: updates.clone(),
                    cancel: cancel.clone(),
                },
            );
        }
        let future = body(context);
        let span = info_span!("job", job_id = %id, kind, volume = volume.as_deref().unwrap_or("-"));
        let metrics = self.metrics.clone();
        self.tracker.spawn(
            async move {
                info!("job started");
                let started = std::time::Instant::now();
                let outcome = future.await;
                updates.send_modify(|job| {
                    job.finished = Some(now());
                    match outcome {
                        Ok(result) => {
                            job.state = JobState::Succeeded;
                            job.progress = 100.0;
                            job.message = "done".into();
                            job.result = Some(result);
                        }
                        Err(error) if cancel.is_cancelled() && error.kind == "cancelled" => {
                            job.state = JobState::Cancelled;
                            job.message = error.message.clone();
                            job.error = Some(error);
                        }
                        Err(error) => {
                            job.state = JobState::Failed;
                            job.message = error.message.clone();
                            job.error = Some(error);
                        }
                    }
                });
                let job = updates.borrow();
                if let Some(metrics) = metrics {
                    metrics.operation_finished(&job.kind, job.state.into(), started.elapsed());
                }
                match job.state {
                    JobState::Failed => warn!(error = %job.message, "job failed"),
                    state => info!(?state, "job finished"),
                }
            }
            .instrument(span),
        );
        job
    }

    /// Adds finished jobs from before a restart (interrupted ones, with their recovered
    /// outcome), so `job list` and `job show` report them.
    pub fn restore(&self, finished: Vec<Job>) {
        let mut jobs = self.jobs.lock().expect("lock poisoned");
        for job in finished.into_iter().filter(|j| j.state.is_finished()) {
            let id = job.id.clone();
            let (updates, _) = watch::channel(job);
            let cancel = CancellationToken::new();
            jobs.entry(id).or_insert(Entry { updates, cancel });
        }
        forget_oldest_finished(&mut jobs);
    }

    pub fn get(&self, id: &str) -> Option<Job> {
        let jobs = self.jobs.lock().expect("lock poisoned");
        jobs.get(id).map(|entry| entry.updates.borrow().clone())
    }

    /// Every remembered job, oldest first.
    pub fn list(&self) -> Vec<Job> {
        let jobs = self.jobs.lock().expect("lock poisoned");
        let mut all: Vec<Job> = jobs.values().map(|e| e.updates.borrow().clone()).collect();
        all.sort_by(|a, b| a.created.cmp(&b.created));
        all
    }

    /// Asks a job to stop; `None` if there is no such job.
    pub fn cancel(&self, id: &str) -> Option<Job> {
        let jobs = self.jobs.lock().expect("lock poisoned");
        let entry = jobs.get(id)?;
        if !entry.updates.borrow().state.is_finished() {
            entry.cancel.cancel();
            entry
                .updates
                .send_modify(|job| job.message = "cancelling".into());
        }
        Some(entry.updates.borrow().clone())
    }

    /// Follows a job's updates.
    pub fn subscribe(&self, id: &str) -> Option<watch::Receiver<Job>> {
        let jobs = self.jobs.lock().expect("lock poisoned");
        jobs.get(id).map(|entry| entry.updates.subscribe())
    }

    pub fn running(&self) -> usize {
        let jobs = self.jobs.lock().expect("lock poisoned");
        jobs.values()
            .filter(|e| !e.updates.borrow().state.is_finished())
            .count()
    }

    /// Cancels every running job and waits up to `grace` for them to finish their clean-up.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.root.cancel();
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }
}

fn forget_oldest_finished(jobs: &mut BTreeMap<String, Entry>) {
    let mut finished: Vec<(String, String)> = jobs
        .iter()
        .filter(|(_, e)| e.updates.borrow().state.is_finished())
        .map(|(id, e)| (e.updates.borrow().created.clone(), id.clone()))
        .collect();
    if finished.len() < FINISHED_KEPT {
        return;
    }
    finished.sort();
    for (_, id) in finished.iter().take(finished.len() + 1 - FINISHED_KEPT) {
        jobs.remove(id);
    }
}

pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn wait_finished(manager: &JobManager, id: &str) -> Job {
        let mut updates = manager.subscribe(id).unwrap();
        updates
            .wait_for(|job| job.state.is_finished())
            .await
            .unwrap()
            .clone()
    }

    #[tokio::test]
    async fn a_job_reports_progress_and_its_result() {
        let manager = JobManager::default();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let job = manager.start("demo", None, |ctx| async move {
            ctx.progress(40.0, "copying");
            let _ = wait.await;
            Ok(serde_json::json!({"answer": 42}))
        });
        assert_eq!(job.state, JobState::Running);
        tokio::task::yield_now().await;
        let mut updates = manager.subscribe(&job.id).unwrap();
        updates.wait_for(|j| j.progress == 40.0).await.unwrap();
        assert_eq!(manager.running(), 1);
        go.send(()).unwrap();
        let done = wait_finished(&manager, &job.id).await;
        assert_eq!(done.state, JobState::Succeeded);
        assert_eq!(done.progress, 100.0);
        assert_eq!(done.result.unwrap()["answer"], 42);
        assert_eq!(manager.running(), 0);
    }

    #[tokio::test]
    async fn cancel_reaches_the_job_and_is_reported_as_cancelled() {
        let manager = JobManager::default();
        let job = manager.start("demo", Some("v".into()), |ctx| async move {
            ctx.cancel.cancelled().await;
            Err(JobError {
                kind: "cancelled".into(),
                message: "cancelled by request".into(),
            })
        });
        manager.cancel(&job.id).unwrap();
        let done = wait_finished(&manager, &job.id).await;
        assert_eq!(done.state, JobState::Cancelled);
        assert!(manager.cancel("nope").is_none());
    }

    #[tokio::test]
    async fn shutdown_cancels_running_jobs_and_waits_for_them() {
        let manager = JobManager::default();
        let job = manager.start("demo", None, |ctx| async move {
            ctx.cancel.cancelled().await;
            Err(JobError {
                kind: "cancelled".into(),
                message: "stopped".into(),
            })
        });
        assert!(manager.shutdown(Duration::from_secs(5)).await);
        assert_eq!(manager.get(&job.id).unwrap().state, JobState::Cancelled);
    }
}
