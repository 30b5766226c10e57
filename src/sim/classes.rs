//! The message table: the generic messages every class has (`get_record`, `get_all`,
//! `get_by_uuid`, `get_<field>`, map-field setters, ...) and the class-specific ones.

use std::collections::BTreeMap;

use super::codec::Value;
use super::dispatch::{Ctx, Methods};
use super::error::{ApiError, ApiResult};
use super::model::{Db, Map, Record};
use super::{ops_session, ops_storage, ops_vbd, ops_vdi};

/// How the generic messages reach one table.
struct ClassInfo {
    name: &'static str,
    all: fn(&Db) -> Vec<String>,
    record: fn(&Db, &str) -> Option<Record>,
    sample: fn() -> Record,
    get_all: bool,
    by_name_label: bool,
    name_setters: bool,
    /// Fields of type `(string -> string) map` that have add_to/remove_from/set messages.
    maps: &'static [&'static str],
}

fn keys<T>(table: &BTreeMap<String, T>) -> Vec<String> {
    table.keys().cloned().collect()
}

fn classes() -> Vec<ClassInfo> {
    vec![
        ClassInfo {
            name: "session",
            all: |db| keys(&db.sessions),
            record: |db, h| db.sessions.get(h).map(|s| db.session_record(s)),
            sample: || Db::default().session_record(&Default::default()),
            get_all: false,
            by_name_label: false,
            name_setters: false,
            maps: &["other_config"],
        },
        ClassInfo {
            name: "pool",
            all: |db| vec![db.pool_ref.clone()],
            record: |db, h| (h == db.pool_ref).then(|| db.pool_record()),
            sample: || Db::default().pool_record(),
            get_all: true,
            by_name_label: false,
            name_setters: true,
            maps: &["other_config"],
        },
        ClassInfo {
            name: "host",
            all: |db| keys(&db.hosts),
            record: |db, h| db.hosts.get(h).map(|x| db.host_record(h, x)),
            sample: || Db::default().host_record("", &Default::default()),
            get_all: true,
            by_name_label: true,
            name_setters: true,
            maps: &["other_config"],
        },
        ClassInfo {
            name: "VM",
            all: |db| keys(&db.vms),
            record: |db, h| db.vms.get(h).map(|x| db.vm_record(h, x)),
            sample: || Db::default().vm_record("", &Default::default()),
            get_all: true,
            by_name_label: true,
            name_setters: true,
            maps: &["other_config"],
        },
        ClassInfo {
            name: "SR",
            all: |db| keys(&db.srs),
            record: |db, h| db.srs.get(h).map(|x| db.sr_record(h, x)),
            sample: || Db::default().sr_record("", &Default::default()),
            get_all: true,
            by_name_label: true,
            name_setters: true,
            maps: &["other_config", "sm_config"],
        },
        ClassInfo {
            name: "PBD",
            all: |db| keys(&db.pbds),
            record: |db, h| db.pbds.get(h).map(|x| db.pbd_record(x)),
            sample: || Db::default().pbd_record(&Default::default()),
            get_all: true,
            by_name_label: false,
            name_setters: false,
            maps: &["other_config"],
        },
        ClassInfo {
            name: "VDI",
            all: |db| keys(&db.vdis),
            record: |db, h| db.vdis.get(h).map(|x| db.vdi_record(h, x)),
            sample: || Db::default().vdi_record("", &Default::default()),
            get_all: true,
            by_name_label: true,
            name_setters: true,
            maps: &["other_config", "sm_config", "xenstore_data"],
        },
        ClassInfo {
            name: "VBD",
            all: |db| keys(&db.vbds),
            record: |db, h| db.vbds.get(h).map(|x| db.vbd_record(x)),
            sample: || Db::default().vbd_record(&Default::default()),
            get_all: true,
            by_name_label: false,
            name_setters: false,
            maps: &["other_config", "qos_algorithm_params"],
        },
        ClassInfo {
            name: "task",
            all: |db| keys(&db.tasks),
            record: |db, h| db.tasks.get(h).map(|x| db.task_record(x)),
            sample: || Db::default().task_record(&Default::default()),
            get_all: true,
            by_name_label: true,
            name_setters: false,
            maps: &["other_config"],
        },
    ]
}

fn record_value(record: Record) -> Value {
    Value::Struct(record)
}

fn get_record(ctx: &Ctx, class: &ClassInfo, handle: &str) -> ApiResult<Record> {
    (class.record)(&ctx.db(), handle).ok_or_else(|| ApiError::handle_invalid(class.name, handle))
}

/// The table of every message the simulator answers.
pub fn methods() -> Methods {
    let mut m = Methods::default();
    for class in classes() {
        add_generic(&mut m, class);
    }
    ops_session::register(&mut m);
    ops_storage::register(&mut m);
    ops_vdi::register(&mut m);
    ops_vbd::register(&mut m);
    m
}

fn add_generic(m: &mut Methods, class: ClassInfo) {
    let class = std::sync::Arc::new(class);
    let name = class.name;
    let c = class.clone();
    m.add(
        &format!("{name}.get_record"),
        1,
        1,
        false,
        move |ctx, args| Ok(record_value(get_record(ctx, &c, &args.string(0)?)?)),
    );
    let c = class.clone();
    m.add(
        &format!("{name}.get_by_uuid"),
        1,
        1,
        false,
        move |ctx, args| {
            let uuid = args.string(0)?;
            let db = ctx.db();
            (c.all)(&db)
                .into_iter()
                .find(|h| {
                    (c.record)(&db, h)
                        .is_some_and(|r| r.get("uuid") == Some(&Value::String(uuid.clone())))
                })
                .map(Value::String)
                .ok_or_else(|| ApiError::uuid_invalid(c.name, &uuid))
        },
    );
    if class.get_all {
        let c = class.clone();
        m.add(&format!("{name}.get_all"), 0, 0, false, move |ctx, _| {
            Ok(Value::Array(
                (c.all)(&ctx.db()).into_iter().map(Value::String).collect(),
            ))
        });
        let c = class.clone();
        m.add(
            &format!("{name}.get_all_records"),
            0,
            0,
            false,
            move |ctx, _| {
                let db = ctx.db();
                Ok(Value::Struct(
                    (c.all)(&db)
                        .into_iter()
                        .filter_map(|h| (c.record)(&db, &h).map(|r| (h, record_value(r))))
                        .collect(),
                ))
            },
        );
    }
    if class.by_name_label {
        let c = class.clone();
        m.add(
            &format!("{name}.get_by_name_label"),
            1,
            1,
            false,
            move |ctx, args| {
                let label = Value::String(args.string(0)?);
                let db = ctx.db();
                Ok(Value::Array(
                    (c.all)(&db)
                        .into_iter()
                        .filter(|h| {
                            (c.record)(&db, h).is_some_and(|r| r.get("name_label") == Some(&label))
                        })
                        .map(Value::String)
                        .collect(),
                ))
            },
        );
    }
    for field in (class.sample)().into_keys() {
        let c = class.clone();
        let f = field.clone();
        m.add(
            &format!("{name}.get_{field}"),
            1,
            1,
            false,
            move |ctx, args| {
                let mut record = get_record(ctx, &c, &args.string(0)?)?;
                Ok(record.remove(&f).unwrap_or(Value::String(String::new())))
            },
        );
    }
    if class.name_setters {
        for field in ["name_label", "name_description"] {
            let c = class.clone();
            m.add(
                &format!("{name}.set_{field}"),
                2,
                2,
                false,
                move |ctx, args| {
                    let handle = args.string(0)?;
                    let value = args.string(1)?;
                    let mut db = ctx.db();
                    let slot = name_field(&mut db, c.name, &handle, field)
                        .ok_or_else(|| ApiError::handle_invalid(c.name, &handle))?;
                    *slot = value;
                    Ok(Value::String(String::new()))
                },
            );
        }
    }
    for &field in class.maps {
        let c = class.clone();
        m.add(
            &format!("{name}.set_{field}"),
            2,
            2,
            false,
            move |ctx, args| {
                let handle = args.string(0)?;
                let value = args.map(1)?;
                let mut db = ctx.db();
                *map_field(&mut db, c.name, &handle, field)
                    .ok_or_else(|| ApiError::handle_invalid(c.name, &handle))? = value;
                Ok(Value::String(String::new()))
            },
        );
        let c = class.clone();
        m.add(
            &format!("{name}.add_to_{field}"),
            3,
            3,
            false,
            move |ctx, args| {
                let handle = args.string(0)?;
                let key = args.string(1)?;
                let value = args.string(2)?;
                let mut db = ctx.db();
                let uuid = (c.record)(&db, &handle)
                    .and_then(|r| r.get("uuid").and_then(|u| u.as_str().map(str::to_string)))
                    .unwrap_or_default();
                let map = map_field(&mut db, c.name, &handle, field)
                    .ok_or_else(|| ApiError::handle_invalid(c.name, &handle))?;
                if map.contains_key(&key) {
                    return Err(ApiError::new(
                        "MAP_DUPLICATE_KEY",
                        [c.name, field, uuid.as_str(), key.as_str()],
                    ));
                }
                map.insert(key, value);
                Ok(Value::String(String::new()))
            },
        );
        let c = class.clone();
        m.add(
            &format!("{name}.remove_from_{field}"),
            2,
            2,
            false,
            move |ctx, args| {
                let handle = args.string(0)?;
                let key = args.string(1)?;
                let mut db = ctx.db();
                map_field(&mut db, c.name, &handle, field)
                    .ok_or_else(|| ApiError::handle_invalid(c.name, &handle))?
                    .remove(&key);
                Ok(Value::String(String::new()))
            },
        );
    }
}

fn name_field<'a>(
    db: &'a mut Db,
    class: &str,
    handle: &str,
    field: &str,
) -> Option<&'a mut String> {
    let label = field == "name_label";
    match class {
        "SR" => db.srs.get_mut(handle).map(|x| {
            if label {
                &mut x.name_label
            } else {
                &mut x.name_description
            }
        }),
        "VDI" => db.vdis.get_mut(handle).map(|x| {
            if label {
                &mut x.name_label
            } else {
                &mut x.name_description
            }
        }),
        "VM" => db.vms.get_mut(handle).map(|x| {
            if label {
                &mut x.name_label
            } else {
                &mut x.name_description
            }
        }),
        "host" => db.hosts.get_mut(handle).map(|x| {
            if label {
                &mut x.name_label
            } else {
                &mut x.hostname
            }
        }),
        "pool" if handle == db.pool_ref => Some(&mut db.pool.name_label),
        _ => None,
    }
}

fn map_field<'a>(db: &'a mut Db, class: &str, handle: &str, field: &str) -> Option<&'a mut Map> {
    match (class, field) {
        ("session", _) => db.sessions.get_mut(handle).map(|x| &mut x.other_config),
        ("pool", _) if handle == db.pool_ref => Some(&mut db.pool.other_config),
        ("host", _) => db.hosts.get_mut(handle).map(|x| &mut x.other_config),
        ("VM", _) => db.vms.get_mut(handle).map(|x| &mut x.other_config),
        ("SR", "sm_config") => db.srs.get_mut(handle).map(|x| &mut x.sm_config),
        ("SR", _) => db.srs.get_mut(handle).map(|x| &mut x.other_config),
        ("PBD", _) => db.pbds.get_mut(handle).map(|x| &mut x.other_config),
        ("VDI", "sm_config") => db.vdis.get_mut(handle).map(|x| &mut x.sm_config),
        ("VDI", "xenstore_data") => db.vdis.get_mut(handle).map(|x| &mut x.xenstore_data),
        ("VDI", _) => db.vdis.get_mut(handle).map(|x| &mut x.other_config),
        ("VBD", "qos_algorithm_params") => {
            db.vbds.get_mut(handle).map(|x| &mut x.qos_algorithm_params)
        }
        ("VBD", _) => db.vbds.get_mut(handle).map(|x| &mut x.other_config),
        ("task", _) => db.tasks.get_mut(handle).map(|x| &mut x.other_config),
        _ => None,
    }
}

/// A void result.
pub fn void() -> ApiResult<Value> {
    Ok(Value::String(String::new()))
}

/// A reference result.
pub fn reference(handle: String) -> ApiResult<Value> {
    Ok(Value::String(handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_has_getters_for_its_fields() {
        let m = methods();
        for name in [
            "VDI.get_virtual_size",
            "VDI.get_sm_config",
            "SR.get_PBDs",
            "VBD.get_device",
            "VM.get_is_control_domain",
            "host.get_address",
            "host.get_API_version_major",
            "pool.get_master",
            "task.get_result",
            "task.get_error_info",
            "session.get_this_host",
            "VDI.get_by_name_label",
            "SR.add_to_other_config",
        ] {
            assert!(m.get(name).is_some(), "{name} missing");
        }
        assert!(m.get("PBD.get_by_name_label").is_none());
        assert!(m.get("session.get_all").is_none());
    }

    #[test]
    fn records_are_stable_in_shape() {
        let fields: Vec<String> = (classes()[6].sample)().into_keys().collect();
        assert!(fields.contains(&"virtual_size".to_string()));
    }
}
