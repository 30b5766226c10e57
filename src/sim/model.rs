//! The simulator's database: one table per XenAPI class, records rendered with the fields and
//! value shapes xapi uses (int64 as [`Value::Int64`], so bare digits on the wire; references as
//! `OpaqueRef:` strings; `OpaqueRef:NULL` for none; epoch for unset dates).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::codec::{self, Value};
use super::error::{ApiError, ApiResult};

pub const NULL_REF: &str = "OpaqueRef:NULL";

pub type Map = BTreeMap<String, String>;
pub type Record = BTreeMap<String, Value>;

pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn new_ref() -> String {
    format!("OpaqueRef:{}", uuid::Uuid::new_v4())
}

pub(crate) fn s(text: &str) -> Value {
    Value::String(text.to_string())
}

pub(crate) fn int(n: i64) -> Value {
    Value::Int64(n)
}

pub(crate) fn map(m: &Map) -> Value {
    Value::Struct(m.iter().map(|(k, v)| (k.clone(), s(v))).collect())
}

pub(crate) fn strings<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> Value {
    Value::Array(items.into_iter().map(|x| s(x.as_ref())).collect())
}

fn empty_map() -> Value {
    Value::Struct(BTreeMap::new())
}

fn empty_set() -> Value {
    Value::Array(Vec::new())
}

fn record<const N: usize>(fields: [(&str, Value); N]) -> Record {
    fields
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

#[derive(Debug, Clone, Default)]
pub struct Pool {
    pub uuid: String,
    pub name_label: String,
    pub master: String,
    pub other_config: Map,
}

#[derive(Debug, Clone, Default)]
pub struct Host {
    pub uuid: String,
    pub name_label: String,
    pub hostname: String,
    pub address: String,
    pub other_config: Map,
}

#[derive(Debug, Clone, Default)]
pub struct Session {
    pub uuid: String,
    pub this_host: String,
    pub originator: String,
    pub user: String,
    pub last_active: i64,
    /// Order of use, for evicting the least recently used session of a group.
    pub used_seq: u64,
    pub other_config: Map,
}

#[derive(Debug, Clone, Default)]
pub struct Sr {
    pub uuid: String,
    pub name_label: String,
    pub name_description: String,
    pub sr_type: String,
    pub content_type: String,
    pub shared: bool,
    pub other_config: Map,
    pub sm_config: Map,
    pub tags: Vec<String>,
    pub physical_size: i64,
    pub physical_utilisation: i64,
    pub virtual_allocation: i64,
    /// The appliance's local SR: no directory on the export.
    pub local: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Pbd {
    pub uuid: String,
    pub host: String,
    pub sr: String,
    pub device_config: Map,
    pub currently_attached: bool,
    pub other_config: Map,
}

#[derive(Debug, Clone, Default)]
pub struct Vdi {
    pub uuid: String,
    pub name_label: String,
    pub name_description: String,
    pub sr: String,
    pub virtual_size: i64,
    pub physical_utilisation: i64,
    pub vdi_type: String,
    pub sharable: bool,
    pub read_only: bool,
    pub other_config: Map,
    pub sm_config: Map,
    pub xenstore_data: Map,
    pub tags: Vec<String>,
    pub location: String,
    pub managed: bool,
    /// Operations in progress (`copy`, `destroy`, ...), keyed by task or call id.
    pub current_operations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default)]
pub struct Vbd {
    pub uuid: String,
    pub vm: String,
    pub vdi: String,
    pub device: String,
    pub userdevice: String,
    pub bootable: bool,
    pub mode: String,
    pub vbd_type: String,
    pub unpluggable: bool,
    pub empty: bool,
    pub other_config: Map,
    pub currently_attached: bool,
    pub qos_algorithm_type: String,
    pub qos_algorithm_params: Map,
    pub current_operations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default)]
pub struct Vm {
    pub uuid: String,
    pub name_label: String,
    pub name_description: String,
    pub power_state: String,
    pub resident_on: String,
    pub is_control_domain: bool,
    pub domid: i64,
    pub other_config: Map,
    /// The VM the agent runs in: its plugged VBDs appear in the device directory.
    pub is_appliance: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Task {
    pub uuid: String,
    pub name_label: String,
    pub name_description: String,
    pub created: i64,
    pub finished: i64,
    pub status: String,
    pub resident_on: String,
    pub progress: f64,
    pub result: String,
    pub error_info: Vec<String>,
    pub other_config: Map,
    pub cancel: Arc<AtomicBool>,
    pub cancellable: bool,
    /// Destroy as soon as it ends (task.destroy on a pending task).
    pub destroy_when_done: bool,
}

/// All objects, keyed by reference.
#[derive(Debug, Default)]
pub struct Db {
    pub pool_ref: String,
    pub pool: Pool,
    pub master: String,
    pub hosts: BTreeMap<String, Host>,
    pub sessions: BTreeMap<String, Session>,
    pub srs: BTreeMap<String, Sr>,
    pub pbds: BTreeMap<String, Pbd>,
    pub vdis: BTreeMap<String, Vdi>,
    pub vbds: BTreeMap<String, Vbd>,
    pub vms: BTreeMap<String, Vm>,
    pub tasks: BTreeMap<String, Task>,
    /// Counter behind [`Session::used_seq`].
    pub session_seq: u64,
}

/// Looks a reference up in a table, failing as xapi does for a bad handle.
pub fn lookup<'a, T>(
    table: &'a BTreeMap<String, T>,
    class: &str,
    handle: &str,
) -> ApiResult<&'a T> {
    table
        .get(handle)
        .ok_or_else(|| ApiError::handle_invalid(class, handle))
}

pub fn lookup_mut<'a, T>(
    table: &'a mut BTreeMap<String, T>,
    class: &str,
    handle: &str,
) -> ApiResult<&'a mut T> {
    table
        .get_mut(handle)
        .ok_or_else(|| ApiError::handle_invalid(class, handle))
}

fn refs_where<'a, T>(table: &'a BTreeMap<String, T>, keep: impl Fn(&T) -> bool + 'a) -> Value {
    Value::Array(
        table
            .iter()
            .filter(|(_, item)| keep(item))
            .map(|(r, _)| s(r))
            .collect(),
    )
}

fn date(seconds: i64) -> Value {
    Value::DateTime(codec::datetime_from_unix(seconds))
}

/// Device name xapi reports for a userdevice number: `xvd` + base-26 letters.
pub fn linux_device(userdevice: u32) -> String {
    let mut n = userdevice;
    let mut letters = Vec::new();
    loop {
        letters.push((b'a' + (n % 26) as u8) as char);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.reverse();
    format!("xvd{}", letters.into_iter().collect::<String>())
}

impl Db {
    pub fn pool_record(&self) -> Record {
        let p = &self.pool;
        record([
            ("uuid", s(&p.uuid)),
            ("name_label", s(&p.name_label)),
            ("name_description", s("")),
            ("master", s(&p.master)),
            ("default_SR", s(NULL_REF)),
            ("suspend_image_SR", s(NULL_REF)),
            ("crash_dump_SR", s(NULL_REF)),
            ("other_config", map(&p.other_config)),
            ("ha_enabled", Value::Bool(false)),
            ("ha_configuration", empty_map()),
            ("ha_statefiles", empty_set()),
            ("ha_host_failures_to_tolerate", int(0)),
            ("ha_plan_exists_for", int(0)),
            ("ha_allow_overcommit", Value::Bool(false)),
            ("ha_overcommitted", Value::Bool(false)),
            ("blobs", empty_map()),
            ("tags", empty_set()),
            ("gui_config", empty_map()),
            ("health_check_config", empty_map()),
            ("wlb_url", s("")),
            ("wlb_username", s("")),
            ("wlb_enabled", Value::Bool(false)),
            ("wlb_verify_cert", Value::Bool(false)),
            ("redo_log_enabled", Value::Bool(false)),
            ("redo_log_vdi", s(NULL_REF)),
            ("vswitch_controller", s("")),
            ("restrictions", empty_map()),
            ("metadata_VDIs", empty_set()),
            ("ha_cluster_stack", s("xhad")),
            ("allowed_operations", empty_set()),
            ("current_operations", empty_map()),
            ("guest_agent_config", empty_map()),
            ("cpu_info", empty_map()),
            ("policy_no_vendor_device", Value::Bool(false)),
            ("live_patching_disabled", Value::Bool(false)),
            ("igmp_snooping_enabled", Value::Bool(false)),
            ("uefi_certificates", s("")),
            ("is_psr_pending", Value::Bool(false)),
            ("tls_verification_enabled", Value::Bool(true)),
            ("repositories", empty_set()),
            ("client_certificate_auth_enabled", Value::Bool(false)),
            ("client_certificate_auth_name", s("")),
            ("repository_proxy_url", s("")),
            ("repository_proxy_username", s("")),
            ("repository_proxy_password", s(NULL_REF)),
            ("migration_compression", Value::Bool(false)),
            ("coordinator_bias", Value::Bool(true)),
            ("telemetry_uuid", s(NULL_REF)),
            ("telemetry_frequency", s("weekly")),
            ("telemetry_next_collection", date(0)),
            ("last_update_sync", date(0)),
            ("update_sync_frequency", s("weekly")),
            ("update_sync_day", int(0)),
            ("update_sync_enabled", Value::Bool(false)),
        ])
    }

    pub fn host_record(&self, handle: &str, h: &Host) -> Record {
        let dom0 = self
            .vms
            .iter()
            .find(|(_, vm)| vm.is_control_domain && vm.resident_on == handle)
            .map(|(r, _)| r.clone())
            .unwrap_or_else(|| NULL_REF.to_string());
        let software_version: Map = [
            ("product_version", "8.4.0"),
            ("product_version_text", "8"),
            ("product_version_text_short", "8"),
            ("platform_name", "XCP"),
            ("platform_version", "3.4.0"),
            ("product_brand", "XenServer"),
            ("build_number", "sim"),
            ("hostname", h.hostname.as_str()),
            ("xapi", "25.6"),
            ("xen", "4.17.5"),
            ("linux", "4.19.0+1"),
            ("xencenter_min", "2.21"),
            ("xencenter_max", "2.21"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        record([
            ("uuid", s(&h.uuid)),
            ("name_label", s(&h.name_label)),
            ("name_description", s("Default install")),
            ("memory_overhead", int(0)),
            ("allowed_operations", strings(["provision", "evacuate"])),
            ("current_operations", empty_map()),
            ("API_version_major", int(2)),
            ("API_version_minor", int(21)),
            ("API_version_vendor", s("XenSource")),
            ("API_version_vendor_implementation", empty_map()),
            ("enabled", Value::Bool(true)),
            ("software_version", map(&software_version)),
            ("other_config", map(&h.other_config)),
            (
                "capabilities",
                strings(["xen-3.0-x86_64", "hvm-3.0-x86_64"]),
            ),
            ("cpu_configuration", empty_map()),
            ("sched_policy", s("credit")),
            ("supported_bootloaders", strings(["pygrub", "eliloader"])),
            (
                "resident_VMs",
                refs_where(&self.vms, |vm| vm.resident_on == handle),
            ),
            ("logging", empty_map()),
            ("PIFs", empty_set()),
            ("suspend_image_sr", s(NULL_REF)),
            ("crash_dump_sr", s(NULL_REF)),
            ("crashdumps", empty_set()),
            ("patches", empty_set()),
            ("updates", empty_set()),
            ("PBDs", refs_where(&self.pbds, |pbd| pbd.host == handle)),
            ("host_CPUs", empty_set()),
            ("cpu_info", empty_map()),
            ("hostname", s(&h.hostname)),
            ("address", s(&h.address)),
            ("metrics", s(NULL_REF)),
            ("license_params", empty_map()),
            ("ha_statefiles", empty_set()),
            ("ha_network_peers", empty_set()),
            ("blobs", empty_map()),
            ("tags", empty_set()),
            ("external_auth_type", s("")),
            ("external_auth_service_name", s("")),
            ("external_auth_configuration", empty_map()),
            ("edition", s("xenserver-premium")),
            ("license_server", empty_map()),
            ("bios_strings", empty_map()),
            ("power_on_mode", s("")),
            ("power_on_config", empty_map()),
            ("local_cache_sr", s(NULL_REF)),
            ("chipset_info", empty_map()),
            ("PCIs", empty_set()),
            ("PGPUs", empty_set()),
            ("PUSBs", empty_set()),
            ("ssl_legacy", Value::Bool(false)),
            ("guest_VCPUs_params", empty_map()),
            ("display", s("enabled")),
            (
                "virtual_hardware_platform_versions",
                Value::Array(vec![int(0), int(1), int(2)]),
            ),
            ("control_domain", s(&dom0)),
            ("updates_requiring_reboot", empty_set()),
            ("features", empty_set()),
            ("iscsi_iqn", s("")),
            ("multipathing", Value::Bool(false)),
            ("uefi_certificates", s("")),
            ("certificates", empty_set()),
            ("editions", strings(["xenserver-premium"])),
            ("pending_guidances", empty_set()),
            ("tls_verification_enabled", Value::Bool(true)),
            ("last_software_update", date(0)),
            ("https_only", Value::Bool(false)),
            ("numa_affinity_policy", s("default_policy")),
            ("latest_synced_updates_applied", s("unknown")),
        ])
    }

    pub fn session_record(&self, s_: &Session) -> Record {
        record([
            ("uuid", s(&s_.uuid)),
            ("this_host", s(&s_.this_host)),
            ("this_user", s(NULL_REF)),
            ("last_active", date(s_.last_active)),
            ("pool", Value::Bool(false)),
            ("other_config", map(&s_.other_config)),
            ("is_local_superuser", Value::Bool(true)),
            ("subject", s(NULL_REF)),
            ("validation_time", date(0)),
            ("auth_user_sid", s("")),
            ("auth_user_name", s(&s_.user)),
            ("rbac_permissions", empty_set()),
            ("tasks", empty_set()),
            ("parent", s(NULL_REF)),
            ("originator", s(&s_.originator)),
            ("client_certificate", Value::Bool(false)),
        ])
    }

    pub fn sr_record(&self, handle: &str, sr: &Sr) -> Record {
        let ops = if sr.local {
            vec![
                "vdi_create",
                "vdi_destroy",
                "vdi_resize",
                "scan",
                "update",
                "vdi_clone",
                "vdi_snapshot",
            ]
        } else {
            vec![
                "vdi_enable_cbt",
                "vdi_list_changed_blocks",
                "unplug",
                "plug",
                "pbd_create",
                "vdi_disable_cbt",
                "update",
                "pbd_destroy",
                "vdi_resize",
                "vdi_clone",
                "vdi_data_destroy",
                "scan",
                "vdi_snapshot",
                "vdi_mirror",
                "vdi_create",
                "vdi_destroy",
                "vdi_set_on_boot",
                "vdi_introduce",
            ]
        };
        record([
            ("uuid", s(&sr.uuid)),
            ("name_label", s(&sr.name_label)),
            ("name_description", s(&sr.name_description)),
            ("allowed_operations", strings(ops)),
            ("current_operations", empty_map()),
            ("VDIs", refs_where(&self.vdis, |vdi| vdi.sr == handle)),
            ("PBDs", refs_where(&self.pbds, |pbd| pbd.sr == handle)),
            ("virtual_allocation", int(sr.virtual_allocation)),
            ("physical_utilisation", int(sr.physical_utilisation)),
            ("physical_size", int(sr.physical_size)),
            ("type", s(&sr.sr_type)),
            ("content_type", s(&sr.content_type)),
            ("shared", Value::Bool(sr.shared)),
            ("other_config", map(&sr.other_config)),
            ("tags", strings(&sr.tags)),
            ("sm_config", map(&sr.sm_config)),
            ("blobs", empty_map()),
            ("local_cache_enabled", Value::Bool(false)),
            ("introduced_by", s(NULL_REF)),
            ("clustered", Value::Bool(false)),
            ("is_tools_sr", Value::Bool(false)),
        ])
    }

    pub fn pbd_record(&self, pbd: &Pbd) -> Record {
        record([
            ("uuid", s(&pbd.uuid)),
            ("host", s(&pbd.host)),
            ("SR", s(&pbd.sr)),
            ("device_config", map(&pbd.device_config)),
            ("currently_attached", Value::Bool(pbd.currently_attached)),
            ("other_config", map(&pbd.other_config)),
        ])
    }

    pub fn vdi_record(&self, handle: &str, vdi: &Vdi) -> Record {
        let attached = self
            .vbds
            .values()
            .any(|vbd| vbd.vdi == handle && vbd.currently_attached);
        let mut ops = vec![
            "clone",
            "copy",
            "snapshot",
            "generate_config",
            "mirror",
            "force_unlock",
        ];
        if !attached {
            ops.extend(["resize", "destroy", "update", "data_destroy"]);
        }
        if !vdi.current_operations.is_empty() {
            ops.clear();
        }
        record([
            ("uuid", s(&vdi.uuid)),
            ("name_label", s(&vdi.name_label)),
            ("name_description", s(&vdi.name_description)),
            ("allowed_operations", strings(ops)),
            ("current_operations", map(&vdi.current_operations)),
            ("SR", s(&vdi.sr)),
            ("VBDs", refs_where(&self.vbds, |vbd| vbd.vdi == handle)),
            ("crash_dumps", empty_set()),
            ("virtual_size", int(vdi.virtual_size)),
            ("physical_utilisation", int(vdi.physical_utilisation)),
            ("type", s(&vdi.vdi_type)),
            ("sharable", Value::Bool(vdi.sharable)),
            ("read_only", Value::Bool(vdi.read_only)),
            ("other_config", map(&vdi.other_config)),
            ("storage_lock", Value::Bool(false)),
            ("location", s(&vdi.location)),
            ("managed", Value::Bool(vdi.managed)),
            ("missing", Value::Bool(false)),
            ("parent", s(NULL_REF)),
            ("xenstore_data", map(&vdi.xenstore_data)),
            ("sm_config", map(&vdi.sm_config)),
            ("is_a_snapshot", Value::Bool(false)),
            ("snapshot_of", s(NULL_REF)),
            ("snapshots", empty_set()),
            ("snapshot_time", date(0)),
            ("tags", strings(&vdi.tags)),
            ("allow_caching", Value::Bool(false)),
            ("on_boot", s("persist")),
            ("metadata_of_pool", s(NULL_REF)),
            ("metadata_latest", Value::Bool(false)),
            ("is_tools_iso", Value::Bool(false)),
            ("cbt_enabled", Value::Bool(false)),
        ])
    }

    pub fn vbd_record(&self, vbd: &Vbd) -> Record {
        let ops: Vec<&str> = if !vbd.current_operations.is_empty() {
            vec![]
        } else if vbd.currently_attached {
            if vbd.unpluggable {
                vec!["attach", "unplug", "unplug_force"]
            } else {
                vec!["attach"]
            }
        } else {
            vec!["attach", "plug"]
        };
        record([
            ("uuid", s(&vbd.uuid)),
            ("allowed_operations", strings(ops)),
            ("current_operations", map(&vbd.current_operations)),
            ("VM", s(&vbd.vm)),
            ("VDI", s(&vbd.vdi)),
            ("device", s(&vbd.device)),
            ("userdevice", s(&vbd.userdevice)),
            ("bootable", Value::Bool(vbd.bootable)),
            ("mode", s(&vbd.mode)),
            ("type", s(&vbd.vbd_type)),
            ("unpluggable", Value::Bool(vbd.unpluggable)),
            ("storage_lock", Value::Bool(false)),
            ("empty", Value::Bool(vbd.empty)),
            ("other_config", map(&vbd.other_config)),
            ("currently_attached", Value::Bool(vbd.currently_attached)),
            ("status_code", int(0)),
            ("status_detail", s("")),
            ("runtime_properties", empty_map()),
            ("qos_algorithm_type", s(&vbd.qos_algorithm_type)),
            ("qos_algorithm_params", map(&vbd.qos_algorithm_params)),
            ("qos_supported_algorithms", empty_set()),
            ("metrics", s(NULL_REF)),
        ])
    }

    pub fn vm_record(&self, handle: &str, vm: &Vm) -> Record {
        let memory = if vm.is_control_domain {
            4 << 30
        } else {
            2 << 30
        };
        let running = vm.power_state == "Running";
        let ops = if vm.is_control_domain {
            vec![
                "changing_dynamic_range",
                "metadata_export",
                "snapshot",
                "copy",
            ]
        } else if running {
            vec![
                "changing_dynamic_range",
                "pause",
                "clean_reboot",
                "clean_shutdown",
                "hard_reboot",
                "hard_shutdown",
                "snapshot",
                "suspend",
            ]
        } else {
            vec!["start", "export", "destroy", "copy", "clone", "snapshot"]
        };
        let platform: Map = [
            ("acpi", "1"),
            ("apic", "true"),
            ("pae", "true"),
            ("nx", "true"),
            ("viridian", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        record([
            ("uuid", s(&vm.uuid)),
            ("allowed_operations", strings(ops)),
            ("current_operations", empty_map()),
            ("name_label", s(&vm.name_label)),
            ("name_description", s(&vm.name_description)),
            ("power_state", s(&vm.power_state)),
            ("user_version", int(1)),
            ("is_a_template", Value::Bool(false)),
            ("is_default_template", Value::Bool(false)),
            ("suspend_VDI", s(NULL_REF)),
            ("resident_on", s(&vm.resident_on)),
            ("scheduled_to_be_resident_on", s(NULL_REF)),
            ("affinity", s(NULL_REF)),
            ("memory_overhead", int(if running { 20 << 20 } else { 0 })),
            ("memory_target", int(if running { memory } else { 0 })),
            ("memory_static_max", int(memory)),
            ("memory_dynamic_max", int(memory)),
            ("memory_dynamic_min", int(memory)),
            ("memory_static_min", int(memory)),
            ("VCPUs_params", empty_map()),
            ("VCPUs_max", int(2)),
            ("VCPUs_at_startup", int(2)),
            ("actions_after_softreboot", s("soft_reboot")),
            ("actions_after_shutdown", s("destroy")),
            ("actions_after_reboot", s("restart")),
            ("actions_after_crash", s("restart")),
            ("consoles", empty_set()),
            ("VIFs", empty_set()),
            ("VBDs", refs_where(&self.vbds, |vbd| vbd.vm == handle)),
            ("VUSBs", empty_set()),
            ("crash_dumps", empty_set()),
            ("VTPMs", empty_set()),
            ("PV_bootloader", s("")),
            ("PV_kernel", s("")),
            ("PV_ramdisk", s("")),
            ("PV_args", s("")),
            ("PV_bootloader_args", s("")),
            ("PV_legacy_args", s("")),
            (
                "HVM_boot_policy",
                s(if vm.is_control_domain {
                    ""
                } else {
                    "BIOS order"
                }),
            ),
            ("HVM_boot_params", empty_map()),
            ("HVM_shadow_multiplier", Value::Double(1.0)),
            (
                "platform",
                if vm.is_control_domain {
                    empty_map()
                } else {
                    map(&platform)
                },
            ),
            ("PCI_bus", s("")),
            ("other_config", map(&vm.other_config)),
            ("domid", int(if running { vm.domid } else { -1 })),
            ("domarch", s(if running { "x64" } else { "" })),
            ("last_boot_CPU_flags", empty_map()),
            ("is_control_domain", Value::Bool(vm.is_control_domain)),
            ("metrics", s(NULL_REF)),
            ("guest_metrics", s(NULL_REF)),
            ("last_booted_record", s("")),
            ("recommendations", s("")),
            ("xenstore_data", empty_map()),
            ("ha_always_run", Value::Bool(false)),
            ("ha_restart_priority", s("")),
            ("is_a_snapshot", Value::Bool(false)),
            ("snapshot_of", s(NULL_REF)),
            ("snapshots", empty_set()),
            ("snapshot_time", date(0)),
            ("transportable_snapshot_id", s("")),
            ("blobs", empty_map()),
            ("tags", empty_set()),
            ("blocked_operations", empty_map()),
            ("snapshot_info", empty_map()),
            ("snapshot_metadata", s("")),
            ("parent", s(NULL_REF)),
            ("children", empty_set()),
            ("bios_strings", empty_map()),
            ("protection_policy", s(NULL_REF)),
            ("is_snapshot_from_vmpp", Value::Bool(false)),
            ("snapshot_schedule", s(NULL_REF)),
            ("is_vmss_snapshot", Value::Bool(false)),
            ("appliance", s(NULL_REF)),
            ("start_delay", int(0)),
            ("shutdown_delay", int(0)),
            ("order", int(0)),
            ("VGPUs", empty_set()),
            ("attached_PCIs", empty_set()),
            ("suspend_SR", s(NULL_REF)),
            ("version", int(0)),
            ("generation_id", s("")),
            ("hardware_platform_version", int(0)),
            ("has_vendor_device", Value::Bool(false)),
            ("requires_reboot", Value::Bool(false)),
            ("reference_label", s("")),
            (
                "domain_type",
                s(if vm.is_control_domain { "pv" } else { "hvm" }),
            ),
            ("NVRAM", empty_map()),
            ("pending_guidances", empty_set()),
            ("pending_guidances_recommended", empty_set()),
            ("pending_guidances_full", empty_set()),
        ])
    }

    pub fn task_record(&self, t: &Task) -> Record {
        let pending = t.status == "pending";
        let mut ops = Vec::new();
        if pending && t.cancellable {
            ops.push("cancel");
        }
        ops.push("destroy");
        record([
            ("uuid", s(&t.uuid)),
            ("name_label", s(&t.name_label)),
            ("name_description", s(&t.name_description)),
            ("allowed_operations", strings(ops)),
            ("current_operations", empty_map()),
            ("created", date(t.created)),
            ("finished", date(t.finished)),
            ("status", s(&t.status)),
            ("resident_on", s(&t.resident_on)),
            ("progress", Value::Double(t.progress)),
            ("type", s("<none/>")),
            ("result", s(&t.result)),
            ("error_info", strings(&t.error_info)),
            ("other_config", map(&t.other_config)),
            ("subtask_of", s(NULL_REF)),
            ("subtasks", empty_set()),
            ("backtrace", s("()")),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_follow_xapi() {
        assert_eq!(linux_device(0), "xvda");
        assert_eq!(linux_device(1), "xvdb");
        assert_eq!(linux_device(25), "xvdz");
        assert_eq!(linux_device(26), "xvdaa");
        assert_eq!(linux_device(27), "xvdab");
    }
}
