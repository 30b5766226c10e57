//! Images into and out of volumes.
//!
//! Import: the bytes are received into a staging directory on the share (inside the volume's
//! SR directory, or the share root for a volume that does not exist yet), inspected and
//! validated there, turned into XenServer VHD files, and only then swapped in with renames,
//! followed by SR.scan. A vhd-tgz is unpacked in the same single pass that receives it. A
//! failure at any step removes the staging directory and leaves the volume as it was.
//!
//! Export: from the VHD files on the share (the chain reader gives the merged view that qemu
//! cannot), streamed to the caller or PUT to a URL.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use tokio::io::AsyncReadExt;
use tracing::{info, warn};
use uuid::Uuid;

use crate::image::inspect::{Inspection, detect_head, inspect_file};
use crate::image::qemu::{ConvertOptions, QemuImg};
use crate::image::tgz::{TgzLimits, export_tgz, import_tgz};
use crate::image::transfer::{self, Body, ChannelWriter, Counting, UrlSpec};
use crate::image::{ImageError, ImageFormat};
use crate::jobs::JobContext;
use crate::journal::Effect;
use crate::service::mode::ModeReport;
use crate::vhd;
use crate::xenapi::{NewVdi, Ref, Vdi, Vm};

use super::sr::Cleanup;
use super::{
    GIB, MAX_SIZE_GB, OPERATION, Volume, VolumeError, VolumeId, VolumeManager, check_size, record,
};

/// Name, description and (optional) size of a volume made from an image.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct NewVolume {
    pub size_gb: Option<u64>,
    pub name: String,
    pub description: String,
}

/// Where an image comes from.
pub enum ImageSource {
    /// Bytes sent by the caller (a file or stdin of the CLI).
    Upload { body: Body, length: Option<u64> },
    /// Fetched by the agent.
    Url(UrlSpec),
}

/// How much of a head is looked at to decide the format.
const HEAD: usize = 64 * 1024;
/// Progress ranges of an import: receiving, converting, finishing.
const RECEIVED: f64 = 60.0;
const CONVERTED: f64 = 95.0;

impl From<ImageError> for VolumeError {
    fn from(error: ImageError) -> Self {
        match error {
            ImageError::Cancelled => VolumeError::Cancelled,
            error => VolumeError::Image(error),
        }
    }
}

/// Staging directories are named this, then the job id.
pub(super) const STAGING_PREFIX: &str = ".xenapinfs-staging-";

/// A private directory on the share, removed with everything in it when dropped.
struct Staging {
    dir: PathBuf,
}

impl Staging {
    fn new(parent: &Path, job: &str) -> Result<Self, VolumeError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = parent.join(format!("{STAGING_PREFIX}{job}"));
        record(Effect::Staging { dir: dir.clone() })?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(VolumeError::io(format!(
                "creating staging directory {}",
                dir.display()
            )))?;
        Ok(Staging { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(dir = %self.dir.display(), error = %e, "could not remove staging directory");
        }
    }
}

/// What receiving produced.
enum Staged {
    /// XenServer VHD files in staging, leaf first.
    Vhds {
        files: Vec<PathBuf>,
        virtual_size: u64,
    },
    /// An inspected image that still has to be converted.
    Image {
        path: PathBuf,
        inspection: Inspection,
    },
}

impl Staged {
    fn virtual_size(&self) -> u64 {
        match self {
            Staged::Vhds { virtual_size, .. } => *virtual_size,
            Staged::Image { inspection, .. } => inspection.virtual_size,
        }
    }
}

fn blocking_failed(e: tokio::task::JoinError) -> VolumeError {
    VolumeError::Io {
        context: "image worker".into(),
        source: std::io::Error::other(e),
    }
}

impl VolumeManager {
    fn qemu(&self) -> QemuImg {
        QemuImg::new(&self.qemu_img)
    }

    /// Overwrites an existing volume with an image; the old content stays until the very end.
    pub async fn import(
        &self,
        id: VolumeId,
        source: ImageSource,
        declared: Option<ImageFormat>,
        mode: Option<&ModeReport>,
        ctx: &JobContext,
    ) -> Result<Volume, VolumeError> {
        let work = self.import_into(id, source, declared, mode, ctx);
        self.journaled("import", Some(id), Some(ctx), work).await
    }

    async fn import_into(
        &self,
        id: VolumeId,
        source: ImageSource,
        declared: Option<ImageFormat>,
        mode: Option<&ModeReport>,
        ctx: &JobContext,
    ) -> Result<Volume, VolumeError> {
        let _lock = self.locks.lock(id.sr).await;
        let volume = self.share.volume(id)?;
        if self
            .attached
            .lock()
            .expect("lock poisoned")
            .contains_key(&id)
        {
            return Err(VolumeError::Conflict(format!(
                "volume {id} is attached; detach it before importing"
            )));
        }
        record(Effect::Replacing {
            sr: id.sr,
            vdi: id.vdi,
        })?;
        let staging = Staging::new(&self.share.sr_dir(id.sr), &ctx.id())?;
        let staged = self
            .receive(source, declared, &staging, id.vdi, volume.size_bytes, ctx)
            .await?;
        let files = match (staged, mode.and_then(|m| m.vm.clone())) {
            (Staged::Image { path, inspection }, Some(vm)) if needs_qemu(inspection.format) => {
                self.convert_into_temporary_vdi(
                    id,
                    &vm,
                    &path,
                    &inspection,
                    volume.size_bytes,
                    &staging,
                    ctx,
                )
                .await?
            }
            (staged, _) => self.materialize(staged, &staging, id.vdi, ctx).await?,
        };
        self.swap_in(id, &files, volume.size_bytes).await?;
        self.rescan(id).await?;
        ctx.progress(100.0, "imported");
        info!(volume = %id, "image imported");
        self.share.volume(id)
    }

    /// Creates a volume from an image, sized from the image unless `size_gb` is given.
    pub async fn create_from_image(
        &self,
        new: &NewVolume,
        source: ImageSource,
        declared: Option<ImageFormat>,
        mode: Option<&ModeReport>,
        ctx: &JobContext,
    ) -> Result<Volume, VolumeError> {
        let work = self.create_filled(new, source, declared, mode, ctx);
        self.journaled("create-from-image", None, Some(ctx), work)
            .await
    }

    async fn create_filled(
        &self,
        new: &NewVolume,
        source: ImageSource,
        declared: Option<ImageFormat>,
        mode: Option<&ModeReport>,
        ctx: &JobContext,
    ) -> Result<Volume, VolumeError> {
        let NewVolume {
            size_gb,
            name,
            description,
        } = new;
        let limit = match size_gb {
            Some(size) => check_size(*size)?,
            None => MAX_SIZE_GB * GIB,
        };
        super::check_label("name", name)?;
        super::check_label("description", description)?;
        let staging = Staging::new(self.share.base(), &ctx.id())?;
        let provisional = Uuid::new_v4();
        let staged = self
            .receive(source, declared, &staging, provisional, limit, ctx)
            .await?;
        let size_gb = size_gb.unwrap_or_else(|| staged.virtual_size().div_ceil(GIB).max(1));
        let volume = self.create_volume(size_gb, name, description).await?;
        let id = volume.id;
        let filled = async {
            let _lock = self.locks.lock(id.sr).await;
            match (staged, mode.and_then(|m| m.vm.clone())) {
                (Staged::Image { path, inspection }, Some(vm)) if needs_qemu(inspection.format) => {
                    let (handle, vdi) = self.open(id).await?;
                    let converted = self
                        .convert_onto_vdi(&vm, &vdi, &path, &inspection, true, ctx)
                        .await;
                    self.close(handle).await;
                    converted
                }
                (staged, _) => {
                    let mut files = self.materialize(staged, &staging, provisional, ctx).await?;
                    let leaf = staging.path(&format!("{}.vhd", id.vdi));
                    vhd::set_uuid(&files[0], id.vdi)?;
                    std::fs::rename(&files[0], &leaf)
                        .map_err(VolumeError::io("naming the imported leaf"))?;
                    files[0] = leaf;
                    self.swap_in(id, &files, volume.size_bytes).await
                }
            }?;
            self.rescan(id).await
        }
        .await;
        if let Err(error) = filled {
            drop(staging);
            let cleanup = self
                .delete_volume(id)
                .await
                .err()
                .map(|e| vec![format!("deleting the new volume {id}: {e}")]);
            return Err(error.with_cleanup(cleanup.unwrap_or_default()));
        }
        ctx.progress(100.0, "imported");
        info!(volume = %id, "volume created from an image");
        self.share.volume(id)
    }

    /// Receives the image into `staging`: a vhd-tgz is unpacked on the fly into a checked VHD
    /// chain whose leaf is `<leaf>.vhd`; anything else is spooled to a file and inspected.
    async fn receive(
        &self,
        source: ImageSource,
        declared: Option<ImageFormat>,
        staging: &Staging,
        leaf: Uuid,
        max_size: u64,
        ctx: &JobContext,
    ) -> Result<Staged, VolumeError> {
        ctx.progress(0.0, "receiving the image");
        let (body, length) = match source {
            ImageSource::Upload { body, length } => (body, length),
            ImageSource::Url(spec) => transfer::download(&spec).await?,
        };
        let (mut body, received) = Counting::new(body);
        let mut head = vec![0; HEAD];
        let mut filled = 0;
        while filled < HEAD {
            let n = body
                .read(&mut head[filled..])
                .await
                .map_err(VolumeError::io("receiving the image"))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        head.truncate(filled);
        let detected = detect_head(&head);
        let is_tgz = detected == ImageFormat::VhdTgz;
        match declared {
            Some(declared) if (declared == ImageFormat::VhdTgz) != is_tgz => {
                return Err(ImageError::Mismatch { declared, detected }.into());
            }
            _ => {}
        }
        let report = {
            let ctx = ctx.clone();
            move |bytes: u64| match length {
                Some(total) if total > 0 => ctx.progress(
                    bytes as f64 / total as f64 * RECEIVED,
                    "receiving the image",
                ),
                _ => ctx.progress(0.0, format!("received {} MiB", bytes >> 20)),
            }
        };
        let reader = Read::chain(
            std::io::Cursor::new(head),
            tokio_util::io::SyncIoBridge::new(body),
        );
        if is_tgz {
            let dir = staging.dir.clone();
            let cancel = ctx.cancel.clone();
            let limits = TgzLimits {
                max_virtual_size: max_size,
                max_members: vhd::MAX_CHAIN_DEPTH,
            };
            let chain = tokio::task::spawn_blocking(move || {
                let mut reader = reader;
                let report = report;
                import_tgz(&mut reader, &dir, leaf, &limits, &mut |_| {
                    report(received.load(Ordering::Relaxed));
                    !cancel.is_cancelled()
                })
            })
            .await
            .map_err(blocking_failed)??;
            return Ok(Staged::Vhds {
                files: chain.files.into_iter().map(|(path, _)| path).collect(),
                virtual_size: chain.virtual_size,
            });
        }
        // Not a tarball: spool it (qemu-img needs a file it can seek in), at most a little more
        // than the largest image that could fit the volume.
        let path = staging.path("image");
        let limit = max_size + max_size / 8 + (64 << 20);
        let cancel = ctx.cancel.clone();
        let spool_path = path.clone();
        tokio::task::spawn_blocking(move || -> Result<(), VolumeError> {
            let mut reader = reader.take(limit + 1);
            let mut file = std::fs::File::create_new(&spool_path)
                .map_err(VolumeError::io("spooling the image"))?;
            let mut buffer = vec![0; 1 << 20];
            let mut total = 0u64;
            loop {
                if cancel.is_cancelled() {
                    return Err(VolumeError::Cancelled);
                }
                let n = reader
                    .read(&mut buffer)
                    .map_err(VolumeError::io("receiving the image"))?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                if total > limit {
                    return Err(ImageError::TooLarge {
                        what: "the image file".into(),
                        size: total,
                        limit,
                    }
                    .into());
                }
                file.write_all(&buffer[..n])
                    .map_err(VolumeError::io("spooling the image"))?;
                report(total);
            }
            file.sync_all()
                .map_err(VolumeError::io("spooling the image"))
        })
        .await
        .map_err(blocking_failed)??;
        ctx.progress(RECEIVED, "inspecting the image");
        let inspection = inspect_file(&path, declared, max_size, &self.qemu()).await?;
        Ok(Staged::Image { path, inspection })
    }

    /// Turns staged input into XenServer VHD files at file level (remote mode, and VHD/raw
    /// images in any mode). The leaf is `<leaf>.vhd`.
    async fn materialize(
        &self,
        staged: Staged,
        staging: &Staging,
        leaf: Uuid,
        ctx: &JobContext,
    ) -> Result<Vec<PathBuf>, VolumeError> {
        let (image, inspection) = match staged {
            Staged::Vhds { files, .. } => return Ok(files),
            Staged::Image { path, inspection } => (path, inspection),
        };
        let target = staging.path(&format!("{leaf}.vhd"));
        let raw = if needs_qemu(inspection.format) {
            let raw = staging.path("image.raw");
            let progress_ctx = ctx.clone();
            let mut progress = move |p: f64| {
                progress_ctx.progress(RECEIVED + p * (CONVERTED - RECEIVED) / 2.0, "converting")
            };
            self.qemu()
                .convert(
                    &image,
                    inspection.format,
                    &raw,
                    ImageFormat::Raw,
                    ConvertOptions::default(),
                    &mut progress,
                    &ctx.cancel,
                )
                .await?;
            std::fs::remove_file(&image).map_err(VolumeError::io("removing the spooled image"))?;
            Some(raw)
        } else {
            None
        };
        let (source, format) = match &raw {
            Some(raw) => (raw.clone(), ImageFormat::Raw),
            None => (image, inspection.format),
        };
        let size = inspection.virtual_size;
        let ctx = ctx.clone();
        let written = target.clone();
        tokio::task::spawn_blocking(move || -> Result<(), VolumeError> {
            let mut progress = |done: u64, total: u64| {
                let fraction = if total == 0 {
                    1.0
                } else {
                    done as f64 / total as f64
                };
                ctx.progress(
                    RECEIVED + (CONVERTED - RECEIVED) * (0.5 + fraction / 2.0),
                    "writing the VHD",
                );
                !ctx.cancel.is_cancelled()
            };
            let mut reader: Box<dyn Read> = match format {
                ImageFormat::Vhd => Box::new(vhd::ChainReader::open(&source)?),
                _ => Box::new(
                    std::fs::File::open(&source)
                        .map_err(VolumeError::io("reading the converted image"))?,
                ),
            };
            vhd::write_dynamic_from(&mut reader, size, &written, leaf, &mut progress)?;
            Ok(())
        })
        .await
        .map_err(blocking_failed)??;
        if let Some(raw) = raw {
            let _ = std::fs::remove_file(raw);
        }
        Ok(vec![target])
    }

    /// Local mode, existing volume: converts into a new VDI in the volume's SR (so the old
    /// content survives a failure), then moves its file into staging as the new leaf.
    #[allow(clippy::too_many_arguments)]
    async fn convert_into_temporary_vdi(
        &self,
        id: VolumeId,
        vm: &Ref<Vm>,
        image: &Path,
        inspection: &Inspection,
        size: u64,
        staging: &Staging,
        ctx: &JobContext,
    ) -> Result<Vec<PathBuf>, VolumeError> {
        let (handle, _) = self.open(id).await?;
        let created = self
            .xenapi
            .vdi_create(&NewVdi {
                sr: &handle.sr,
                name_label: "xenapinfs import",
                name_description: &format!("new content of {id}, being written"),
                virtual_size: size,
                other_config: &Default::default(),
            })
            .await
            .map_err(VolumeError::xenapi("creating the VDI to import into"));
        let temporary = match created {
            Ok(vdi) => vdi,
            Err(e) => {
                self.close(handle).await;
                return Err(e);
            }
        };
        let converted = async {
            let record: crate::xenapi::VdiRecord = self
                .xenapi
                .get_record(&temporary)
                .await
                .map_err(VolumeError::xenapi("reading the new VDI"))?;
            self.convert_onto_vdi(vm, &temporary, image, inspection, true, ctx)
                .await?;
            Ok::<_, VolumeError>(record.uuid)
        }
        .await;
        let uuid = match converted {
            Ok(uuid) => uuid,
            Err(e) => {
                let mut cleanup = Cleanup::default();
                cleanup.note(
                    "VDI.destroy of the import VDI",
                    self.xenapi.vdi_destroy(&temporary).await,
                );
                handle.release(&self.xenapi, &mut cleanup).await;
                return Err(e.with_cleanup(cleanup.failures));
            }
        };
        // Forgetting the SR drops the temporary VDI's record; its file becomes the new leaf.
        self.close(handle).await;
        let file = self.share.sr_dir(id.sr).join(format!("{uuid}.vhd"));
        let leaf = staging.path(&format!("{}.vhd", id.vdi));
        std::fs::rename(&file, &leaf)
            .map_err(VolumeError::io("moving the converted VHD to staging"))?;
        vhd::set_uuid(&leaf, id.vdi)?;
        Ok(vec![leaf])
    }

    /// Local mode: plugs `vdi` into this VM and lets qemu-img write the image onto it.
    async fn convert_onto_vdi(
        &self,
        vm: &Ref<Vm>,
        vdi: &Ref<Vdi>,
        image: &Path,
        inspection: &Inspection,
        fresh: bool,
        ctx: &JobContext,
    ) -> Result<(), VolumeError> {
        let (vbd, device) = self.plug_vdi(vm, vdi).await?;
        let progress_ctx = ctx.clone();
        let mut progress = move |p: f64| {
            progress_ctx.progress(
                RECEIVED + p * (CONVERTED - RECEIVED),
                "writing onto the attached disk",
            )
        };
        let options = ConvertOptions {
            no_create: true,
            target_is_zero: fresh,
            cache_none: false,
        };
        let converted = self
            .qemu()
            .convert(
                image,
                inspection.format,
                &device,
                ImageFormat::Raw,
                options,
                &mut progress,
                &ctx.cancel,
            )
            .await;
        let unplugged = self.unplug_vdi(&vbd, &device).await;
        converted?;
        unplugged
    }

    /// Moves staged VHD files into the volume's SR: parents first (fresh uuids, hidden), then
    /// the leaf over `<vdi>.vhd` in one rename; parents of the old content go afterwards.
    async fn swap_in(
        &self,
        id: VolumeId,
        files: &[PathBuf],
        volume_size: u64,
    ) -> Result<(), VolumeError> {
        let leaf = &files[0];
        if vhd::inspect(leaf)?.virtual_size < volume_size {
            vhd::grow(leaf, volume_size)?;
        }
        for file in files {
            vhd::check(file)?;
        }
        let sr_dir = self.share.sr_dir(id.sr);
        let current = self.share.vhd_path(id);
        let old_parents: Vec<PathBuf> = vhd::Chain::open(&current)
            .map(|chain| {
                chain
                    .files()
                    .iter()
                    .skip(1)
                    .map(|(path, _)| path.clone())
                    .collect()
            })
            .unwrap_or_default();
        for parent in &files[1..] {
            let name = parent.file_name().expect("staged files have names");
            std::fs::rename(parent, sr_dir.join(name))
                .map_err(VolumeError::io("moving a parent VHD into the SR"))?;
        }
        let inode = std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(leaf).map_err(VolumeError::io("reading the staged leaf"))?,
        );
        record(Effect::Swapping {
            sr: id.sr,
            vdi: id.vdi,
            inode,
        })?;
        std::fs::rename(leaf, &current)
            .map_err(VolumeError::io("moving the new content into place"))?;
        record(Effect::Committed {
            volume: Some(id.to_string()),
        })?;
        let kept: Vec<PathBuf> = files[1..]
            .iter()
            .filter_map(|p| p.file_name().map(|n| sr_dir.join(n)))
            .collect();
        for old in old_parents.iter().filter(|p| !kept.contains(p)) {
            if let Err(e) = std::fs::remove_file(old) {
                warn!(file = %old.display(), error = %e, "could not remove a parent of the old content");
            }
        }
        Ok(())
    }

    /// Makes xapi read the SR's files again.
    async fn rescan(&self, id: VolumeId) -> Result<(), VolumeError> {
        let (handle, _) = self.open(id).await?;
        let scanned = self.xenapi.sr_scan(&handle.sr).await;
        self.close(handle).await;
        scanned.map_err(VolumeError::xenapi(format!("scanning SR {}", id.sr)))
    }

    /// Writes the volume as an image in `format` to `out` (a blocking writer; the caller streams
    /// it). Returns the bytes written.
    pub async fn export(
        &self,
        id: VolumeId,
        format: ImageFormat,
        out: ChannelWriter,
        ctx: &JobContext,
    ) -> Result<u64, VolumeError> {
        let op = match self.begin("export", Some(id), Some(ctx)) {
            Ok(op) => op,
            Err(e) => return fail_stream(out, e).await,
        };
        let exported = OPERATION
            .scope(op.clone(), self.export_volume(id, format, out, ctx))
            .await;
        self.end(&op);
        exported
    }

    async fn export_volume(
        &self,
        id: VolumeId,
        format: ImageFormat,
        out: ChannelWriter,
        ctx: &JobContext,
    ) -> Result<u64, VolumeError> {
        let _lock = self.locks.lock(id.sr).await;
        let volume = match self.share.volume(id) {
            Ok(volume) => volume,
            Err(e) => return fail_stream(out, e).await,
        };
        let staging = Staging::new(&self.share.sr_dir(id.sr), &ctx.id())?;
        let leaf = self.share.vhd_path(id);
        // Formats qemu writes go through a sparse raw file of the merged chain first.
        let converted = match format.qemu_driver() {
            Some(_) if !matches!(format, ImageFormat::Raw | ImageFormat::Vhd) => {
                let raw = staging.path("volume.raw");
                let out_file = staging.path(&format!("volume.{}", format.name()));
                let (leaf2, raw2, ctx2) = (leaf.clone(), raw.clone(), ctx.clone());
                tokio::task::spawn_blocking(move || write_sparse_raw(&leaf2, &raw2, &ctx2))
                    .await
                    .map_err(blocking_failed)??;
                let progress_ctx = ctx.clone();
                let mut progress =
                    move |p: f64| progress_ctx.progress(40.0 + p * 40.0, "converting");
                self.qemu()
                    .convert(
                        &raw,
                        ImageFormat::Raw,
                        &out_file,
                        format,
                        ConvertOptions::default(),
                        &mut progress,
                        &ctx.cancel,
                    )
                    .await?;
                Some(out_file)
            }
            _ => None,
        };
        let ctx2 = ctx.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut out = out;
            let result = write_export(
                &leaf,
                format,
                converted.as_deref(),
                volume.size_bytes,
                &mut out,
                &ctx2,
            );
            match &result {
                Ok(_) => drop(out),
                Err(e) => out.fail(e.to_string()),
            }
            result
        })
        .await
        .map_err(blocking_failed)??;
        drop(staging);
        ctx.progress(100.0, "exported");
        info!(volume = %id, %format, bytes = written, "volume exported");
        Ok(written)
    }
}

/// Ends an export stream with `error` (a dropped writer would look like a complete image).
async fn fail_stream(out: ChannelWriter, error: VolumeError) -> Result<u64, VolumeError> {
    let message = error.to_string();
    tokio::task::spawn_blocking(move || out.fail(message))
        .await
        .map_err(blocking_failed)?;
    Err(error)
}

/// qemu-img is needed to read these formats.
fn needs_qemu(format: ImageFormat) -> bool {
    !matches!(
        format,
        ImageFormat::Vhd | ImageFormat::Raw | ImageFormat::VhdTgz
    )
}

/// The merged chain as a sparse raw file (holes where no VHD in the chain has data).
fn write_sparse_raw(leaf: &Path, raw: &Path, ctx: &JobContext) -> Result<(), VolumeError> {
    let file = std::fs::File::create_new(raw).map_err(VolumeError::io("writing the raw copy"))?;
    let mut progress = |done: u64, total: u64| {
        ctx.progress(
            done as f64 / total.max(1) as f64 * 40.0,
            "reading the chain",
        );
        !ctx.cancel.is_cancelled()
    };
    match vhd::write_raw(leaf, &file, raw, &mut progress) {
        Err(vhd::VhdError::Cancelled) => Err(VolumeError::Cancelled),
        result => Ok(result?),
    }
}

/// Writes the export stream: the chain as a tarball, one flat VHD, raw bytes, or a file
/// qemu-img produced.
fn write_export(
    leaf: &Path,
    format: ImageFormat,
    converted: Option<&Path>,
    size: u64,
    out: &mut dyn Write,
    ctx: &JobContext,
) -> Result<u64, VolumeError> {
    let report = |done: u64, total: u64| {
        let fraction = if total == 0 {
            1.0
        } else {
            done as f64 / total as f64
        };
        ctx.progress(80.0 + fraction * 20.0, "sending");
        !ctx.cancel.is_cancelled()
    };
    let copy_file = |path: &Path, out: &mut dyn Write| -> Result<u64, VolumeError> {
        let mut file = std::fs::File::open(path)
            .map_err(VolumeError::io(format!("reading {}", path.display())))?;
        let total = file.metadata().map(|m| m.len()).unwrap_or(0);
        copy_with_progress(&mut file, out, total, &report)
    };
    match (format, converted) {
        (_, Some(path)) => copy_file(path, out),
        (ImageFormat::VhdTgz, _) => {
            let chain = vhd::Chain::open(leaf)?;
            let files: Vec<PathBuf> = chain.files().iter().map(|(p, _)| p.clone()).collect();
            let total: u64 = chain.files().iter().map(|(_, info)| info.file_size).sum();
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
            Ok(export_tgz(&files, out, threads, &mut |done| {
                report(done, total)
            })?)
        }
        (ImageFormat::Vhd, _) => {
            let chain = vhd::Chain::open(leaf)?;
            if chain.files().len() == 1 {
                return copy_file(leaf, out);
            }
            let flat = leaf.with_file_name(format!(".xenapinfs-export-{}.vhd", Uuid::new_v4()));
            let flattened =
                vhd::copy_flattened(leaf, &flat, chain.leaf().uuid, None, &mut |d, t| {
                    report(d / 2, t)
                });
            let result = flattened
                .map_err(VolumeError::from)
                .and_then(|_| copy_file(&flat, out));
            let _ = std::fs::remove_file(&flat);
            result
        }
        _ => {
            let mut reader = vhd::ChainReader::open(leaf)?;
            copy_with_progress(&mut reader, out, size, &report)
        }
    }
}

fn copy_with_progress(
    from: &mut dyn Read,
    to: &mut dyn Write,
    total: u64,
    report: &dyn Fn(u64, u64) -> bool,
) -> Result<u64, VolumeError> {
    let mut buffer = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = from
            .read(&mut buffer)
            .map_err(VolumeError::io("reading the volume"))?;
        if n == 0 {
            break;
        }
        to.write_all(&buffer[..n])
            .map_err(VolumeError::io("sending the image"))?;
        done += n as u64;
        if !report(done, total) {
            return Err(VolumeError::Cancelled);
        }
    }
    to.flush().map_err(VolumeError::io("sending the image"))?;
    Ok(done)
}

/// Exports to a URL (HTTP PUT), as a job.
pub async fn export_to_url(
    manager: &VolumeManager,
    id: VolumeId,
    format: ImageFormat,
    spec: UrlSpec,
    ctx: JobContext,
) -> Result<u64, VolumeError> {
    let (writer, receiver) = ChannelWriter::new(4);
    let upload = tokio::spawn(async move { transfer::upload(&spec, receiver).await });
    let exported = manager.export(id, format, writer, &ctx).await;
    let uploaded = upload.await.map_err(blocking_failed)?;
    let bytes = exported?;
    uploaded?;
    Ok(bytes)
}
