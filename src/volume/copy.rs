//! Snapshots, clones and volumes from snapshots: deep copies into a new SR with `Async.VDI.copy`.

use std::time::Duration;

use tracing::info;

use crate::jobs::JobContext;
use crate::xenapi::{Ref, TaskWait, Vdi, XenApiError};

use crate::journal::Effect;

use super::{Volume, VolumeError, VolumeId, VolumeManager, check_label, check_size, record};

/// Which copy a job makes; only the names differ, and `FromSnapshot` may grow the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    Snapshot,
    Clone,
    FromSnapshot,
}

impl CopyKind {
    pub fn job_name(self) -> &'static str {
        match self {
            CopyKind::Snapshot => "snapshot",
            CopyKind::Clone => "clone",
            CopyKind::FromSnapshot => "from-snapshot",
        }
    }
}

/// Share of the progress bar the copy itself takes; the rest is the set-up and finishing calls.
const COPY_SHARE: f64 = 90.0;

impl VolumeManager {
    /// Checks a copy request before a job is started for it, so bad requests fail at once.
    pub fn check_copy(
        &self,
        source: VolumeId,
        size_gb: Option<u64>,
        name: Option<&str>,
    ) -> Result<Volume, VolumeError> {
        if let Some(name) = name {
            check_label("name", name)?;
        }
        let volume = self.share.volume(source)?;
        if let Some(problem) = &volume.problem {
            return Err(VolumeError::Conflict(format!(
                "volume {source} cannot be read: {problem}"
            )));
        }
        if let Some(size_gb) = size_gb
            && check_size(size_gb)? < volume.size_bytes
        {
            return Err(VolumeError::Invalid(format!(
                "the new volume would be {size_gb} GiB, smaller than the {:.2} GiB it is copied from",
                volume.size_gb
            )));
        }
        Ok(volume)
    }

    /// Copies `source` into a new volume (new SR), optionally grown to `size_gb`.
    pub async fn copy(
        &self,
        kind: CopyKind,
        source: VolumeId,
        size_gb: Option<u64>,
        name: Option<String>,
        ctx: &JobContext,
    ) -> Result<Volume, VolumeError> {
        let work = self.copy_volume(kind, source, size_gb, name, ctx);
        self.journaled(kind.job_name(), Some(source), Some(ctx), work)
            .await
    }

    async fn copy_volume(
        &self,
        kind: CopyKind,
        source: VolumeId,
        size_gb: Option<u64>,
        name: Option<String>,
        ctx: &JobContext,
    ) -> Result<Volume, VolumeError> {
        let _lock = self.locks.lock(source.sr).await;
        let origin = self.check_copy(source, size_gb, name.as_deref())?;
        if let Some(attached) = self.attached.lock().expect("lock poisoned").get(&source) {
            return Err(VolumeError::Conflict(format!(
                "volume {source} is attached to this VM at {}; XenServer cannot copy a disk attached read-write, detach it first",
                attached.device.display()
            )));
        }
        let name = name.unwrap_or(origin.name.clone());
        let description = origin.description.clone();
        ctx.progress(1.0, format!("attaching {source}"));
        let (source_sr, source_vdi) = self.open(source).await?;
        let target = match self.new_sr(&name, &description).await {
            Ok(target) => target,
            Err(e) => {
                self.close(source_sr).await;
                return Err(e);
            }
        };
        ctx.progress(5.0, "copying");
        let copied = async {
            let copy = self.copy_vdi(&source_vdi, &target.sr, ctx).await?;
            if let Some(size_gb) = size_gb
                && size_gb * super::GIB > origin.size_bytes
            {
                ctx.progress(COPY_SHARE + 5.0, format!("growing to {size_gb} GiB"));
                self.xenapi
                    .vdi_resize(&copy, size_gb * super::GIB)
                    .await
                    .map_err(VolumeError::xenapi("growing the copy"))?;
            }
            let id = self
                .finish_new_volume(&target, &copy, &name, &description)
                .await?;
            record(Effect::Committed {
                volume: Some(id.to_string()),
            })?;
            Ok(id)
        }
        .await;
        self.close(source_sr).await;
        match copied {
            Ok(id) => {
                self.close(target).await;
                info!(source = %source, volume = %id, kind = kind.job_name(), "copy finished");
                self.share.volume(id)
            }
            Err(e) => Err(self.discard_sr(target, e).await),
        }
    }

    async fn copy_vdi(
        &self,
        source: &Ref<Vdi>,
        into: &Ref<crate::xenapi::Sr>,
        ctx: &JobContext,
    ) -> Result<Ref<Vdi>, VolumeError> {
        let task = self
            .xenapi
            .vdi_copy_async(source, into)
            .await
            .map_err(VolumeError::xenapi("starting Async.VDI.copy"))?;
        record(Effect::Task {
            task: task.to_string(),
        })?;
        let progress_ctx = ctx.clone();
        let mut on_progress = move |p: f64| progress_ctx.progress(5.0 + p * COPY_SHARE, "copying");
        let result = self
            .xenapi
            .wait_task(
                &task,
                TaskWait {
                    poll_interval: Duration::from_millis(500),
                    timeout: None,
                    stall_timeout: Some(self.task_stall_timeout),
                    cancel: &ctx.cancel,
                    on_progress: &mut on_progress,
                },
            )
            .await;
        match result {
            Ok(value) => match value.as_str() {
                Some(handle) if handle.starts_with("OpaqueRef:") => Ok(Ref::new(handle)),
                _ => Err(VolumeError::xenapi("Async.VDI.copy")(
                    XenApiError::Protocol {
                        method: "Async.VDI.copy".into(),
                        reason: format!("task result {value:?} is not a VDI reference"),
                    },
                )),
            },
            Err(XenApiError::TaskCancelled { .. }) => Err(VolumeError::Cancelled),
            Err(e) if e.is("VDI_IN_USE") => Err(VolumeError::Conflict(format!(
                "the volume is attached read-write to a VM, and XenServer cannot copy it then ({e})"
            ))),
            Err(e) => Err(VolumeError::xenapi("copying the VDI")(e)),
        }
    }
}
