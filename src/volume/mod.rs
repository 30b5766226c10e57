//! Volume operations: the old Cinder driver's, with its bugs fixed, and more.
//!
//! Every operation is a short XenAPI sequence over one reused session; every side effect is
//! undone on every failure path (see [`sr`]); one operation at a time per volume ([`locks`]).

mod attach;
mod copy;
mod error;
pub mod id;
pub mod images;
mod locks;
mod recovery;
pub mod share;
mod sr;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tracing::{info, warn};

use crate::config::Settings;
use crate::jobs::JobContext;
use crate::journal::{Effect, Journal, Operation};
use crate::xenapi::{Host, NewVdi, Ref, SrRecord, Vdi, VdiRecord, XenApiClient};

pub use attach::{AttachInfo, Attachment};
pub use copy::CopyKind;
pub use error::VolumeError;
pub use id::VolumeId;
pub use images::ImageSource;
pub use share::{Metadata, Share, Volume};
use sr::{Cleanup, SrHandle};

const GIB: u64 = 1 << 30;
/// XenServer's largest VHD.
pub const MAX_SIZE_GB: u64 = 2040;

/// The xensm connection info, key for key as the old driver returned it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConnectionInfo {
    pub driver_volume_type: String,
    pub data: ConnectionData,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConnectionData {
    pub name_label: String,
    pub name_description: String,
    pub sr_uuid: String,
    pub vdi_uuid: String,
    pub sr_type: String,
    pub server: String,
    pub serverpath: String,
    pub introduce_sr_keys: Vec<String>,
}

/// Capacity as Cinder's scheduler wants it, with real numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    pub volume_backend_name: String,
    pub vendor_name: String,
    pub driver_version: String,
    pub storage_protocol: String,
    pub total_capacity_gb: f64,
    pub free_capacity_gb: f64,
    pub provisioned_capacity_gb: f64,
    pub allocated_capacity_gb: f64,
    pub reserved_percentage: u32,
    pub volumes: usize,
}

/// Checks a name or description given by a caller.
fn check_label(what: &str, text: &str) -> Result<(), VolumeError> {
    if text.len() > 255 {
        return Err(VolumeError::Invalid(format!(
            "{what} is longer than 255 bytes"
        )));
    }
    if text.chars().any(char::is_control) {
        return Err(VolumeError::Invalid(format!(
            "{what} contains control characters"
        )));
    }
    Ok(())
}

fn check_size(size_gb: u64) -> Result<u64, VolumeError> {
    if size_gb == 0 || size_gb > MAX_SIZE_GB {
        return Err(VolumeError::Invalid(format!(
            "size {size_gb} GiB is outside 1..={MAX_SIZE_GB} GiB"
        )));
    }
    Ok(size_gb * GIB)
}

tokio::task_local! {
    /// The journal record of the operation this task runs; side effects are recorded in it.
    static OPERATION: Operation;
}

/// Records in the journal a side effect the current operation is about to cause.
fn record(effect: Effect) -> Result<(), VolumeError> {
    OPERATION
        .try_with(|op| op.record(effect))
        .map_err(|_| VolumeError::Journal("a side effect outside any operation".into()))?
        .map_err(|e| VolumeError::Journal(e.to_string()))
}

/// A clean-up step of the current operation failed: its journal record stays, and the
/// clean-up is retried (see [`VolumeManager::recover_abandoned`]).
fn mark_unclean() {
    let _ = OPERATION.try_with(Operation::mark_unclean);
}

/// The current operation's id (VBDs are tagged with it).
fn operation_id() -> String {
    OPERATION
        .try_with(|op| op.id().to_string())
        .unwrap_or_default()
}

/// Volume operations over XenAPI and the share.
#[derive(Debug)]
pub struct VolumeManager {
    xenapi: Arc<XenApiClient>,
    journal: Arc<Journal>,
    /// Set once operations interrupted by a crash have been finished or undone.
    recovered: AtomicBool,
    /// Ids of the operations running now (the journal's other open records are abandoned).
    active: Mutex<std::collections::HashSet<String>>,
    /// Fires when an operation ended with part of its clean-up undone.
    pub cleanup_pending: tokio::sync::Notify,
    share: Share,
    nfs_server: String,
    nfs_serverpath: String,
    device_dir: PathBuf,
    qemu_img: PathBuf,
    task_stall_timeout: std::time::Duration,
    locks: locks::LockTable,
    host: OnceCell<Ref<Host>>,
    /// VBD plug/unplug on our VM, one at a time (xapi has had races there).
    vbd_gate: tokio::sync::Mutex<()>,
    attached: Mutex<HashMap<VolumeId, Attachment>>,
}

impl VolumeManager {
    pub fn new(settings: &Settings, xenapi: Arc<XenApiClient>, journal: Arc<Journal>) -> Self {
        VolumeManager {
            xenapi,
            journal,
            recovered: AtomicBool::new(false),
            active: Mutex::new(Default::default()),
            cleanup_pending: tokio::sync::Notify::new(),
            share: Share::new(&settings.sr_base_path),
            nfs_server: settings.nfs_server.clone(),
            nfs_serverpath: settings.nfs_serverpath.clone(),
            device_dir: settings.device_dir.clone(),
            qemu_img: settings.qemu_img.clone(),
            task_stall_timeout: settings.task_stall_timeout,
            locks: locks::LockTable::default(),
            host: OnceCell::new(),
            vbd_gate: tokio::sync::Mutex::new(()),
            attached: Mutex::new(HashMap::new()),
        }
    }

    pub fn share(&self) -> &Share {
        &self.share
    }

    /// Runs `work` as one journaled operation (a job's operation takes the job's id): its side
    /// effects are recorded before they happen, and the record goes when it ends. A crash in
    /// between leaves the record for [`VolumeManager::recover`].
    async fn journaled<T>(
        &self,
        kind: &str,
        volume: Option<VolumeId>,
        job: Option<&JobContext>,
        work: impl Future<Output = Result<T, VolumeError>>,
    ) -> Result<T, VolumeError> {
        let op = self.begin(kind, volume, job)?;
        let result = OPERATION.scope(op.clone(), work).await;
        self.end(&op);
        result
    }

    /// Whether [`VolumeManager::recover`] has run.
    pub fn is_recovered(&self) -> bool {
        self.recovered.load(Ordering::Acquire)
    }

    fn begin(
        &self,
        kind: &str,
        volume: Option<VolumeId>,
        job: Option<&JobContext>,
    ) -> Result<Operation, VolumeError> {
        if !self.is_recovered() {
            return Err(VolumeError::NotReady(
                "operations interrupted by the last stop are still being recovered".into(),
            ));
        }
        let id = job.map_or_else(|| uuid::Uuid::new_v4().to_string(), |ctx| ctx.id());
        // Active before it is in the journal, so it is never taken for an abandoned one.
        self.active
            .lock()
            .expect("lock poisoned")
            .insert(id.clone());
        self.journal
            .begin(&id, kind, volume.map(|v| v.to_string()), job.is_some())
            .map_err(|e| {
                self.active.lock().expect("lock poisoned").remove(&id);
                VolumeError::Journal(e.to_string())
            })
    }

    /// The operation is over. If part of its clean-up failed (xapi unreachable, say), its
    /// record stays in the journal and the clean-up is retried until it succeeds.
    fn end(&self, op: &Operation) {
        let unclean = op.is_unclean();
        if unclean {
            warn!(
                operation = op.id(),
                "clean-up incomplete; it will be retried"
            );
        } else if let Err(e) = op.finish() {
            warn!(operation = op.id(), error = %e, "could not close the operation in the journal; it will be recovered later");
        }
        self.active.lock().expect("lock poisoned").remove(op.id());
        if unclean {
            self.cleanup_pending.notify_one();
        }
    }

    fn device_config(&self) -> BTreeMap<String, String> {
        sr::device_config(&self.nfs_server, &self.nfs_serverpath)
    }

    /// The host SRs are plugged on: the one this session is connected to (the controller).
    async fn host(&self) -> Result<Ref<Host>, VolumeError> {
        self.host
            .get_or_try_init(|| self.xenapi.session_this_host())
            .await
            .cloned()
            .map_err(VolumeError::xenapi("finding the XenServer host"))
    }

    /// Introduces (or reuses) a volume's SR and finds its VDI.
    async fn open(&self, id: VolumeId) -> Result<(SrHandle, Ref<Vdi>), VolumeError> {
        let host = self.host().await?;
        let metadata = self.share.metadata(id.sr).unwrap_or_default();
        let handle = SrHandle::attach(
            &self.xenapi,
            &host,
            id.sr,
            &self.device_config(),
            &metadata.name,
            &metadata.description,
        )
        .await?;
        match self.xenapi.get_by_uuid::<Vdi>(&id.vdi.to_string()).await {
            Ok(vdi) => Ok((handle, vdi)),
            Err(e) => {
                let mut cleanup = Cleanup::default();
                handle.release(&self.xenapi, &mut cleanup).await;
                let error = if e.is("UUID_INVALID") {
                    VolumeError::NotFound(id)
                } else {
                    VolumeError::xenapi(format!("finding VDI {}", id.vdi))(e)
                };
                Err(error.with_cleanup(cleanup.failures))
            }
        }
    }

    /// Releases an SR after a successful operation; a failure there is logged, not returned,
    /// because the operation itself has taken effect.
    async fn close(&self, handle: SrHandle) {
        let mut cleanup = Cleanup::default();
        handle.release(&self.xenapi, &mut cleanup).await;
        if !cleanup.failures.is_empty() {
            warn!(failures = ?cleanup.failures, "SR could not be fully released");
        }
    }

    /// Creates a new SR with one empty VDI: a new volume.
    pub async fn create(
        &self,
        size_gb: u64,
        name: &str,
        description: &str,
    ) -> Result<Volume, VolumeError> {
        self.journaled(
            "create",
            None,
            None,
            self.create_volume(size_gb, name, description),
        )
        .await
    }

    async fn create_volume(
        &self,
        size_gb: u64,
        name: &str,
        description: &str,
    ) -> Result<Volume, VolumeError> {
        let size = check_size(size_gb)?;
        check_label("name", name)?;
        check_label("description", description)?;
        let handle = self.new_sr(name, description).await?;
        let created = async {
            let vdi = self
                .xenapi
                .vdi_create(&NewVdi {
                    sr: &handle.sr,
                    name_label: name,
                    name_description: description,
                    virtual_size: size,
                    other_config: &BTreeMap::new(),
                })
                .await
                .map_err(VolumeError::xenapi("creating the volume's VDI"))?;
            self.finish_new_volume(&handle, &vdi, name, description)
                .await
        }
        .await;
        match created {
            Ok(id) => {
                record(Effect::Committed {
                    volume: Some(id.to_string()),
                })?;
                self.close(handle).await;
                info!(volume = %id, size_gb, "volume created");
                self.share.volume(id)
            }
            Err(e) => Err(self.discard_sr(handle, e).await),
        }
    }

    /// `SR.create` on the share, wrapped so that it is undone on failure.
    async fn new_sr(&self, name: &str, description: &str) -> Result<SrHandle, VolumeError> {
        let host = self.host().await?;
        record(Effect::SrCreating)?;
        let tag = BTreeMap::from([(crate::journal::OPERATION_KEY.to_string(), operation_id())]);
        let sr = self
            .xenapi
            .sr_create(
                &host,
                &self.device_config(),
                &sr::spec(name, description),
                &tag,
            )
            .await
            .map_err(VolumeError::xenapi("creating the volume's SR"))?;
        match self.xenapi.get_record::<crate::xenapi::Sr>(&sr).await {
            Ok(sr_record) => {
                let handle = SrHandle::created(sr, &sr_record)?;
                record(Effect::SrCreated { sr: handle.uuid })?;
                Ok(handle)
            }
            Err(e) => {
                let mut cleanup = Cleanup::default();
                cleanup.note(
                    "SR.destroy of the new SR",
                    self.xenapi.sr_destroy(&sr).await,
                );
                Err(VolumeError::xenapi("reading the new SR")(e).with_cleanup(cleanup.failures))
            }
        }
    }

    /// Records name and description of a volume whose VDI now exists in `handle`'s SR.
    async fn finish_new_volume(
        &self,
        handle: &SrHandle,
        vdi: &Ref<Vdi>,
        name: &str,
        description: &str,
    ) -> Result<VolumeId, VolumeError> {
        let record: VdiRecord = self
            .xenapi
            .get_record(vdi)
            .await
            .map_err(VolumeError::xenapi("reading the new VDI"))?;
        let vdi_uuid = id::parse_uuid(&record.uuid, "VDI").map_err(VolumeError::Invalid)?;
        let metadata = Metadata {
            name: name.to_string(),
            description: description.to_string(),
        };
        self.share.write_metadata(handle.uuid, &metadata)?;
        Ok(VolumeId {
            sr: handle.uuid,
            vdi: vdi_uuid,
        })
    }

    /// Undoes a half-made volume: destroys its VDIs and its SR (and with it the directory).
    async fn discard_sr(&self, handle: SrHandle, error: VolumeError) -> VolumeError {
        let mut cleanup = Cleanup::default();
        match self
            .xenapi
            .get_record::<crate::xenapi::Sr>(&handle.sr)
            .await
        {
            Ok(SrRecord { vdis, .. }) => {
                for vdi in vdis {
                    cleanup.note(
                        "VDI.destroy of a half-made volume",
                        self.xenapi.vdi_destroy(&vdi).await,
                    );
                }
            }
            Err(e) => cleanup.note("reading the half-made SR", Err::<(), _>(e)),
        }
        let dir = self.share.sr_dir(handle.uuid);
        let _ = std::fs::remove_file(dir.join(".xenapinfs.json"));
        cleanup.note(
            "SR.destroy of a half-made volume",
            handle.destroy(&self.xenapi).await,
        );
        error.with_cleanup(cleanup.failures)
    }

    /// Destroys a volume: its VDI, then its SR, whose directory xapi removes from the share.
    pub async fn delete(&self, id: VolumeId) -> Result<(), VolumeError> {
        self.journaled("delete", Some(id), None, self.delete_volume(id))
            .await
    }

    async fn delete_volume(&self, id: VolumeId) -> Result<(), VolumeError> {
        let _lock = self.locks.lock(id.sr).await;
        if !self.share.sr_dir(id.sr).is_dir() {
            return Err(VolumeError::NotFound(id));
        }
        if self
            .attached
            .lock()
            .expect("lock poisoned")
            .contains_key(&id)
        {
            return Err(VolumeError::Conflict(format!(
                "volume {id} is attached to this VM; detach it first"
            )));
        }
        let (handle, vdi) = self.open(id).await?;
        record(Effect::Deleting {
            sr: id.sr,
            vdi: id.vdi,
        })?;
        if let Err(e) = self.xenapi.vdi_destroy(&vdi).await {
            self.close(handle).await;
            return Err(if e.is("VDI_IN_USE") {
                VolumeError::Conflict(format!("volume {id} is in use by a VM ({e})"))
            } else {
                VolumeError::xenapi(format!("destroying VDI {}", id.vdi))(e)
            });
        }
        let _ = std::fs::remove_file(self.share.sr_dir(id.sr).join(".xenapinfs.json"));
        handle.destroy(&self.xenapi).await?;
        info!(volume = %id, "volume deleted");
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<Volume>, VolumeError> {
        self.share.list()
    }

    pub fn show(&self, id: VolumeId) -> Result<Volume, VolumeError> {
        self.share.volume(id)
    }

    /// Grows a volume (offline `VDI.resize`); shrinking is refused.
    pub async fn extend(&self, id: VolumeId, size_gb: u64) -> Result<Volume, VolumeError> {
        self.journaled("extend", Some(id), None, self.extend_volume(id, size_gb))
            .await
    }

    async fn extend_volume(&self, id: VolumeId, size_gb: u64) -> Result<Volume, VolumeError> {
        let size = check_size(size_gb)?;
        let _lock = self.locks.lock(id.sr).await;
        let current = self.share.volume(id)?;
        if size < current.size_bytes {
            return Err(VolumeError::Invalid(format!(
                "volume {id} is {:.2} GiB; shrinking to {size_gb} GiB is refused (it would destroy data)",
                current.size_gb
            )));
        }
        if size == current.size_bytes {
            return Ok(current);
        }
        if self
            .attached
            .lock()
            .expect("lock poisoned")
            .contains_key(&id)
        {
            return Err(VolumeError::Conflict(format!(
                "volume {id} is attached; XenServer resizes NFS VDIs offline only, detach it first"
            )));
        }
        let (handle, vdi) = self.open(id).await?;
        let resized = self.xenapi.vdi_resize(&vdi, size).await;
        self.close(handle).await;
        resized.map_err(VolumeError::xenapi(format!("resizing volume {id}")))?;
        info!(volume = %id, size_gb, "volume extended");
        self.share.volume(id)
    }

    /// What Nova needs to attach the volume to a guest (`xensm`).
    pub fn connection(&self, id: VolumeId) -> Result<ConnectionInfo, VolumeError> {
        let volume = self.share.volume(id)?;
        Ok(ConnectionInfo {
            driver_volume_type: "xensm".into(),
            data: ConnectionData {
                name_label: volume.name,
                name_description: volume.description,
                sr_uuid: id.sr.to_string(),
                vdi_uuid: id.vdi.to_string(),
                sr_type: "nfs".into(),
                server: self.nfs_server.clone(),
                serverpath: self.nfs_serverpath.clone(),
                introduce_sr_keys: vec!["sr_type".into(), "server".into(), "serverpath".into()],
            },
        })
    }

    /// Capacity from the share's filesystem and the volumes on it.
    pub fn stats(&self) -> Result<Stats, VolumeError> {
        let capacity = self.share.capacity()?;
        let volumes = self.share.list()?;
        let gib = share::gib;
        Ok(Stats {
            volume_backend_name: "XenAPINFS".into(),
            vendor_name: "Open Source".into(),
            driver_version: env!("CARGO_PKG_VERSION").into(),
            storage_protocol: "xensm".into(),
            total_capacity_gb: gib(capacity.total_bytes),
            free_capacity_gb: gib(capacity.free_bytes),
            provisioned_capacity_gb: gib(volumes.iter().map(|v| v.size_bytes).sum()),
            allocated_capacity_gb: gib(volumes.iter().map(|v| v.allocated_bytes).sum()),
            reserved_percentage: 0,
            volumes: volumes.len(),
        })
    }
}
