//! Typed helpers for the calls the agent makes. Argument order and types follow the XenAPI
//! datamodel; int64 arguments go as decimal strings, as xapi expects.

use std::collections::BTreeMap;

use super::client::XenApiClient;
use super::codec::{Value, int64, string_map};
use super::error::XenApiError;
use super::records::*;

/// Fields of a new VDI (`VDI.create`).
#[derive(Debug, Clone)]
pub struct NewVdi<'a> {
    pub sr: &'a Ref<Sr>,
    pub name_label: &'a str,
    pub name_description: &'a str,
    pub virtual_size: u64,
    pub other_config: &'a BTreeMap<String, String>,
}

/// Fields of a new VBD (`VBD.create`); `userdevice` is `"autodetect"` to let xapi choose.
#[derive(Debug, Clone)]
pub struct NewVbd<'a> {
    pub vm: &'a Ref<Vm>,
    pub vdi: &'a Ref<Vdi>,
    pub userdevice: &'a str,
    pub read_only: bool,
    pub other_config: &'a BTreeMap<String, String>,
}

/// Fields shared by `SR.create` and `SR.introduce`.
#[derive(Debug, Clone)]
pub struct SrSpec<'a> {
    pub name_label: &'a str,
    pub name_description: &'a str,
    pub sr_type: &'a str,
    pub content_type: &'a str,
    pub shared: bool,
}

fn map_value(map: &BTreeMap<String, String>) -> Value {
    string_map(map.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

fn protocol(method: &str, reason: String) -> XenApiError {
    XenApiError::Protocol {
        method: method.to_string(),
        reason,
    }
}

impl XenApiClient {
    async fn call_ref<C>(&self, method: &str, args: &[Value]) -> Result<Ref<C>, XenApiError> {
        let value = self.call(method, args).await?;
        match value {
            Value::String(handle) if handle.starts_with("OpaqueRef:") => Ok(Ref::new(handle)),
            other => Err(protocol(
                method,
                format!("expected a reference, got {other:?}"),
            )),
        }
    }

    async fn call_string(&self, method: &str, args: &[Value]) -> Result<String, XenApiError> {
        match self.call(method, args).await? {
            Value::String(s) => Ok(s),
            other => Err(protocol(
                method,
                format!("expected a string, got {other:?}"),
            )),
        }
    }

    async fn call_void(&self, method: &str, args: &[Value]) -> Result<(), XenApiError> {
        self.call(method, args).await.map(|_| ())
    }

    /// `<Class>.get_record`.
    pub async fn get_record<C: XenClass>(&self, object: &Ref<C>) -> Result<C::Record, XenApiError> {
        let method = format!("{}.get_record", C::NAME);
        let value = self.call(&method, &[object.to_value()]).await?;
        decode_record::<C>(&method, &value)
    }

    /// `<Class>.get_by_uuid`.
    pub async fn get_by_uuid<C: XenClass>(&self, uuid: &str) -> Result<Ref<C>, XenApiError> {
        self.call_ref(
            &format!("{}.get_by_uuid", C::NAME),
            &[Value::String(uuid.into())],
        )
        .await
    }

    /// `<Class>.get_all`.
    pub async fn get_all<C: XenClass>(&self) -> Result<Vec<Ref<C>>, XenApiError> {
        let method = format!("{}.get_all", C::NAME);
        match self.call(&method, &[]).await? {
            Value::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(s) => Ok(Ref::new(s)),
                    other => Err(protocol(
                        &method,
                        format!("expected references, got {other:?}"),
                    )),
                })
                .collect(),
            other => Err(protocol(
                &method,
                format!("expected an array, got {other:?}"),
            )),
        }
    }

    /// `<Class>.get_all_records`, keyed by reference.
    pub async fn get_all_records<C: XenClass>(
        &self,
    ) -> Result<Vec<(Ref<C>, C::Record)>, XenApiError> {
        let method = format!("{}.get_all_records", C::NAME);
        match self.call(&method, &[]).await? {
            Value::Struct(entries) => entries
                .iter()
                .map(|(handle, value)| {
                    Ok((
                        Ref::new(handle.clone()),
                        decode_record::<C>(&method, value)?,
                    ))
                })
                .collect(),
            other => Err(protocol(
                &method,
                format!("expected a struct, got {other:?}"),
            )),
        }
    }

    pub async fn session_this_host(&self) -> Result<Ref<Host>, XenApiError> {
        let method = "session.get_this_host";
        match self.call_on_own_session(method).await? {
            Value::String(handle) if handle.starts_with("OpaqueRef:") => Ok(Ref::new(handle)),
            other => Err(protocol(
                method,
                format!("expected a reference, got {other:?}"),
            )),
        }
    }

    pub async fn pool_master(&self) -> Result<Ref<Host>, XenApiError> {
        let pools = self.get_all::<Pool>().await?;
        let pool = pools
            .first()
            .ok_or_else(|| protocol("pool.get_all", "no pool object".into()))?;
        self.call_ref("pool.get_master", &[pool.to_value()]).await
    }

    pub async fn vm_resident_on(&self, vm: &Ref<Vm>) -> Result<Ref<Host>, XenApiError> {
        self.call_ref("VM.get_resident_on", &[vm.to_value()]).await
    }

    pub async fn sr_create(
        &self,
        host: &Ref<Host>,
        device_config: &BTreeMap<String, String>,
        spec: &SrSpec<'_>,
        sm_config: &BTreeMap<String, String>,
    ) -> Result<Ref<Sr>, XenApiError> {
        self.call_ref(
            "SR.create",
            &[
                host.to_value(),
                map_value(device_config),
                int64(0),
                Value::String(spec.name_label.into()),
                Value::String(spec.name_description.into()),
                Value::String(spec.sr_type.into()),
                Value::String(spec.content_type.into()),
                Value::Bool(spec.shared),
                map_value(sm_config),
            ],
        )
        .await
    }

    pub async fn sr_introduce(
        &self,
        uuid: &str,
        spec: &SrSpec<'_>,
    ) -> Result<Ref<Sr>, XenApiError> {
        self.call_ref(
            "SR.introduce",
            &[
                Value::String(uuid.into()),
                Value::String(spec.name_label.into()),
                Value::String(spec.name_description.into()),
                Value::String(spec.sr_type.into()),
                Value::String(spec.content_type.into()),
                Value::Bool(spec.shared),
                map_value(&BTreeMap::new()),
            ],
        )
        .await
    }

    pub async fn sr_scan(&self, sr: &Ref<Sr>) -> Result<(), XenApiError> {
        self.call_void("SR.scan", &[sr.to_value()]).await
    }

    pub async fn sr_forget(&self, sr: &Ref<Sr>) -> Result<(), XenApiError> {
        self.call_void("SR.forget", &[sr.to_value()]).await
    }

    pub async fn sr_destroy(&self, sr: &Ref<Sr>) -> Result<(), XenApiError> {
        self.call_void("SR.destroy", &[sr.to_value()]).await
    }

    pub async fn pbd_create(
        &self,
        host: &Ref<Host>,
        sr: &Ref<Sr>,
        device_config: &BTreeMap<String, String>,
    ) -> Result<Ref<Pbd>, XenApiError> {
        let record = Value::Struct(BTreeMap::from([
            ("host".to_string(), host.to_value()),
            ("SR".to_string(), sr.to_value()),
            ("device_config".to_string(), map_value(device_config)),
            ("other_config".to_string(), map_value(&BTreeMap::new())),
        ]));
        self.call_ref("PBD.create", &[record]).await
    }

    pub async fn pbd_plug(&self, pbd: &Ref<Pbd>) -> Result<(), XenApiError> {
        self.call_void("PBD.plug", &[pbd.to_value()]).await
    }

    pub async fn pbd_unplug(&self, pbd: &Ref<Pbd>) -> Result<(), XenApiError> {
        self.call_void("PBD.unplug", &[pbd.to_value()]).await
    }

    pub async fn pbd_destroy(&self, pbd: &Ref<Pbd>) -> Result<(), XenApiError> {
        self.call_void("PBD.destroy", &[pbd.to_value()]).await
    }

    pub async fn vdi_create(&self, new: &NewVdi<'_>) -> Result<Ref<Vdi>, XenApiError> {
        let record = Value::Struct(BTreeMap::from([
            ("SR".to_string(), new.sr.to_value()),
            (
                "name_label".to_string(),
                Value::String(new.name_label.into()),
            ),
            (
                "name_description".to_string(),
                Value::String(new.name_description.into()),
            ),
            (
                "virtual_size".to_string(),
                int64(size_arg(new.virtual_size)),
            ),
            ("type".to_string(), Value::String("user".into())),
            ("sharable".to_string(), Value::Bool(false)),
            ("read_only".to_string(), Value::Bool(false)),
            ("other_config".to_string(), map_value(new.other_config)),
            ("xenstore_data".to_string(), map_value(&BTreeMap::new())),
            ("sm_config".to_string(), map_value(&BTreeMap::new())),
            ("tags".to_string(), Value::Array(Vec::new())),
        ]));
        self.call_ref("VDI.create", &[record]).await
    }

    pub async fn vdi_destroy(&self, vdi: &Ref<Vdi>) -> Result<(), XenApiError> {
        self.call_void("VDI.destroy", &[vdi.to_value()]).await
    }

    pub async fn vdi_resize(&self, vdi: &Ref<Vdi>, size: u64) -> Result<(), XenApiError> {
        self.call_void("VDI.resize", &[vdi.to_value(), int64(size_arg(size))])
            .await
    }

    /// `Async.VDI.copy` into another SR; wait for the task with [`XenApiClient::wait_task`].
    pub async fn vdi_copy_async(
        &self,
        vdi: &Ref<Vdi>,
        into: &Ref<Sr>,
    ) -> Result<Ref<Task>, XenApiError> {
        self.call_ref("Async.VDI.copy", &[vdi.to_value(), into.to_value()])
            .await
    }

    pub async fn vdi_set_name_label(&self, vdi: &Ref<Vdi>, name: &str) -> Result<(), XenApiError> {
        self.call_void(
            "VDI.set_name_label",
            &[vdi.to_value(), Value::String(name.into())],
        )
        .await
    }

    pub async fn vdi_set_name_description(
        &self,
        vdi: &Ref<Vdi>,
        text: &str,
    ) -> Result<(), XenApiError> {
        self.call_void(
            "VDI.set_name_description",
            &[vdi.to_value(), Value::String(text.into())],
        )
        .await
    }

    pub async fn vbd_create(&self, new: &NewVbd<'_>) -> Result<Ref<Vbd>, XenApiError> {
        let record = Value::Struct(BTreeMap::from([
            ("VM".to_string(), new.vm.to_value()),
            ("VDI".to_string(), new.vdi.to_value()),
            (
                "userdevice".to_string(),
                Value::String(new.userdevice.into()),
            ),
            ("bootable".to_string(), Value::Bool(false)),
            (
                "mode".to_string(),
                Value::String(if new.read_only { "RO" } else { "RW" }.into()),
            ),
            ("type".to_string(), Value::String("Disk".into())),
            ("unpluggable".to_string(), Value::Bool(true)),
            ("empty".to_string(), Value::Bool(false)),
            ("other_config".to_string(), map_value(new.other_config)),
            (
                "qos_algorithm_type".to_string(),
                Value::String(String::new()),
            ),
            (
                "qos_algorithm_params".to_string(),
                map_value(&BTreeMap::new()),
            ),
        ]));
        self.call_ref("VBD.create", &[record]).await
    }

    pub async fn vbd_plug(&self, vbd: &Ref<Vbd>) -> Result<(), XenApiError> {
        self.call_void("VBD.plug", &[vbd.to_value()]).await
    }

    pub async fn vbd_unplug(&self, vbd: &Ref<Vbd>) -> Result<(), XenApiError> {
        self.call_void("VBD.unplug", &[vbd.to_value()]).await
    }

    pub async fn vbd_destroy(&self, vbd: &Ref<Vbd>) -> Result<(), XenApiError> {
        self.call_void("VBD.destroy", &[vbd.to_value()]).await
    }

    pub async fn vbd_get_device(&self, vbd: &Ref<Vbd>) -> Result<String, XenApiError> {
        self.call_string("VBD.get_device", &[vbd.to_value()]).await
    }

    pub async fn task_cancel(&self, task: &Ref<Task>) -> Result<(), XenApiError> {
        self.call_void("task.cancel", &[task.to_value()]).await
    }

    pub async fn task_destroy(&self, task: &Ref<Task>) -> Result<(), XenApiError> {
        self.call_void("task.destroy", &[task.to_value()]).await
    }
}

/// Sizes are int64 on the wire; anything larger than i64::MAX is not a real disk.
fn size_arg(size: u64) -> i64 {
    i64::try_from(size).unwrap_or(i64::MAX)
}

pub(crate) fn decode_record<C: XenClass>(
    method: &str,
    value: &Value,
) -> Result<C::Record, XenApiError> {
    Fields::new(C::NAME, value)
        .and_then(|fields| C::Record::from_record(&fields))
        .map_err(|reason| protocol(method, reason))
}
