//! Attaching a volume's VDI to this VM (local mode), as a block device under `device_dir`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};

use crate::service::mode::ModeReport;
use crate::xenapi::{NewVbd, Ref, Vbd, Vm, XenApiError};

use crate::journal::{Effect, Operation};

use super::sr::{Cleanup, SrHandle};
use super::{OPERATION, VolumeError, VolumeId, VolumeManager, operation_id, record};

/// How long a plugged disk may take to show up as a device node.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);
/// `VBD.unplug` is retried this often while the guest refuses (`DEVICE_DETACH_REJECTED`).
const UNPLUG_ATTEMPTS: u32 = 10;
/// `other_config` key on the VBDs the agent creates (the value is the operation's id), so
/// stale ones can be found after a crash.
pub const VBD_TAG: &str = "xenapinfs";

/// A volume attached to this VM.
#[derive(Debug)]
pub struct Attachment {
    sr: SrHandle,
    vbd: Ref<Vbd>,
    pub device: PathBuf,
    /// The attach operation stays open in the journal until the volume is detached.
    operation: Operation,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AttachInfo {
    pub id: VolumeId,
    pub device: String,
}

pub(super) fn local_vm(
    mode: Option<&ModeReport>,
    operation: &'static str,
) -> Result<Ref<Vm>, VolumeError> {
    match mode {
        None => Err(VolumeError::NotReady(
            "the operating mode is not decided yet".into(),
        )),
        Some(report) => report.vm.clone().ok_or_else(|| VolumeError::WrongMode {
            operation,
            mode: report.mode.to_string(),
            reason: report.reason.clone(),
        }),
    }
}

impl VolumeManager {
    /// Plugs the volume into this VM read-write and returns the device path.
    pub async fn attach(
        &self,
        id: VolumeId,
        mode: Option<&ModeReport>,
    ) -> Result<AttachInfo, VolumeError> {
        let vm = local_vm(mode, "attach")?;
        let op = self.begin("attach", Some(id), None)?;
        let attached = OPERATION
            .scope(op.clone(), self.attach_volume(id, vm, op.clone()))
            .await;
        if attached.is_err() {
            self.end(&op);
        }
        attached
    }

    async fn attach_volume(
        &self,
        id: VolumeId,
        vm: Ref<Vm>,
        operation: Operation,
    ) -> Result<AttachInfo, VolumeError> {
        let _lock = self.locks.lock(id.sr).await;
        if let Some(existing) = self.attached.lock().expect("lock poisoned").get(&id) {
            return Err(VolumeError::Conflict(format!(
                "volume {id} is already attached at {}",
                existing.device.display()
            )));
        }
        self.share.volume(id)?;
        let (handle, vdi) = self.open(id).await?;
        match self.plug_vdi(&vm, &vdi).await {
            Ok((vbd, device)) => {
                info!(volume = %id, device = %device.display(), "volume attached");
                self.attached.lock().expect("lock poisoned").insert(
                    id,
                    Attachment {
                        sr: handle,
                        vbd,
                        device: device.clone(),
                        operation,
                    },
                );
                Ok(AttachInfo {
                    id,
                    device: device.display().to_string(),
                })
            }
            Err(e) => {
                let mut cleanup = Cleanup::default();
                handle.release(&self.xenapi, &mut cleanup).await;
                Err(e.with_cleanup(cleanup.failures))
            }
        }
    }

    /// Creates a VBD of `vdi` on this VM (tagged with the operation's id), plugs it read-write
    /// and waits for its device node. On failure the VBD is gone again.
    pub(super) async fn plug_vdi(
        &self,
        vm: &Ref<Vm>,
        vdi: &Ref<crate::xenapi::Vdi>,
    ) -> Result<(Ref<Vbd>, PathBuf), VolumeError> {
        record(Effect::Vbd {
            vdi: vdi.to_string(),
        })?;
        let other_config = [(VBD_TAG.to_string(), operation_id())]
            .into_iter()
            .collect();
        let vbd = self
            .xenapi
            .vbd_create(&NewVbd {
                vm,
                vdi,
                userdevice: "autodetect",
                read_only: false,
                other_config: &other_config,
            })
            .await
            .map_err(VolumeError::xenapi("creating a VBD on this VM"))?;
        match self.plug(&vbd).await {
            Ok(device) => Ok((vbd, device)),
            Err(e) => {
                let mut cleanup = Cleanup::default();
                self.remove_vbd(&vbd, &mut cleanup).await;
                Err(e.with_cleanup(cleanup.failures))
            }
        }
    }

    /// Flushes the device, then unplugs and destroys the VBD.
    pub(super) async fn unplug_vdi(
        &self,
        vbd: &Ref<Vbd>,
        device: &Path,
    ) -> Result<(), VolumeError> {
        if let Err(e) = flush(device) {
            warn!(device = %device.display(), error = %e, "flushing the device before unplug failed");
        }
        let mut cleanup = Cleanup::default();
        self.remove_vbd(vbd, &mut cleanup).await;
        match cleanup.failures.is_empty() {
            true => Ok(()),
            false => Err(VolumeError::Conflict(format!(
                "the disk at {} could not be detached: {}",
                device.display(),
                cleanup.failures.join("; ")
            ))),
        }
    }

    async fn plug(&self, vbd: &Ref<Vbd>) -> Result<PathBuf, VolumeError> {
        {
            let _gate = self.vbd_gate.lock().await;
            self.xenapi
                .vbd_plug(vbd)
                .await
                .map_err(VolumeError::xenapi("plugging the VBD"))?;
        }
        let name = self
            .xenapi
            .vbd_get_device(vbd)
            .await
            .map_err(VolumeError::xenapi("reading the VBD's device"))?;
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(VolumeError::Invalid(format!(
                "xapi reported device name {name:?}"
            )));
        }
        let device = self.device_dir.join(&name);
        wait_for_device(&device).await?;
        Ok(device)
    }

    /// Flushes and unplugs the volume from this VM, and releases its SR.
    pub async fn detach(&self, id: VolumeId) -> Result<(), VolumeError> {
        let _lock = self.locks.lock(id.sr).await;
        let attachment = self
            .attached
            .lock()
            .expect("lock poisoned")
            .remove(&id)
            .ok_or_else(|| {
                VolumeError::Conflict(format!("volume {id} is not attached to this VM"))
            })?;
        let unplugged = OPERATION
            .scope(
                attachment.operation.clone(),
                self.unplug_vdi(&attachment.vbd, &attachment.device),
            )
            .await;
        if let Err(error) = unplugged {
            // Still plugged: keep it recorded so a later detach can try again.
            self.attached
                .lock()
                .expect("lock poisoned")
                .insert(id, attachment);
            return Err(error);
        }
        let mut cleanup = Cleanup::default();
        attachment.sr.release(&self.xenapi, &mut cleanup).await;
        self.end(&attachment.operation);
        info!(volume = %id, "volume detached");
        Ok(())
    }

    /// Detaches everything this agent attached (at shutdown).
    pub async fn detach_all(&self) {
        let ids: Vec<VolumeId> = self
            .attached
            .lock()
            .expect("lock poisoned")
            .keys()
            .copied()
            .collect();
        for id in ids {
            if let Err(e) = self.detach(id).await {
                warn!(volume = %id, error = %e, "could not detach at shutdown");
            }
        }
    }

    /// Volumes attached to this VM now.
    pub fn attachments(&self) -> Vec<AttachInfo> {
        let attached = self.attached.lock().expect("lock poisoned");
        let mut all: Vec<AttachInfo> = attached
            .iter()
            .map(|(id, a)| AttachInfo {
                id: *id,
                device: a.device.display().to_string(),
            })
            .collect();
        all.sort_by_key(|a| a.id);
        all
    }

    /// Unplugs (retrying while the guest refuses) and destroys a VBD.
    pub(super) async fn remove_vbd(&self, vbd: &Ref<Vbd>, cleanup: &mut Cleanup) {
        let mut attempt = 0;
        let unplugged = loop {
            attempt += 1;
            let result = {
                let _gate = self.vbd_gate.lock().await;
                self.xenapi.vbd_unplug(vbd).await
            };
            match result {
                Ok(()) => break Ok(()),
                Err(e) if e.is("DEVICE_ALREADY_DETACHED") => break Ok(()),
                Err(e) if retryable_unplug(&e) && attempt < UNPLUG_ATTEMPTS => {
                    warn!(vbd = %vbd, attempt, error = %e, "VBD.unplug refused; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => break Err(e),
            }
        };
        if unplugged.is_err() {
            cleanup.note("VBD.unplug", unplugged);
            return;
        }
        cleanup.note("VBD.destroy", self.xenapi.vbd_destroy(vbd).await);
    }
}

fn retryable_unplug(error: &XenApiError) -> bool {
    error.is("DEVICE_DETACH_REJECTED") || error.is("INTERNAL_ERROR")
}

async fn wait_for_device(device: &Path) -> Result<(), VolumeError> {
    let started = Instant::now();
    while !device.exists() {
        if started.elapsed() > DEVICE_TIMEOUT {
            return Err(VolumeError::Conflict(format!(
                "the plugged disk did not appear as {} within {} s",
                device.display(),
                DEVICE_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Makes sure everything written to the device has reached it before it goes away.
fn flush(device: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(device)?
        .sync_all()
}
