//! At start: finishing or undoing the operations a crash interrupted, from the journal.
//!
//! Everything here is idempotent, because recovery itself may be interrupted: an operation's
//! record goes only together with its outcome, in one transaction, after its clean-up ran.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::jobs::{Job, JobError, JobState};
use crate::journal::{Effect, OPERATION_KEY, OpenOperation};
use crate::vhd;
use crate::xenapi::{Pbd, PbdRecord, Ref, Sr, SrRecord, Task, TaskWait, VbdRecord, Vm};

use super::attach::VBD_TAG;
use super::images::STAGING_PREFIX;
use super::sr::Cleanup;
use super::{VolumeError, VolumeId, VolumeManager};

/// How long an interrupted `Async.` task may take to notice its cancellation.
const TASK_CANCEL_WAIT: Duration = Duration::from_secs(30);

impl VolumeManager {
    /// Finishes or undoes every operation the journal holds as open (all of them were
    /// interrupted: this runs once, before any new operation), removes VBDs on this VM that
    /// carry the agent's tag, and returns the interrupted jobs with their outcomes (those of
    /// earlier starts included). New operations are accepted only after this.
    pub async fn recover(&self, vm: Option<&Ref<Vm>>) -> Result<Vec<Job>, VolumeError> {
        let journal_error = |e: crate::journal::JournalError| VolumeError::Journal(e.to_string());
        let interrupted = self.journal.open_operations().map_err(journal_error)?;
        if let Some(vm) = vm {
            self.remove_tagged_vbds(vm).await?;
        }
        for op in &interrupted {
            let (outcome, clean) = self.recover_operation(op, vm).await;
            let job = op.job.then(|| outcome.clone());
            match (clean, &job) {
                (true, _) => self.journal.close_recovered(&op.id, job.as_ref()),
                (false, Some(job)) => self.journal.record_outcome(job),
                (false, None) => Ok(()),
            }
            .map_err(journal_error)?;
            info!(operation = %op.id, kind = %op.kind, outcome = %outcome.message, "interrupted operation recovered");
        }
        self.recovered.store(true, Ordering::Release);
        self.journal.recovered_jobs().map_err(journal_error)
    }

    /// Whether some operation ended with part of its clean-up undone.
    pub fn has_abandoned(&self) -> bool {
        let active = self.active.lock().expect("lock poisoned").clone();
        self.journal
            .open_operations()
            .is_ok_and(|ops| ops.iter().any(|op| !active.contains(&op.id)))
    }

    /// Retries the clean-up of operations that ended with part of it undone (xapi was
    /// unreachable, say); each goes from the journal once its clean-up has succeeded.
    pub async fn recover_abandoned(&self, vm: Option<&Ref<Vm>>) {
        let Ok(open) = self.journal.open_operations() else {
            return;
        };
        for op in open {
            if self.active.lock().expect("lock poisoned").contains(&op.id) {
                continue;
            }
            // New operations on the same volume wait, so the retry never undoes their work.
            let volume = op
                .volume
                .as_deref()
                .and_then(|v| v.parse::<VolumeId>().ok());
            let _lock = match volume {
                Some(id) => Some(self.locks.lock(id.sr).await),
                None => None,
            };
            let (outcome, clean) = self.recover_operation(&op, vm).await;
            if clean {
                if let Err(e) = self.journal.close_recovered(&op.id, None) {
                    warn!(operation = %op.id, error = %e, "could not close a cleaned-up operation");
                }
                info!(operation = %op.id, kind = %op.kind, "clean-up of an earlier operation completed");
            } else {
                warn!(operation = %op.id, outcome = %outcome.message, "clean-up of an earlier operation still incomplete");
            }
        }
    }

    /// Nothing is attached when the agent starts, so every VBD of ours on this VM is stale.
    async fn remove_tagged_vbds(&self, vm: &Ref<Vm>) -> Result<(), VolumeError> {
        let mut cleanup = Cleanup::default();
        self.remove_vbds_where(vm, |_| true, &mut cleanup).await?;
        if !cleanup.failures.is_empty() {
            warn!(failures = ?cleanup.failures, "stale VBDs of this agent could not all be removed");
        }
        Ok(())
    }

    async fn remove_vbds_of(&self, vm: &Ref<Vm>, operation: &str, cleanup: &mut Cleanup) {
        if let Err(e) = self
            .remove_vbds_where(vm, |tag| tag == operation, cleanup)
            .await
        {
            cleanup.note("finding the operation's VBDs", Err::<(), _>(e));
        }
    }

    /// Removes the VBDs on this VM whose agent tag satisfies `wanted`.
    async fn remove_vbds_where(
        &self,
        vm: &Ref<Vm>,
        wanted: impl Fn(&str) -> bool,
        cleanup: &mut Cleanup,
    ) -> Result<(), VolumeError> {
        let record: crate::xenapi::VmRecord = self
            .xenapi
            .get_record(vm)
            .await
            .map_err(VolumeError::xenapi("reading this VM's disks"))?;
        for vbd in record.vbds {
            let vbd_record: VbdRecord = match self.xenapi.get_record(&vbd).await {
                Ok(r) => r,
                Err(e) if e.is("HANDLE_INVALID") => continue,
                Err(e) => return Err(VolumeError::xenapi("reading a VBD of this VM")(e)),
            };
            let Some(operation) = vbd_record.other_config.get(VBD_TAG) else {
                continue;
            };
            if !wanted(operation) {
                continue;
            }
            let failures = cleanup.failures.len();
            self.remove_vbd(&vbd, cleanup).await;
            if cleanup.failures.len() == failures {
                info!(vbd = %vbd, operation, "removed a VBD left by an earlier operation");
            }
        }
        Ok(())
    }

    /// Undoes an operation's effects, newest first, or finishes it if its result was in place.
    /// Also says whether every clean-up step succeeded.
    async fn recover_operation(&self, op: &OpenOperation, vm: Option<&Ref<Vm>>) -> (Job, bool) {
        let committed = op.committed() || self.swapped_in(op);
        let mut cleanup = Cleanup::default();
        let mut finished_delete = false;
        for effect in op.effects.iter().rev() {
            match effect {
                Effect::Task { task } => self.cancel_task(&Ref::new(task)).await,
                Effect::Vbd { .. } => {
                    if let Some(vm) = vm {
                        self.remove_vbds_of(vm, &op.id, &mut cleanup).await;
                    }
                }
                Effect::Committed { .. } | Effect::Swapping { .. } => {}
                Effect::Staging { dir } => self.remove_staging(dir, &mut cleanup),
                Effect::SrCreating => match self.srs_created_by(&op.id).await {
                    Ok(srs) => {
                        for (sr, uuid) in srs {
                            self.release_sr(&sr, uuid, &mut cleanup).await;
                            if !committed {
                                self.remove_sr_dir(uuid, &mut cleanup);
                            }
                        }
                    }
                    Err(e) => cleanup.note("finding the SR being created", Err::<(), _>(e)),
                },
                Effect::SrCreated { sr } => {
                    self.release_sr_by_uuid(*sr, &mut cleanup).await;
                    if !committed {
                        self.remove_sr_dir(*sr, &mut cleanup);
                    }
                }
                Effect::SrIntroduced { sr } => self.release_sr_by_uuid(*sr, &mut cleanup).await,
                Effect::PbdPlugged { pbd, .. } => {
                    self.unplug_pbd(&Ref::new(pbd), &mut cleanup).await
                }
                Effect::PbdCreated { pbd, .. } => {
                    let pbd = Ref::<Pbd>::new(pbd);
                    self.unplug_pbd(&pbd, &mut cleanup).await;
                    match self.xenapi.pbd_destroy(&pbd).await {
                        Err(e) if e.is("HANDLE_INVALID") => {}
                        result => cleanup.note("PBD.destroy", result),
                    }
                }
                Effect::Replacing { sr, vdi } => {
                    self.keep_only_chain(VolumeId { sr: *sr, vdi: *vdi }, &mut cleanup)
                }
                Effect::Deleting { sr, vdi } => {
                    let id = VolumeId { sr: *sr, vdi: *vdi };
                    if !self.share.vhd_path(id).exists() {
                        self.remove_sr_dir(*sr, &mut cleanup);
                        finished_delete = true;
                    }
                }
            }
        }
        let state = if committed || finished_delete {
            JobState::Succeeded
        } else {
            JobState::Failed
        };
        let mut message = match state {
            JobState::Succeeded => {
                "interrupted by a stop of the agent after its result was in place; finished at start-up"
                    .to_string()
            }
            _ => "interrupted by a stop of the agent; rolled back at start-up, nothing was changed"
                .to_string(),
        };
        if !cleanup.failures.is_empty() {
            message.push_str(&format!(
                "; clean-up incomplete: {}",
                cleanup.failures.join("; ")
            ));
        }
        let clean = cleanup.failures.is_empty();
        let result = op.effects.iter().find_map(|e| match e {
            Effect::Committed { volume: Some(v) } => Some(serde_json::json!({ "id": v })),
            Effect::Swapping { sr, vdi, .. } if committed => {
                Some(serde_json::json!({ "id": VolumeId { sr: *sr, vdi: *vdi }.to_string() }))
            }
            _ => None,
        });
        let job = Job {
            id: op.id.clone(),
            kind: op.kind.clone(),
            volume: op.volume.clone(),
            state,
            progress: if state == JobState::Succeeded {
                100.0
            } else {
                0.0
            },
            message: message.clone(),
            result,
            error: (state == JobState::Failed).then(|| JobError {
                kind: "interrupted".into(),
                message,
            }),
            created: op.started.clone(),
            finished: Some(crate::jobs::now()),
        };
        (job, clean)
    }

    /// Whether an import's new leaf was renamed into place (the crash came before the journal
    /// heard of it): the volume's VHD is the very file that was staged.
    fn swapped_in(&self, op: &OpenOperation) -> bool {
        op.effects.iter().any(|e| match e {
            Effect::Swapping { sr, vdi, inode } => {
                let path = self.share.vhd_path(VolumeId { sr: *sr, vdi: *vdi });
                std::fs::metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == *inode)
            }
            _ => false,
        })
    }

    async fn cancel_task(&self, task: &Ref<Task>) {
        match self.xenapi.task_cancel(task).await {
            Ok(()) => {}
            Err(e) if e.is("HANDLE_INVALID") => return,
            // A finished task cannot be cancelled; waiting below sees that at once.
            Err(e) if e.is("OPERATION_NOT_ALLOWED") => {}
            Err(e) => warn!(task = %task, error = %e, "task.cancel of an interrupted task failed"),
        }
        let never = CancellationToken::new();
        let _ = self
            .xenapi
            .wait_task(
                task,
                TaskWait {
                    poll_interval: Duration::from_millis(200),
                    timeout: Some(TASK_CANCEL_WAIT),
                    stall_timeout: None,
                    cancel: &never,
                    on_progress: &mut |_| {},
                },
            )
            .await;
        let _ = self.xenapi.task_destroy(task).await;
    }

    /// SRs whose `sm_config` names `operation` (made by an `SR.create` whose answer was lost).
    async fn srs_created_by(
        &self,
        operation: &str,
    ) -> Result<Vec<(Ref<Sr>, Uuid)>, crate::xenapi::XenApiError> {
        let records = self.xenapi.get_all_records::<Sr>().await?;
        Ok(records
            .into_iter()
            .filter(|(_, r): &(Ref<Sr>, SrRecord)| {
                r.sm_config.get(OPERATION_KEY).map(String::as_str) == Some(operation)
            })
            .filter_map(|(sr, r)| Some((sr, Uuid::parse_str(&r.uuid).ok()?)))
            .collect())
    }

    async fn release_sr_by_uuid(&self, uuid: Uuid, cleanup: &mut Cleanup) {
        match self.xenapi.get_by_uuid::<Sr>(&uuid.to_string()).await {
            Ok(sr) => self.release_sr(&sr, uuid, cleanup).await,
            Err(e) if e.is("UUID_INVALID") => {}
            Err(e) => cleanup.note(&format!("finding SR {uuid}"), Err::<(), _>(e)),
        }
    }

    /// Unplugs the SR's PBDs and forgets it: xapi is as if the operation never borrowed it.
    async fn release_sr(&self, sr: &Ref<Sr>, uuid: Uuid, cleanup: &mut Cleanup) {
        let record: SrRecord = match self.xenapi.get_record(sr).await {
            Ok(record) => record,
            Err(e) if e.is("HANDLE_INVALID") => return,
            Err(e) => return cleanup.note(&format!("reading SR {uuid}"), Err::<(), _>(e)),
        };
        for pbd in &record.pbds {
            self.unplug_pbd(pbd, cleanup).await;
        }
        match self.xenapi.sr_forget(sr).await {
            Err(e) if e.is("HANDLE_INVALID") => {}
            result => cleanup.note(&format!("SR.forget of SR {uuid}"), result),
        }
    }

    async fn unplug_pbd(&self, pbd: &Ref<Pbd>, cleanup: &mut Cleanup) {
        match self.xenapi.get_record::<Pbd>(pbd).await {
            Ok(PbdRecord {
                currently_attached: true,
                ..
            }) => cleanup.note("PBD.unplug", self.xenapi.pbd_unplug(pbd).await),
            Ok(_) => {}
            Err(e) if e.is("HANDLE_INVALID") => {}
            Err(e) => cleanup.note("reading a PBD", Err::<(), _>(e)),
        }
    }

    /// Removes a half-made volume's directory from the share (xapi no longer knows the SR).
    fn remove_sr_dir(&self, sr: Uuid, cleanup: &mut Cleanup) {
        let dir = self.share.sr_dir(sr);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                cleanup.note(&format!("removing {}", dir.display()), Err::<(), _>(e))
            }
            _ => {}
        }
    }

    /// Removes a staging directory, but only one that is where and what staging directories are
    /// (the journal is trusted, but a path from it never reaches `remove_dir_all` unchecked).
    fn remove_staging(&self, dir: &Path, cleanup: &mut Cleanup) {
        let base = self.share.base();
        let named = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(STAGING_PREFIX) && !n.contains('/'));
        let placed = dir
            .parent()
            .is_some_and(|p| p == base || p.parent() == Some(base));
        if !(named && placed) {
            return cleanup.note(
                "removing staging",
                Err::<(), _>(format!(
                    "{} is not a staging directory on the share",
                    dir.display()
                )),
            );
        }
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                cleanup.note(&format!("removing {}", dir.display()), Err::<(), _>(e))
            }
            _ => {}
        }
    }

    /// After an interrupted import: the SR directory keeps the volume's chain (old content, or
    /// new content if it was already moved in) and its metadata, nothing else.
    fn keep_only_chain(&self, id: VolumeId, cleanup: &mut Cleanup) {
        let leaf = self.share.vhd_path(id);
        let chain: HashSet<std::ffi::OsString> = match vhd::Chain::open(&leaf) {
            Ok(chain) => chain
                .files()
                .iter()
                .filter_map(|(path, _)| path.file_name().map(|n| n.to_os_string()))
                .collect(),
            Err(e) => {
                return cleanup.note(
                    &format!("reading the chain of volume {id}"),
                    Err::<(), _>(e),
                );
            }
        };
        let dir = self.share.sr_dir(id.sr);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => return cleanup.note(&format!("listing {}", dir.display()), Err::<(), _>(e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let is_vhd = Path::new(&name).extension().is_some_and(|e| e == "vhd");
            if is_vhd && !chain.contains(&name) {
                cleanup.note(
                    &format!("removing {}", entry.path().display()),
                    std::fs::remove_file(entry.path()),
                );
            }
        }
    }
}
