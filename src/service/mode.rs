//! Local or remote mode: is this agent a guest of the XenServer host it talks to?

use std::path::Path;

use serde::Serialize;

use crate::config::Mode;
use crate::xenapi::{Ref, Vm, XenApiClient, XenApiError};

/// The mode in force and why, as reported in status.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    pub mode: Mode,
    pub reason: String,
    /// This VM's uuid, in local mode.
    pub vm_uuid: Option<String>,
    #[serde(skip)]
    pub vm: Option<Ref<Vm>>,
}

impl ModeReport {
    fn remote(reason: String) -> Self {
        ModeReport {
            mode: Mode::Remote,
            reason,
            vm_uuid: None,
            vm: None,
        }
    }
}

/// Decides the mode. `configured` is the `mode` setting; `auto` looks up this VM (first line
/// of `hypervisor_uuid_path`) in XenAPI and checks that it runs on the controller, the pool
/// master this agent talks to. `local` insists on the same checks and fails when they fail.
pub async fn detect(
    configured: Mode,
    uuid_path: &Path,
    xenapi: &XenApiClient,
) -> Result<ModeReport, XenApiError> {
    if configured == Mode::Remote {
        return Ok(ModeReport::remote(
            "mode = remote in the configuration".into(),
        ));
    }
    let outcome = find_own_vm(uuid_path, xenapi).await?;
    match (outcome, configured) {
        (Ok((vm, uuid)), _) => Ok(ModeReport {
            mode: Mode::Local,
            reason: format!("this VM ({uuid}) runs on the XenServer host"),
            vm_uuid: Some(uuid),
            vm: Some(vm),
        }),
        (Err(why), Mode::Local) => Err(XenApiError::Protocol {
            method: "mode detection".into(),
            reason: format!("mode = local, but {why}"),
        }),
        (Err(why), _) => Ok(ModeReport::remote(why)),
    }
}

/// `Ok(Ok(vm))` when this VM is a guest of the controller, `Ok(Err(reason))` when it is not.
async fn find_own_vm(
    uuid_path: &Path,
    xenapi: &XenApiClient,
) -> Result<Result<(Ref<Vm>, String), String>, XenApiError> {
    let uuid = match std::fs::read_to_string(uuid_path) {
        Ok(text) => text.lines().next().unwrap_or("").trim().to_string(),
        Err(e) => {
            return Ok(Err(format!(
                "cannot read {}: {e} (not a Xen guest?)",
                uuid_path.display()
            )));
        }
    };
    if uuid::Uuid::parse_str(&uuid).is_err() {
        return Ok(Err(format!(
            "{} does not hold a VM uuid",
            uuid_path.display()
        )));
    }
    let vm = match xenapi.get_by_uuid::<Vm>(&uuid).await {
        Ok(vm) => vm,
        Err(e) if e.is("UUID_INVALID") => {
            return Ok(Err(format!("VM {uuid} is not known to the XenServer pool")));
        }
        Err(e) => return Err(e),
    };
    let resident_on = xenapi.vm_resident_on(&vm).await?;
    let master = xenapi.pool_master().await?;
    if resident_on.is_null() {
        return Ok(Err(format!("VM {uuid} is not running on any host")));
    }
    if resident_on != master {
        return Ok(Err(format!(
            "VM {uuid} runs on another pool member than the controller"
        )));
    }
    Ok(Ok((vm, uuid)))
}
