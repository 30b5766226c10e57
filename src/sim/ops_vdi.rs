//! VDI messages on NFS SRs: every VDI is a real dynamic VHD `<sr dir>/<vdi uuid>.vhd`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::vhd;

use super::classes::{reference, void};
use super::codec::Value;
use super::dispatch::{Args, Ctx, Methods};
use super::error::{ApiError, ApiResult};
use super::model::{self, Db, NULL_REF, Vdi};
use super::storage;

const VDI_TYPES: &[&str] = &[
    "system",
    "user",
    "ephemeral",
    "suspend",
    "crashdump",
    "ha_statefile",
    "metadata",
    "redo_log",
    "rrd",
    "pvs_cache",
    "cbt_metadata",
];

pub fn register(m: &mut Methods) {
    m.add("VDI.create", 1, 1, true, vdi_create);
    m.add("VDI.destroy", 1, 1, true, vdi_destroy);
    m.add("VDI.forget", 1, 1, true, |ctx, args| {
        let vdi = args.string(0)?;
        let mut db = ctx.db();
        model::lookup(&db.vdis, "VDI", &vdi)?;
        assert_not_attached(&db, &vdi, "forget")?;
        db.vdis.remove(&vdi);
        db.vbds.retain(|_, b| b.vdi != vdi);
        void()
    });
    m.add("VDI.copy", 4, 2, true, vdi_copy);
    m.add("VDI.resize", 2, 2, true, vdi_resize);
}

/// Where a VDI's SR lives: `(sr ref, sr uuid, vdi uuid, vhd path)`.
struct Placement {
    sr: String,
    sr_uuid: String,
    path: PathBuf,
}

/// Fails as xapi's forwarding does when no host has the SR attached.
fn attached_sr(db: &Db, sr: &str) -> ApiResult<String> {
    let record = model::lookup(&db.srs, "SR", sr)?;
    if record.local {
        return Err(ApiError::new("SR_OPERATION_NOT_SUPPORTED", [sr]));
    }
    if !db.pbds.values().any(|p| p.sr == sr && p.currently_attached) {
        return Err(ApiError::new("SR_NO_PBDS", [sr]));
    }
    Ok(record.uuid.clone())
}

fn placement(ctx: &Ctx, db: &Db, vdi: &str) -> ApiResult<Placement> {
    let record = model::lookup(&db.vdis, "VDI", vdi)?;
    let sr_uuid = attached_sr(db, &record.sr)?;
    Ok(Placement {
        sr: record.sr.clone(),
        path: storage::vhd_path(&ctx.sim.config.export, &sr_uuid, &record.location),
        sr_uuid,
    })
}

fn assert_not_attached(db: &Db, vdi: &str, operation: &str) -> ApiResult<()> {
    if db
        .vbds
        .values()
        .any(|b| b.vdi == vdi && b.currently_attached)
    {
        return Err(ApiError::new("VDI_IN_USE", [vdi, operation]));
    }
    Ok(())
}

fn assert_no_operation(db: &Db, vdi: &str) -> ApiResult<()> {
    let record = model::lookup(&db.vdis, "VDI", vdi)?;
    if let Some((task, op)) = record.current_operations.iter().next() {
        return Err(ApiError::new(
            "OTHER_OPERATION_IN_PROGRESS",
            ["VDI", vdi, op.as_str(), task.as_str()],
        ));
    }
    Ok(())
}

/// Recomputes an SR's virtual allocation and usage after a VDI change.
fn refresh_sr(ctx: &Ctx, db: &mut Db, sr: &str) {
    let allocation: i64 = db
        .vdis
        .values()
        .filter(|v| v.sr == sr && v.managed)
        .map(|v| v.virtual_size)
        .sum();
    if let Some(record) = db.srs.get_mut(sr) {
        let (size, used) =
            storage::fs_usage(&storage::sr_dir(&ctx.sim.config.export, &record.uuid));
        record.virtual_allocation = allocation;
        record.physical_size = size;
        record.physical_utilisation = used;
    }
}

fn invalid_size(opterr: impl std::fmt::Display) -> ApiError {
    ApiError::backend_opterr(79, "VDI Invalid size", opterr)
}

fn checked_size(requested: i64) -> ApiResult<u64> {
    let requested = u64::try_from(requested)
        .map_err(|_| invalid_size(format!("size {requested} is negative")))?;
    let size = vhd::round_up_size(requested);
    if size > vhd::MAX_VIRTUAL_SIZE {
        return Err(invalid_size(format!(
            "size {requested} is larger than the maximum {}",
            vhd::MAX_VIRTUAL_SIZE
        )));
    }
    Ok(size)
}

fn vdi_create(ctx: &Ctx, args: &Args) -> ApiResult<Value> {
    let record = args.record(0)?;
    let sr = record.string("SR")?;
    let requested = record.int64("virtual_size")?;
    let vdi_type = record.enumeration("type", VDI_TYPES)?;
    let sharable = record.bool("sharable")?;
    let read_only = record.bool("read_only")?;
    let other_config = record.map("other_config")?;
    let name_label = record.string_or("name_label", "")?;
    let name_description = record.string_or("name_description", "")?;
    let xenstore_data = record.map_or_empty("xenstore_data")?;
    let sm_config = record.map_or_empty("sm_config")?;
    let tags = record.strings_or_empty("tags")?;
    let sr_uuid = attached_sr(&ctx.db(), &sr)?;
    let size = checked_size(requested)?;
    let uuid = Uuid::new_v4();
    let path = storage::vhd_path(&ctx.sim.config.export, &sr_uuid, &uuid.to_string());
    let info = vhd::create_dynamic(&path, size, uuid)
        .map_err(|e| storage::backend(78, "VDI Creation failed", e))?;
    let handle = model::new_ref();
    let mut db = ctx.db();
    db.vdis.insert(
        handle.clone(),
        Vdi {
            uuid: uuid.to_string(),
            name_label,
            name_description,
            sr: sr.clone(),
            virtual_size: info.virtual_size as i64,
            physical_utilisation: info.file_size as i64,
            vdi_type: vdi_type.to_string(),
            sharable,
            read_only,
            other_config,
            sm_config,
            xenstore_data,
            tags,
            location: uuid.to_string(),
            managed: true,
            ..Vdi::default()
        },
    );
    refresh_sr(ctx, &mut db, &sr);
    reference(handle)
}

fn vdi_destroy(ctx: &Ctx, args: &Args) -> ApiResult<Value> {
    let vdi = args.string(0)?;
    let mut db = ctx.db();
    let place = placement(ctx, &db, &vdi)?;
    assert_not_attached(&db, &vdi, "destroy")?;
    assert_no_operation(&db, &vdi)?;
    match std::fs::remove_file(&place.path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(storage::backend(80, "Failed to mark VDI hidden", e)),
    }
    db.vdis.remove(&vdi);
    db.vbds.retain(|_, b| b.vdi != vdi);
    refresh_sr(ctx, &mut db, &place.sr);
    void()
}

fn vdi_resize(ctx: &Ctx, args: &Args) -> ApiResult<Value> {
    let vdi = args.string(0)?;
    let requested = args.int64(1)?;
    let mut db = ctx.db();
    let place = placement(ctx, &db, &vdi)?;
    assert_not_attached(&db, &vdi, "resize")?;
    assert_no_operation(&db, &vdi)?;
    let current = model::lookup(&db.vdis, "VDI", &vdi)?.virtual_size;
    if requested < current {
        return Err(invalid_size("shrinking not allowed"));
    }
    let size = checked_size(requested)?;
    if size as i64 != current {
        let info = vhd::grow(&place.path, size)
            .map_err(|e| storage::backend(79, "VDI Invalid size", e))?;
        let record = model::lookup_mut(&mut db.vdis, "VDI", &vdi)?;
        record.virtual_size = info.virtual_size as i64;
        record.physical_utilisation = info.file_size as i64;
        refresh_sr(ctx, &mut db, &place.sr);
    }
    void()
}

/// VDI.copy: a new, flat VHD from the merged chain, built under a temporary name and renamed
/// into place at the end; progress is reported on the task and `task.cancel` stops it.
fn vdi_copy(ctx: &Ctx, args: &Args) -> ApiResult<Value> {
    let source = args.string(0)?;
    let target_sr = args.string(1)?;
    let into = args.string_or(3, NULL_REF)?;
    let operation = ctx.operation_id();
    let (source_path, dest_path, dest_ref, dest_uuid, new_size, created) = {
        let mut db = ctx.db();
        let from = placement(ctx, &db, &source)?;
        if db
            .vbds
            .values()
            .any(|b| b.vdi == source && b.currently_attached && b.mode == "RW")
        {
            return Err(ApiError::new("VDI_IN_USE", [source.as_str(), "copy"]));
        }
        let source_record = model::lookup(&db.vdis, "VDI", &source)?.clone();
        let (dest_ref, dest_uuid, dest_sr_uuid, new_size, created) = if into != NULL_REF {
            let target = placement(ctx, &db, &into)?;
            assert_not_attached(&db, &into, "copy")?;
            assert_no_operation(&db, &into)?;
            let into_record = model::lookup(&db.vdis, "VDI", &into)?;
            if into_record.virtual_size < source_record.virtual_size {
                return Err(ApiError::new(
                    "VDI_TOO_SMALL",
                    [into.clone(), source_record.virtual_size.to_string()],
                ));
            }
            (
                into.clone(),
                into_record.uuid.clone(),
                target.sr_uuid,
                Some(into_record.virtual_size as u64),
                false,
            )
        } else {
            let dest_sr_uuid = attached_sr(&db, &target_sr)?;
            let handle = model::new_ref();
            let uuid = model::new_uuid();
            db.vdis.insert(
                handle.clone(),
                Vdi {
                    uuid: uuid.clone(),
                    sr: target_sr.clone(),
                    location: uuid.clone(),
                    managed: true,
                    read_only: false,
                    sm_config: Default::default(),
                    current_operations: [(operation.clone(), "copy".to_string())].into(),
                    ..source_record.clone()
                },
            );
            (handle, uuid, dest_sr_uuid, None, true)
        };
        if let Some(record) = db.vdis.get_mut(&source) {
            record
                .current_operations
                .insert(operation.clone(), "copy".into());
        }
        if let Some(record) = db.vdis.get_mut(&dest_ref) {
            record
                .current_operations
                .insert(operation.clone(), "copy".into());
        }
        let dest_path = storage::vhd_path(&ctx.sim.config.export, &dest_sr_uuid, &dest_uuid);
        (from.path, dest_path, dest_ref, dest_uuid, new_size, created)
    };

    let temp = storage::temp_beside(&dest_path, "copy");
    let delay = ctx.sim.hooks.delay("VDI.copy");
    let started = Instant::now();
    let mut on_progress = |done: u64, total: u64| -> bool {
        let fraction = if total == 0 {
            1.0
        } else {
            done as f64 / total as f64
        };
        // Spread the configured delay over the copy so progress can be watched.
        let due = delay.mul_f64(fraction);
        while (started.elapsed() < due || ctx.sim.hooks.is_hung("VDI.copy")) && !ctx.cancelled() {
            let left = due.saturating_sub(started.elapsed());
            std::thread::sleep(match left.is_zero() {
                true => Duration::from_millis(20),
                false => left.min(Duration::from_millis(20)),
            });
        }
        ctx.progress(fraction * 0.99);
        !ctx.cancelled()
    };
    let uuid = Uuid::parse_str(&dest_uuid).unwrap_or_else(|_| Uuid::new_v4());
    let copied = vhd::copy_flattened(&source_path, &temp, uuid, new_size, &mut on_progress)
        .and_then(|info| {
            std::fs::rename(&temp, &dest_path)
                .map_err(|e| vhd::VhdError::Io {
                    path: dest_path.clone(),
                    context: "renaming the copy into place".into(),
                    source: e,
                })
                .map(|()| info)
        });

    let mut db = ctx.db();
    for handle in [&source, &dest_ref] {
        if let Some(record) = db.vdis.get_mut(handle.as_str()) {
            record.current_operations.remove(&operation);
        }
    }
    let dest_sr = db
        .vdis
        .get(&dest_ref)
        .map(|v| v.sr.clone())
        .unwrap_or_default();
    match copied {
        Ok(info) => {
            if let Some(record) = db.vdis.get_mut(&dest_ref) {
                record.virtual_size = info.virtual_size as i64;
                record.physical_utilisation = info.file_size as i64;
                record.sm_config.remove("vhd-parent");
            }
            refresh_sr(ctx, &mut db, &dest_sr);
            reference(dest_ref)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            if created {
                db.vdis.remove(&dest_ref);
                refresh_sr(ctx, &mut db, &dest_sr);
            }
            if e.is_cancelled() || ctx.cancelled() {
                let task = ctx
                    .task
                    .as_ref()
                    .map(|t| t.task.clone())
                    .unwrap_or_default();
                return Err(ApiError::task_cancelled(&task));
            }
            Err(ApiError::new("VDI_COPY_FAILED", [e.to_string()]))
        }
    }
}
