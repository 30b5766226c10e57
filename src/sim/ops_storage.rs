//! SR and PBD messages, with NFS SM semantics: one directory per SR on the export, attach =
//! "mount" (the directory must exist), scan = read the VHD files.

use std::collections::{BTreeMap, BTreeSet};

use super::classes::{reference, void};
use super::dispatch::{Ctx, Methods};
use super::error::{ApiError, ApiResult};
use super::model::{self, Map, Pbd, Sr, Vdi};
use super::storage;

pub fn register(m: &mut Methods) {
    m.add("SR.create", 9, 8, true, sr_create);
    m.add("SR.introduce", 7, 6, true, sr_introduce);
    m.add("SR.forget", 1, 1, true, |ctx, args| {
        sr_forget(ctx, &args.string(0)?)?;
        void()
    });
    m.add("SR.destroy", 1, 1, true, sr_destroy);
    m.add("SR.scan", 1, 1, true, |ctx, args| {
        scan(ctx, &args.string(0)?)?;
        void()
    });
    m.add("SR.update", 1, 1, true, |ctx, args| {
        scan(ctx, &args.string(0)?)?;
        void()
    });
    m.add("SR.get_supported_types", 0, 0, false, |_, _| {
        Ok(model::strings(["nfs", "ext", "lvm", "iso", "udev"]))
    });
    m.add("PBD.create", 1, 1, true, pbd_create);
    m.add("PBD.plug", 1, 1, true, |ctx, args| {
        pbd_plug(ctx, &args.string(0)?)?;
        void()
    });
    m.add("PBD.unplug", 1, 1, true, pbd_unplug);
    m.add("PBD.destroy", 1, 1, true, pbd_destroy);
    m.add("PBD.set_device_config", 2, 2, true, |ctx, args| {
        let pbd = args.string(0)?;
        let config = args.map(1)?;
        model::lookup_mut(&mut ctx.db().pbds, "PBD", &pbd)?.device_config = config;
        void()
    });
}

/// Checks an NFS device_config the way NFSSR does before mounting `serverpath/<sr_uuid>`.
fn check_nfs_config(
    ctx: &Ctx,
    device_config: &Map,
    sr_uuid: &str,
    must_exist: bool,
) -> ApiResult<()> {
    let Some(path) = device_config.get("serverpath") else {
        return Err(ApiError::backend(
            101,
            "The request is missing the serverpath parameter",
            "",
        ));
    };
    let Some(server) = device_config.get("server") else {
        return Err(ApiError::backend(
            102,
            "The request is missing the server parameter",
            "",
        ));
    };
    let config = &ctx.sim.config;
    let mount_error = |stderr: String| {
        ApiError::backend(
            73,
            "NFS mount error [opterr=mount failed with return code 32]",
            stderr,
        )
    };
    if *server != config.nfs_server {
        return Err(mount_error(format!(
            "mount.nfs: Failed to resolve server {server}: Name or service not known"
        )));
    }
    if path.trim_end_matches('/') != config.nfs_path.trim_end_matches('/') {
        return Err(mount_error(format!(
            "mount.nfs: access denied by server while mounting {server}:{path}"
        )));
    }
    if must_exist && !storage::sr_dir(&config.export, sr_uuid).is_dir() {
        return Err(mount_error(format!(
            "mount.nfs: mounting {server}:{}/{sr_uuid} failed, reason given by server: No such file or directory",
            path.trim_end_matches('/')
        )));
    }
    Ok(())
}

fn sr_create(ctx: &Ctx, args: &super::dispatch::Args) -> ApiResult<super::codec::Value> {
    let host = args.string(0)?;
    let device_config = args.map(1)?;
    let _physical_size = args.int64(2)?;
    let name_label = args.string(3)?;
    let name_description = args.string(4)?;
    let sr_type = args.string(5)?;
    let content_type = args.string(6)?;
    let shared = args.bool(7)?;
    let sm_config = args.map_or_empty(8)?;
    model::lookup(&ctx.db().hosts, "host", &host)?;
    if sr_type != "nfs" {
        return Err(ApiError::new("SR_UNKNOWN_DRIVER", [sr_type]));
    }
    let uuid = model::new_uuid();
    check_nfs_config(ctx, &device_config, &uuid, false)?;
    let dir = storage::sr_dir(&ctx.sim.config.export, &uuid);
    if dir.exists() {
        let non_empty = std::fs::read_dir(&dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true);
        if non_empty {
            return Err(ApiError::backend(42, "The SR already exists", ""));
        }
    } else {
        std::fs::create_dir(&dir).map_err(|e| {
            storage::backend(
                88,
                "NFS SR creation error",
                format!("{}: {e}", dir.display()),
            )
        })?;
    }
    let sr = model::new_ref();
    let pbds: Vec<String> = {
        let mut db = ctx.db();
        db.srs.insert(
            sr.clone(),
            Sr {
                uuid,
                name_label,
                name_description,
                sr_type,
                content_type,
                shared,
                sm_config,
                physical_size: -1,
                physical_utilisation: -1,
                ..Sr::default()
            },
        );
        let mut hosts: Vec<String> = vec![db.master.clone()];
        if shared {
            hosts.extend(db.hosts.keys().filter(|h| **h != db.master).cloned());
        }
        hosts
            .into_iter()
            .map(|host| {
                let pbd = model::new_ref();
                db.pbds.insert(
                    pbd.clone(),
                    Pbd {
                        uuid: model::new_uuid(),
                        host,
                        sr: sr.clone(),
                        device_config: device_config.clone(),
                        currently_attached: false,
                        other_config: Map::new(),
                    },
                );
                pbd
            })
            .collect()
    };
    for pbd in &pbds {
        if let Err(e) = pbd_plug(ctx, pbd) {
            let mut db = ctx.db();
            for pbd in &pbds {
                db.pbds.remove(pbd);
            }
            let uuid = db.srs.remove(&sr).map(|s| s.uuid).unwrap_or_default();
            drop(db);
            let _ = std::fs::remove_dir(storage::sr_dir(&ctx.sim.config.export, &uuid));
            return Err(e);
        }
    }
    reference(sr)
}

fn sr_introduce(ctx: &Ctx, args: &super::dispatch::Args) -> ApiResult<super::codec::Value> {
    let uuid = args.string(0)?;
    let name_label = args.string(1)?;
    let name_description = args.string(2)?;
    let sr_type = args.string(3)?;
    let content_type = args.string(4)?;
    let shared = args.bool(5)?;
    let sm_config = args.map_or_empty(6)?;
    let mut db = ctx.db();
    if db.srs.values().any(|sr| sr.uuid == uuid) {
        return Err(ApiError::new("SR_UUID_EXISTS", [uuid]));
    }
    let sr = model::new_ref();
    db.srs.insert(
        sr.clone(),
        Sr {
            uuid,
            name_label,
            name_description,
            sr_type,
            content_type,
            shared,
            sm_config,
            physical_size: -1,
            physical_utilisation: -1,
            virtual_allocation: 0,
            ..Sr::default()
        },
    );
    reference(sr)
}

fn assert_all_pbds_unplugged(db: &model::Db, sr: &str) -> ApiResult<()> {
    if db.pbds.values().any(|p| p.sr == sr && p.currently_attached) {
        return Err(ApiError::new("SR_HAS_PBD", [sr]));
    }
    Ok(())
}

/// Drops the SR, its PBDs, its VDIs and their VBDs from the database.
pub fn sr_forget(ctx: &Ctx, sr: &str) -> ApiResult<()> {
    let mut db = ctx.db();
    model::lookup(&db.srs, "SR", sr)?;
    assert_all_pbds_unplugged(&db, sr)?;
    db.pbds.retain(|_, p| p.sr != sr);
    let vdis: BTreeSet<String> = db
        .vdis
        .iter()
        .filter(|(_, v)| v.sr == sr)
        .map(|(r, _)| r.clone())
        .collect();
    db.vdis.retain(|r, _| !vdis.contains(r));
    db.vbds.retain(|_, vbd| !vdis.contains(&vbd.vdi));
    db.srs.remove(sr);
    Ok(())
}

fn sr_destroy(ctx: &Ctx, args: &super::dispatch::Args) -> ApiResult<super::codec::Value> {
    let sr = args.string(0)?;
    let (uuid, device_config) = {
        let db = ctx.db();
        let record = model::lookup(&db.srs, "SR", &sr)?;
        if record.local {
            return Err(ApiError::new("SR_OPERATION_NOT_SUPPORTED", [sr.as_str()]));
        }
        assert_all_pbds_unplugged(&db, &sr)?;
        let config = db
            .pbds
            .values()
            .find(|p| p.sr == sr)
            .map(|p| p.device_config.clone())
            .ok_or_else(|| ApiError::new("SR_NO_PBDS", [sr.as_str()]))?;
        (record.uuid.clone(), config)
    };
    check_nfs_config(ctx, &device_config, &uuid, true)?;
    let dir = storage::sr_dir(&ctx.sim.config.export, &uuid);
    let files = storage::read_vhds(&dir, &[])?;
    if files.values().any(|info| !info.hidden) {
        return Err(ApiError::new("SR_NOT_EMPTY", Vec::<String>::new()));
    }
    let entries =
        std::fs::read_dir(&dir).map_err(|e| storage::backend(76, "NFS delete error", e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| {
            storage::backend(76, "NFS delete error", format!("{}: {e}", path.display()))
        })?;
    }
    std::fs::remove_dir(&dir)
        .map_err(|e| storage::backend(76, "NFS delete error", format!("{}: {e}", dir.display())))?;
    sr_forget(ctx, &sr)?;
    void()
}

/// SR.scan: brings the VDI records in line with the VHD files of the SR directory.
pub fn scan(ctx: &Ctx, sr: &str) -> ApiResult<()> {
    let (uuid, attached_files) = {
        let db = ctx.db();
        let record = model::lookup(&db.srs, "SR", sr)?;
        if record.local {
            return Ok(());
        }
        if !db.pbds.values().any(|p| p.sr == sr && p.currently_attached) {
            return Err(ApiError::new("SR_NO_PBDS", [sr]));
        }
        // Files behind a plugged VBD belong to the "tapdisk" now: keep their records as they are.
        let attached: Vec<String> = db
            .vdis
            .iter()
            .filter(|(r, v)| {
                v.sr == sr
                    && (!v.current_operations.is_empty()
                        || db
                            .vbds
                            .values()
                            .any(|b| b.vdi == **r && b.currently_attached))
            })
            .map(|(_, v)| v.location.clone())
            .collect();
        (record.uuid.clone(), attached)
    };
    let dir = storage::sr_dir(&ctx.sim.config.export, &uuid);
    let files = storage::read_vhds(&dir, &attached_files)?;
    let (size, used) = storage::fs_usage(&dir);

    let mut children: BTreeMap<String, usize> = BTreeMap::new();
    for info in files.values() {
        if let Some(parent) = &info.parent {
            *children.entry(parent.uuid.to_string()).or_default() += 1;
        }
    }
    let mut db = ctx.db();
    let existing: BTreeMap<String, String> = db
        .vdis
        .iter()
        .filter(|(_, v)| v.sr == sr)
        .map(|(r, v)| (v.location.clone(), r.clone()))
        .collect();
    for (file_uuid, info) in &files {
        let is_parent = children.contains_key(file_uuid);
        if info.hidden && !is_parent {
            continue; // a hidden leaf: garbage for the GC
        }
        let path = storage::vhd_path(&ctx.sim.config.export, &uuid, file_uuid);
        let physical = info.file_size as i64;
        let parent = info.parent.as_ref().map(|p| p.uuid.to_string());
        if let Some(handle) = existing.get(file_uuid) {
            let vdi = db.vdis.get_mut(handle).expect("listed above");
            vdi.virtual_size = info.virtual_size as i64;
            vdi.physical_utilisation = physical;
            vdi.managed = !info.hidden;
            if is_parent {
                vdi.read_only = true;
            }
            match &parent {
                Some(p) => {
                    vdi.sm_config.insert("vhd-parent".into(), p.clone());
                }
                None => {
                    vdi.sm_config.remove("vhd-parent");
                }
            }
            continue;
        }
        if db.vdis.values().any(|v| v.uuid == *file_uuid) {
            eprintln!(
                "xenapinfs-sim: SR.scan: {} has the uuid of a VDI in another SR; ignored",
                path.display()
            );
            continue;
        }
        let mut sm_config = Map::new();
        if let Some(p) = parent {
            sm_config.insert("vhd-parent".into(), p);
        }
        db.vdis.insert(
            model::new_ref(),
            Vdi {
                uuid: file_uuid.clone(),
                sr: sr.to_string(),
                virtual_size: info.virtual_size as i64,
                physical_utilisation: physical,
                vdi_type: "user".into(),
                read_only: is_parent,
                sm_config,
                location: file_uuid.clone(),
                managed: !info.hidden,
                ..Vdi::default()
            },
        );
    }
    let gone: Vec<String> = existing
        .iter()
        .filter(|(location, _)| {
            !files.contains_key(*location) && !attached_files.contains(location)
        })
        .map(|(_, handle)| handle.clone())
        .collect();
    for handle in &gone {
        db.vdis.remove(handle);
        db.vbds
            .retain(|_, vbd| vbd.vdi != *handle || vbd.currently_attached);
    }
    let allocation: i64 = db
        .vdis
        .values()
        .filter(|v| v.sr == sr && v.managed)
        .map(|v| v.virtual_size)
        .sum();
    let record = db.srs.get_mut(sr).expect("checked above");
    record.physical_size = size;
    record.physical_utilisation = used;
    record.virtual_allocation = allocation;
    Ok(())
}

fn pbd_create(ctx: &Ctx, args: &super::dispatch::Args) -> ApiResult<super::codec::Value> {
    let record = args.record(0)?;
    let host = record.string("host")?;
    let sr = record.string("SR")?;
    let device_config = record.map("device_config")?;
    let other_config = record.map_or_empty("other_config")?;
    let mut db = ctx.db();
    model::lookup(&db.hosts, "host", &host)?;
    model::lookup(&db.srs, "SR", &sr)?;
    if let Some((existing, _)) = db.pbds.iter().find(|(_, p)| p.sr == sr && p.host == host) {
        return Err(ApiError::new(
            "PBD_EXISTS",
            [sr.as_str(), host.as_str(), existing.as_str()],
        ));
    }
    let pbd = model::new_ref();
    db.pbds.insert(
        pbd.clone(),
        Pbd {
            uuid: model::new_uuid(),
            host,
            sr,
            device_config,
            currently_attached: false,
            other_config,
        },
    );
    reference(pbd)
}

/// PBD.plug: "mounts" the SR directory, then scans it.
pub fn pbd_plug(ctx: &Ctx, pbd: &str) -> ApiResult<()> {
    let (sr, sr_uuid, sr_type, local, device_config) = {
        let db = ctx.db();
        let record = model::lookup(&db.pbds, "PBD", pbd)?;
        if record.currently_attached {
            return Ok(());
        }
        let sr = model::lookup(&db.srs, "SR", &record.sr)?;
        if !sr.shared
            && db
                .pbds
                .values()
                .any(|p| p.sr == record.sr && p.currently_attached && p.host != record.host)
        {
            return Err(ApiError::new(
                "SR_NOT_SHARABLE",
                [record.sr.as_str(), record.host.as_str()],
            ));
        }
        (
            record.sr.clone(),
            sr.uuid.clone(),
            sr.sr_type.clone(),
            sr.local,
            record.device_config.clone(),
        )
    };
    if !local {
        if sr_type != "nfs" {
            return Err(ApiError::new("SR_UNKNOWN_DRIVER", [sr_type]));
        }
        check_nfs_config(ctx, &device_config, &sr_uuid, true)?;
    }
    model::lookup_mut(&mut ctx.db().pbds, "PBD", pbd)?.currently_attached = true;
    if let Err(e) = scan(ctx, &sr) {
        if let Some(record) = ctx.db().pbds.get_mut(pbd) {
            record.currently_attached = false;
        }
        return Err(e);
    }
    Ok(())
}

fn pbd_unplug(ctx: &Ctx, args: &super::dispatch::Args) -> ApiResult<super::codec::Value> {
    let pbd = args.string(0)?;
    let mut db = ctx.db();
    let record = model::lookup(&db.pbds, "PBD", &pbd)?;
    if !record.currently_attached {
        return void();
    }
    let sr = record.sr.clone();
    let in_use: Vec<String> = db
        .vdis
        .iter()
        .filter(|(r, v)| {
            v.sr == sr
                && db
                    .vbds
                    .values()
                    .any(|b| b.vdi == **r && b.currently_attached)
        })
        .map(|(r, _)| r.clone())
        .collect();
    if !in_use.is_empty() {
        return Err(ApiError::new("VDI_IN_USE", in_use));
    }
    model::lookup_mut(&mut db.pbds, "PBD", &pbd)?.currently_attached = false;
    void()
}

fn pbd_destroy(ctx: &Ctx, args: &super::dispatch::Args) -> ApiResult<super::codec::Value> {
    let pbd = args.string(0)?;
    let mut db = ctx.db();
    if model::lookup(&db.pbds, "PBD", &pbd)?.currently_attached {
        return Err(ApiError::operation_not_allowed("PBD is currently attached"));
    }
    db.pbds.remove(&pbd);
    void()
}
