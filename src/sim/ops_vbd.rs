//! VBD messages (and the VM ones that go with them). Plugging a VBD of the appliance VM exposes
//! its VDI as `DEV_DIR/<device>` through [`super::devices`].

use super::classes::{reference, void};
use super::codec::Value;
use super::dispatch::{Args, Ctx, Methods};
use super::error::{ApiError, ApiResult};
use super::model::{self, Db, NULL_REF, Vbd};
use super::storage;

/// xapi's device range for HVM/PV guests with PV drivers.
const MAX_USERDEVICE: u32 = 254;

pub fn register(m: &mut Methods) {
    m.add("VBD.create", 1, 1, true, vbd_create);
    m.add("VBD.plug", 1, 1, true, vbd_plug);
    m.add("VBD.unplug", 1, 1, true, |ctx, args| {
        vbd_unplug(ctx, args, false)
    });
    m.add("VBD.unplug_force", 1, 1, true, |ctx, args| {
        vbd_unplug(ctx, args, true)
    });
    m.add("VBD.destroy", 1, 1, true, vbd_destroy);
    m.add("VM.get_allowed_VBD_devices", 1, 1, false, |ctx, args| {
        let vm = args.string(0)?;
        let db = ctx.db();
        model::lookup(&db.vms, "VM", &vm)?;
        Ok(model::strings(
            free_devices(&db, &vm).iter().map(u32::to_string),
        ))
    });
}

fn free_devices(db: &Db, vm: &str) -> Vec<u32> {
    let used: Vec<u32> = db
        .vbds
        .values()
        .filter(|b| b.vm == vm)
        .filter_map(|b| b.userdevice.parse().ok())
        .collect();
    (0..=MAX_USERDEVICE).filter(|n| !used.contains(n)).collect()
}

fn vbd_create(ctx: &Ctx, args: &Args) -> ApiResult<Value> {
    let record = args.record(0)?;
    let vm = record.string("VM")?;
    let vdi = record.string("VDI")?;
    let userdevice = record.string("userdevice")?;
    let bootable = record.bool("bootable")?;
    let mode = record.enumeration("mode", &["RO", "RW"])?;
    let vbd_type = record.enumeration("type", &["CD", "Disk", "Floppy"])?;
    let unpluggable = record.bool_or("unpluggable", true)?;
    let empty = record.bool("empty")?;
    let other_config = record.map("other_config")?;
    let qos_algorithm_type = record.string("qos_algorithm_type")?;
    let qos_algorithm_params = record.map("qos_algorithm_params")?;
    let _global = ctx
        .sim
        .vbd_create_lock
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut db = ctx.db();
    model::lookup(&db.vms, "VM", &vm)?;
    if !empty || vdi != NULL_REF {
        let vdi_record = model::lookup(&db.vdis, "VDI", &vdi)?;
        if vdi_record.read_only && mode == "RW" {
            return Err(ApiError::new("VDI_READONLY", [vdi.as_str()]));
        }
    }
    if empty && vbd_type != "CD" {
        return Err(ApiError::new("VBD_NOT_REMOVABLE_MEDIA", ["in constructor"]));
    }
    if vbd_type == "CD" && mode == "RW" {
        return Err(ApiError::new(
            "VBD_CDS_MUST_BE_READONLY",
            Vec::<String>::new(),
        ));
    }
    let free = free_devices(&db, &vm);
    let number = if userdevice == "autodetect" {
        *free
            .first()
            .ok_or_else(|| ApiError::new("INVALID_DEVICE", [userdevice.as_str()]))?
    } else {
        let n: u32 = userdevice
            .parse()
            .ok()
            .filter(|n| *n <= MAX_USERDEVICE)
            .ok_or_else(|| ApiError::new("INVALID_DEVICE", [userdevice.as_str()]))?;
        if !free.contains(&n) {
            return Err(ApiError::new(
                "DEVICE_ALREADY_EXISTS",
                [userdevice.as_str()],
            ));
        }
        n
    };
    let handle = model::new_ref();
    db.vbds.insert(
        handle.clone(),
        Vbd {
            uuid: model::new_uuid(),
            vm,
            vdi,
            device: String::new(),
            userdevice: number.to_string(),
            bootable,
            mode: mode.into(),
            vbd_type: vbd_type.into(),
            unpluggable,
            empty,
            other_config,
            currently_attached: false,
            qos_algorithm_type,
            qos_algorithm_params,
            current_operations: Default::default(),
        },
    );
    reference(handle)
}

fn assert_vm_running(db: &Db, vm: &str) -> ApiResult<bool> {
    let record = model::lookup(&db.vms, "VM", vm)?;
    if record.power_state != "Running" {
        return Err(ApiError::new(
            "VM_BAD_POWER_STATE",
            [vm, "running", &record.power_state.to_lowercase()],
        ));
    }
    Ok(record.is_appliance)
}

fn assert_no_operation(vbd: &str, record: &Vbd) -> ApiResult<()> {
    if let Some((_, op)) = record.current_operations.iter().next() {
        return Err(ApiError::new(
            "OTHER_OPERATION_IN_PROGRESS",
            ["VBD", vbd, op.as_str()],
        ));
    }
    Ok(())
}

fn vbd_plug(ctx: &Ctx, args: &Args) -> ApiResult<Value> {
    let vbd = args.string(0)?;
    let operation = ctx.operation_id();
    let (vdi, path, device, read_only, appliance) = {
        let mut db = ctx.db();
        let record = model::lookup(&db.vbds, "VBD", &vbd)?.clone();
        assert_no_operation(&vbd, &record)?;
        let appliance = assert_vm_running(&db, &record.vm)?;
        if record.currently_attached {
            return Err(ApiError::new("DEVICE_ALREADY_ATTACHED", [vbd.as_str()]));
        }
        let vdi = model::lookup(&db.vdis, "VDI", &record.vdi)?.clone();
        let rw = record.mode == "RW";
        let others: Vec<&Vbd> = db
            .vbds
            .iter()
            .filter(|(r, b)| **r != vbd && b.vdi == record.vdi && b.currently_attached)
            .map(|(_, b)| b)
            .filter(|b| !db.vms.get(&b.vm).is_some_and(|vm| vm.is_control_domain))
            .collect();
        let someone_writes = others.iter().any(|b| b.mode == "RW");
        let system_domain = db
            .vms
            .get(&record.vm)
            .is_some_and(|vm| vm.is_control_domain);
        if !vdi.sharable && !system_domain && (someone_writes || (rw && !others.is_empty())) {
            return Err(ApiError::new("VDI_IN_USE", [record.vdi.as_str()]));
        }
        if rw && vdi.read_only {
            return Err(ApiError::new("VDI_READONLY", [record.vdi.as_str()]));
        }
        let sr = model::lookup(&db.srs, "SR", &vdi.sr)?;
        if !db
            .pbds
            .values()
            .any(|p| p.sr == vdi.sr && p.currently_attached)
        {
            return Err(ApiError::new("SR_NO_PBDS", [vdi.sr.as_str()]));
        }
        let path =
            (!sr.local).then(|| storage::vhd_path(&ctx.sim.config.export, &sr.uuid, &vdi.location));
        let number: u32 = record.userdevice.parse().unwrap_or(0);
        model::lookup_mut(&mut db.vbds, "VBD", &vbd)?
            .current_operations
            .insert(operation.clone(), "plug".into());
        (
            record.vdi.clone(),
            path,
            model::linux_device(number),
            !rw,
            appliance,
        )
    };
    let exposed = match (&path, appliance) {
        (Some(path), true) => ctx.sim.devices.expose(&vbd, path, &device, read_only),
        _ => Ok(()),
    };
    let mut db = ctx.db();
    let master = db.master.clone();
    let record = model::lookup_mut(&mut db.vbds, "VBD", &vbd)?;
    record.current_operations.remove(&operation);
    if let Err(e) = exposed {
        return Err(ApiError::internal(format!("VBD.plug: {e}")));
    }
    record.currently_attached = true;
    record.device = device;
    if let Some(v) = db.vdis.get_mut(&vdi) {
        v.sm_config.insert(
            format!("host_{master}"),
            if read_only { "RO" } else { "RW" }.into(),
        );
    }
    void()
}

fn vbd_unplug(ctx: &Ctx, args: &Args, force: bool) -> ApiResult<Value> {
    let vbd = args.string(0)?;
    let operation = ctx.operation_id();
    let vdi = {
        let mut db = ctx.db();
        let record = model::lookup(&db.vbds, "VBD", &vbd)?.clone();
        assert_no_operation(&vbd, &record)?;
        if !record.unpluggable {
            return Err(ApiError::new("VBD_NOT_UNPLUGGABLE", [vbd.as_str()]));
        }
        assert_vm_running(&db, &record.vm)?;
        if !record.currently_attached {
            return Err(ApiError::new("DEVICE_ALREADY_DETACHED", [vbd.as_str()]));
        }
        model::lookup_mut(&mut db.vbds, "VBD", &vbd)?
            .current_operations
            .insert(
                operation.clone(),
                if force { "unplug_force" } else { "unplug" }.into(),
            );
        record.vdi
    };
    let withdrawn = ctx.sim.devices.withdraw(&vbd);
    let mut db = ctx.db();
    let master = db.master.clone();
    let record = model::lookup_mut(&mut db.vbds, "VBD", &vbd)?;
    record.current_operations.remove(&operation);
    record.currently_attached = false;
    if let Some(v) = db.vdis.get_mut(&vdi) {
        v.sm_config.remove(&format!("host_{master}"));
    }
    drop(db);
    if let Err(e) = withdrawn {
        eprintln!("xenapinfs-sim: VBD.unplug {vbd}: {e}");
        return Err(ApiError::internal(format!("VBD.unplug: {e}")));
    }
    refresh_vdi(ctx, &vdi);
    void()
}

/// Re-reads a VDI's file after the guest may have changed it.
fn refresh_vdi(ctx: &Ctx, vdi: &str) {
    let path = {
        let db = ctx.db();
        let Some(record) = db.vdis.get(vdi) else {
            return;
        };
        let Some(sr) = db.srs.get(&record.sr).filter(|s| !s.local) else {
            return;
        };
        storage::vhd_path(&ctx.sim.config.export, &sr.uuid, &record.location)
    };
    if let Ok(info) = crate::vhd::inspect(&path)
        && let Some(record) = ctx.db().vdis.get_mut(vdi)
    {
        record.physical_utilisation = info.file_size as i64;
        record.virtual_size = info.virtual_size as i64;
        if info.parent.is_none() {
            record.sm_config.remove("vhd-parent");
        }
    }
}

fn vbd_destroy(ctx: &Ctx, args: &Args) -> ApiResult<Value> {
    let vbd = args.string(0)?;
    let mut db = ctx.db();
    let record = model::lookup(&db.vbds, "VBD", &vbd)?;
    assert_no_operation(&vbd, record)?;
    if record.currently_attached {
        let vm_uuid = db
            .vms
            .get(&record.vm)
            .map(|v| v.uuid.clone())
            .unwrap_or_default();
        return Err(ApiError::operation_not_allowed(format!(
            "VBD '{}' still attached to '{vm_uuid}'",
            record.uuid
        )));
    }
    db.vbds.remove(&vbd);
    void()
}

/// Unplugs every plugged VBD of the appliance (at shutdown), keeping the records consistent.
pub fn unplug_all(sim: &super::state::SimState) -> Vec<String> {
    let errors = sim.devices.withdraw_all();
    let mut db = sim
        .db
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let appliance: Vec<String> = db
        .vms
        .iter()
        .filter(|(_, v)| v.is_appliance)
        .map(|(r, _)| r.clone())
        .collect();
    for vbd in db.vbds.values_mut() {
        if appliance.contains(&vbd.vm) && vbd.unpluggable {
            vbd.currently_attached = false;
        }
    }
    errors
}
