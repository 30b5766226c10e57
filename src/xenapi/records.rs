//! Typed references and records of the XenAPI classes the agent uses.
//!
//! Records are decoded strictly: a missing or mistyped field is a protocol error that names the
//! class and the field, so a simulator or xapi change shows up at once instead of as a default.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use super::codec::Value;

/// A XenAPI class, as named on the wire.
pub trait XenClass {
    const NAME: &'static str;
    type Record: FromRecord;
}

/// `OpaqueRef:...` handle of an object of class `C`. Valid only within the pool's lifetime.
pub struct Ref<C> {
    handle: String,
    class: PhantomData<fn() -> C>,
}

pub const NULL_REF: &str = "OpaqueRef:NULL";

impl<C> Ref<C> {
    pub fn new(handle: impl Into<String>) -> Self {
        Ref {
            handle: handle.into(),
            class: PhantomData,
        }
    }

    pub fn null() -> Self {
        Ref::new(NULL_REF)
    }

    pub fn is_null(&self) -> bool {
        self.handle == NULL_REF || self.handle.is_empty()
    }

    pub fn as_str(&self) -> &str {
        &self.handle
    }

    pub fn to_value(&self) -> Value {
        Value::String(self.handle.clone())
    }
}

impl<C> Clone for Ref<C> {
    fn clone(&self) -> Self {
        Ref::new(self.handle.clone())
    }
}

impl<C> PartialEq for Ref<C> {
    fn eq(&self, other: &Self) -> bool {
        self.handle == other.handle
    }
}

impl<C> Eq for Ref<C> {}

impl<C> std::hash::Hash for Ref<C> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.handle.hash(state)
    }
}

impl<C> fmt::Debug for Ref<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.handle)
    }
}

impl<C> fmt::Display for Ref<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.handle)
    }
}

/// Decodes a record struct.
pub trait FromRecord: Sized {
    fn from_record(fields: &Fields<'_>) -> Result<Self, String>;
}

/// Read access to a record's fields with XenAPI's typing rules (int64 arrives as a string).
pub struct Fields<'a> {
    class: &'static str,
    map: &'a BTreeMap<String, Value>,
}

impl<'a> Fields<'a> {
    pub fn new(class: &'static str, value: &'a Value) -> Result<Self, String> {
        let map = value
            .as_struct()
            .ok_or_else(|| format!("{class} record is not a struct"))?;
        Ok(Fields { class, map })
    }

    fn get(&self, name: &str) -> Result<&'a Value, String> {
        self.map
            .get(name)
            .ok_or_else(|| format!("{} record has no field {name}", self.class))
    }

    fn wrong(&self, name: &str, expected: &str, got: &Value) -> String {
        format!(
            "{} field {name}: expected {expected}, got {got:?}",
            self.class
        )
    }

    pub fn string(&self, name: &str) -> Result<String, String> {
        match self.get(name)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(self.wrong(name, "a string", other)),
        }
    }

    pub fn int(&self, name: &str) -> Result<i64, String> {
        match self.get(name)? {
            Value::String(s) => s
                .trim()
                .parse()
                .map_err(|_| self.wrong(name, "an int64", &Value::String(s.clone()))),
            Value::Int(i) => Ok(i64::from(*i)),
            Value::Int64(i) => Ok(*i),
            other => Err(self.wrong(name, "an int64", other)),
        }
    }

    /// An int64 that cannot be negative here (sizes); xapi uses -1 for "unknown", kept as 0.
    pub fn size(&self, name: &str) -> Result<u64, String> {
        Ok(u64::try_from(self.int(name)?).unwrap_or(0))
    }

    pub fn float(&self, name: &str) -> Result<f64, String> {
        match self.get(name)? {
            Value::Double(d) => Ok(*d),
            Value::Int(i) => Ok(f64::from(*i)),
            Value::Int64(i) => Ok(*i as f64),
            Value::String(s) => s
                .trim()
                .parse()
                .map_err(|_| self.wrong(name, "a float", &Value::String(s.clone()))),
            other => Err(self.wrong(name, "a float", other)),
        }
    }

    pub fn boolean(&self, name: &str) -> Result<bool, String> {
        match self.get(name)? {
            Value::Bool(b) => Ok(*b),
            other => Err(self.wrong(name, "a boolean", other)),
        }
    }

    pub fn reference<C>(&self, name: &str) -> Result<Ref<C>, String> {
        self.string(name).map(Ref::new)
    }

    pub fn references<C>(&self, name: &str) -> Result<Vec<Ref<C>>, String> {
        self.strings(name)
            .map(|all| all.into_iter().map(Ref::new).collect())
    }

    pub fn strings(&self, name: &str) -> Result<Vec<String>, String> {
        match self.get(name)? {
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.wrong(name, "a set of strings", other)),
                })
                .collect(),
            other => Err(self.wrong(name, "an array", other)),
        }
    }

    pub fn string_map(&self, name: &str) -> Result<BTreeMap<String, String>, String> {
        match self.get(name)? {
            Value::Struct(entries) => entries
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    other => Err(self.wrong(name, "a string map", other)),
                })
                .collect(),
            other => Err(self.wrong(name, "a struct", other)),
        }
    }
}

macro_rules! xen_class {
    ($marker:ident, $name:literal, $record:ident) => {
        #[doc = concat!("Marker for the XenAPI class `", $name, "`.")]
        #[derive(Debug, Clone, Copy)]
        pub enum $marker {}
        impl XenClass for $marker {
            const NAME: &'static str = $name;
            type Record = $record;
        }
    };
}

xen_class!(Session, "session", SessionRecord);
xen_class!(Pool, "pool", PoolRecord);
xen_class!(Host, "host", HostRecord);
xen_class!(Vm, "VM", VmRecord);
xen_class!(Sr, "SR", SrRecord);
xen_class!(Pbd, "PBD", PbdRecord);
xen_class!(Vdi, "VDI", VdiRecord);
xen_class!(Vbd, "VBD", VbdRecord);
xen_class!(Task, "task", TaskRecord);

#[derive(Debug, Clone)]
pub struct SessionRecord {
    pub uuid: String,
    pub this_host: Ref<Host>,
}

impl FromRecord for SessionRecord {
    fn from_record(f: &Fields<'_>) -> Result<Self, String> {
        Ok(SessionRecord {
            uuid: f.string("uuid")?,
            this_host: f.reference("this_host")?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct PoolRecord {
    pub uuid: String,
    pub name_label: String,
    pub master: Ref<Host>,
}

impl FromRecord for PoolRecord {
    fn from_record(f: &Fields<'_>) -> Result<Self, String> {
        Ok(PoolRecord {
            uuid: f.string("uuid")?,
            name_label: f.string("name_label")?,
            master: f.reference("master")?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct HostRecord {
    pub uuid: String,
    pub name_label: String,
    pub address: String,
}

impl FromRecord for HostRecord {
    fn from_record(f: &Fields<'_>) -> Result<Self, String> {
        Ok(HostRecord {
            uuid: f.string("uuid")?,
            name_label: f.string("name_label")?,
            address: f.string("address")?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct VmRecord {
    pub uuid: String,
    pub name_label: String,
    pub power_state: String,
    pub resident_on: Ref<Host>,
    pub is_control_domain: bool,
    pub vbds: Vec<Ref<Vbd>>,
}

impl FromRecord for VmRecord {
    fn from_record(f: &Fields<'_>) -> Result<Self, String> {
        Ok(VmRecord {
            uuid: f.string("uuid")?,
            name_label: f.string("name_label")?,
            power_state: f.string("power_state")?,
            resident_on: f.reference("resident_on")?,
            is_control_domain: f.boolean("is_control_domain")?,
            vbds: f.references("VBDs")?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct SrRecord {
    pub uuid: String,
    pub name_label: String,
    pub name_description: String,
    pub sr_type: String,
    pub content_type: String,
    pub shared: bool,
    pub pbds: Vec<Ref<Pbd>>,
    pub vdis: Vec<Ref<Vdi>>,
    pub physical_size: u64,
    pub physical_utilisation: u64,
    pub virtual_allocation: u64,
    pub other_config: BTreeMap<String, String>,
    pub sm_config: BTreeMap<String, String>,
}

impl FromRecord for SrRecord {
    fn from_record(f: &Fields<'_>) -> Result<Self, String> {
        Ok(SrRecord {
            uuid: f.string("uuid")?,
            name_label: f.string("name_label")?,
            name_description: f.string("name_description")?,
            sr_type: f.string("type")?,
            content_type: f.string("content_type")?,
            shared: f.boolean("shared")?,
            pbds: f.references("PBDs")?,
            vdis: f.references("VDIs")?,
            physical_size: f.size("physical_size")?,
            physical_utilisation: f.size("physical_utilisation")?,
            virtual_allocation: f.size("virtual_allocation")?,
            other_config: f.string_map("other_config")?,
            sm_config: f.string_map("sm_config")?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct PbdRecord {
    pub uuid: String,
    pub host: Ref<Host>,
    pub sr: Ref<Sr>,
    pub device_config: BTreeMap<String, String>,
    pub currently_attached: bool,
    pub other_config: BTreeMap<String, String>,
}

impl FromRecord for PbdRecord {
    fn from_record(f: &Fields<'_>) -> Result<Self, String> {
        Ok(PbdRecord {
            uuid: f.string("uuid")?,
            host: f.reference("host")?,
            sr: f.reference("SR")?,
            device_config: f.string_map("device_config")?,
            currently_attached: f.boolean("currently_attached")?,
            other_config: f.string_map("other_config")?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct VdiRecord {
    pub uuid: String,
    pub name_label: String,
    pub name_description: String,
    pub sr: Ref<Sr>,
    pub vbds: Vec<Ref<Vbd>>,
    pub virtual_size: u64,
    pub physical_utilisation: u64,
    pub vdi_type: String,
    pub sharable: bool,
    pub read_only: bool,
    pub managed: bool,
    pub location: String,
    pub other_config: BTreeMap<String, String>,
    pub sm_config: BTreeMap<String, String>,
}

impl FromRecord for VdiRecord {
    fn from_record(f: &Fields<'_>) -> Result<Self, String> {
        Ok(VdiRecord {
            uuid: f.string("uuid")?,
            name_label: f.string("name_label")?,
            name_description: f.string("name_description")?,
            sr: f.reference("SR")?,
            vbds: f.references("VBDs")?,
            virtual_size: f.size("virtual_size")?,
            physical_utilisation: f.size("physical_utilisation")?,
            vdi_type: f.string("type")?,
            sharable: f.boolean("sharable")?,
            read_only: f.boolean("read_only")?,
            managed: f.boolean("managed")?,
            location: f.string("location")?,
            other_config: f.string_map("other_config")?,
            sm_config: f.string_map("sm_config")?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct VbdRecord {
    pub uuid: String,
    pub vm: Ref<Vm>,
    pub vdi: Ref<Vdi>,
    pub device: String,
    pub userdevice: String,
    pub mode: String,
    pub vbd_type: String,
    pub currently_attached: bool,
    pub empty: bool,
    pub other_config: BTreeMap<String, String>,
}

impl FromRecord for VbdRecord {
    fn from_record(f: &Fields<'_>) -> Result<Self, String> {
        Ok(VbdRecord {
            uuid: f.string("uuid")?,
            vm: f.reference("VM")?,
            vdi: f.reference("VDI")?,
            device: f.string("device")?,
            userdevice: f.string("userdevice")?,
            mode: f.string("mode")?,
            vbd_type: f.string("type")?,
            currently_attached: f.boolean("currently_attached")?,
            empty: f.boolean("empty")?,
            other_config: f.string_map("other_config")?,
        })
    }
}

/// `task.status` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    Pending,
    Success,
    Failure,
    Cancelling,
    Cancelled,
}

impl TaskStatus {
    fn parse(text: &str) -> Result<Self, String> {
        Ok(match text.to_ascii_lowercase().as_str() {
            "pending" => TaskStatus::Pending,
            "success" => TaskStatus::Success,
            "failure" => TaskStatus::Failure,
            "cancelling" => TaskStatus::Cancelling,
            "cancelled" => TaskStatus::Cancelled,
            other => return Err(format!("task field status: unknown value {other:?}")),
        })
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TaskStatus::Success | TaskStatus::Failure | TaskStatus::Cancelled
        )
    }
}

#[derive(Debug, Clone)]
pub struct TaskRecord {
    pub uuid: String,
    pub name_label: String,
    pub status: TaskStatus,
    pub progress: f64,
    pub result: String,
    pub error_info: Vec<String>,
}

impl FromRecord for TaskRecord {
    fn from_record(f: &Fields<'_>) -> Result<Self, String> {
        Ok(TaskRecord {
            uuid: f.string("uuid")?,
            name_label: f.string("name_label")?,
            status: TaskStatus::parse(&f.string("status")?)?,
            progress: f.float("progress")?,
            result: f.string("result")?,
            error_info: f.strings("error_info")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(entries: &[(&str, Value)]) -> Value {
        Value::Struct(
            entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    #[test]
    fn int64_fields_arrive_as_strings_and_are_decoded() {
        let value = record(&[("virtual_size", Value::String("10737418240".into()))]);
        let fields = Fields::new("VDI", &value).unwrap();
        assert_eq!(fields.size("virtual_size").unwrap(), 10 << 30);
    }

    #[test]
    fn missing_and_mistyped_fields_name_class_and_field() {
        let value = record(&[("shared", Value::String("yes".into()))]);
        let fields = Fields::new("SR", &value).unwrap();
        assert_eq!(
            fields.string("uuid").unwrap_err(),
            "SR record has no field uuid"
        );
        assert!(
            fields
                .boolean("shared")
                .unwrap_err()
                .starts_with("SR field shared: expected a boolean")
        );
    }

    #[test]
    fn null_refs_are_recognised() {
        assert!(Ref::<Host>::new(NULL_REF).is_null());
        assert!(!Ref::<Host>::new("OpaqueRef:1").is_null());
    }
}
