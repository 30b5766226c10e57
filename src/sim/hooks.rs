//! Test hooks: injected faults, delays and the JSON-lines call log. Settable from the command line
//! and at run time through the `simulator.*` methods.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::codec::{self, Value};
use super::error::ApiError;

/// "Fail the `nth` upcoming call of `method` with `error`."
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultSpec {
    pub method: String,
    pub nth: u64,
    pub error: ApiError,
}

impl FaultSpec {
    /// Parses `METHOD:N:CODE[:PARAM...]`.
    pub fn parse(text: &str) -> Result<FaultSpec, String> {
        let mut parts = text.split(':');
        let method = parts.next().filter(|m| !m.is_empty());
        let nth = parts
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|n| *n > 0);
        let code = parts.next().filter(|c| !c.is_empty());
        match (method, nth, code) {
            (Some(method), Some(nth), Some(code)) => Ok(FaultSpec {
                method: method.to_string(),
                nth,
                error: ApiError::new(code, parts),
            }),
            _ => Err(format!(
                "fault {text:?}: expected METHOD:N:CODE[:PARAM...] with N >= 1, e.g. VDI.create:1:SR_BACKEND_FAILURE_78"
            )),
        }
    }
}

/// Parses `METHOD:MILLISECONDS`.
pub fn parse_delay(text: &str) -> Result<(String, u64), String> {
    text.rsplit_once(':')
        .and_then(|(method, ms)| Some((method.to_string(), ms.parse().ok()?)))
        .filter(|(method, _)| !method.is_empty())
        .ok_or_else(|| format!("delay {text:?}: expected METHOD:MILLISECONDS, e.g. VDI.copy:2000"))
}

#[derive(Debug)]
struct PendingFault {
    /// Fires when the method's call counter reaches this value.
    at_call: u64,
    error: ApiError,
}

#[derive(Debug, Default)]
struct FaultTable {
    calls: HashMap<String, u64>,
    pending: HashMap<String, Vec<PendingFault>>,
}

/// Faults, delays and the call log, shared by every request.
#[derive(Debug, Default)]
pub struct Hooks {
    faults: Mutex<FaultTable>,
    delays: Mutex<HashMap<String, u64>>,
    /// Methods whose calls (or tasks) stop making progress until cancelled or released.
    hung: Mutex<std::collections::HashSet<String>>,
    call_log: Mutex<Option<(PathBuf, File)>>,
}

impl Hooks {
    pub fn inject_fault(&self, spec: FaultSpec) {
        let mut table = self
            .faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let seen = table.calls.get(&spec.method).copied().unwrap_or(0);
        table
            .pending
            .entry(spec.method)
            .or_default()
            .push(PendingFault {
                at_call: seen + spec.nth,
                error: spec.error,
            });
    }

    pub fn clear_faults(&self) {
        self.faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pending
            .clear();
    }

    /// Counts one call of `method` (sync or `Async.`, without the prefix) and returns the
    /// fault planned for it, if any.
    pub fn next_call(&self, method: &str) -> Option<ApiError> {
        let mut table = self
            .faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = table.calls.entry(method.to_string()).or_insert(0);
        *count += 1;
        let count = *count;
        let pending = table.pending.get_mut(method)?;
        let index = pending.iter().position(|f| f.at_call == count)?;
        Some(pending.remove(index).error)
    }

    pub fn set_delay(&self, method: &str, millis: u64) {
        let mut delays = self
            .delays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if millis == 0 {
            delays.remove(method);
        } else {
            delays.insert(method.to_string(), millis);
        }
    }

    pub fn set_hang(&self, method: &str, hang: bool) {
        let mut hung = self
            .hung
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if hang {
            hung.insert(method.to_string());
        } else {
            hung.remove(method);
        }
    }

    pub fn is_hung(&self, method: &str) -> bool {
        self.hung
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(method)
    }

    /// The delay set on `method`, or else the one set on every method (`*`).
    pub fn delay(&self, method: &str) -> Duration {
        let delays = self
            .delays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let millis = delays.get(method).or_else(|| delays.get("*"));
        Duration::from_millis(millis.copied().unwrap_or(0))
    }

    /// Starts (or, with `None`, stops) appending the call log to `path`.
    pub fn set_call_log(&self, path: Option<&Path>) -> std::io::Result<()> {
        let file = match path {
            Some(path) => Some((
                path.to_path_buf(),
                OpenOptions::new().create(true).append(true).open(path)?,
            )),
            None => None,
        };
        *self
            .call_log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = file;
        Ok(())
    }

    /// Appends one call to the log; passwords never reach it.
    pub fn log_call(
        &self,
        method: &str,
        params: &[Value],
        outcome: Result<(), &ApiError>,
        elapsed: Duration,
    ) {
        let mut guard = self
            .call_log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some((path, file)) = guard.as_mut() else {
            return;
        };
        let params: Vec<serde_json::Value> = params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if i == 1 && is_login(method) {
                    serde_json::Value::String("******".into())
                } else {
                    to_json(p)
                }
            })
            .collect();
        let error = match outcome {
            Ok(()) => serde_json::Value::Null,
            Err(e) => serde_json::Value::Array(
                std::iter::once(&e.code)
                    .chain(e.params.iter())
                    .map(|s| serde_json::Value::String(s.clone()))
                    .collect(),
            ),
        };
        let entry = serde_json::json!({
            "ts": timestamp(),
            "method": method,
            "params": params,
            "ok": outcome.is_ok(),
            "error": error,
            "ms": elapsed.as_secs_f64() * 1000.0,
        });
        let line = format!("{entry}\n");
        if let Err(e) = file.write_all(line.as_bytes()).and_then(|()| file.flush()) {
            eprintln!(
                "xenapinfs-sim: cannot append to the call log {}: {e}",
                path.display()
            );
        }
    }
}

fn is_login(method: &str) -> bool {
    let base = method.strip_prefix("Async.").unwrap_or(method);
    base.starts_with("session.login")
        || base.starts_with("session.slave_login")
        || base == "session.change_password"
}

fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn to_json(value: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        Value::String(s) => J::String(s.clone()),
        Value::Int(i) => J::from(*i),
        Value::Int64(i) => J::from(*i),
        Value::Bool(b) => J::Bool(*b),
        Value::Double(d) => serde_json::Number::from_f64(*d)
            .map(J::Number)
            .unwrap_or(J::Null),
        Value::DateTime(d) => J::String(codec::format_datetime(d)),
        Value::Base64(b) => J::String(format!("<{} bytes>", b.len())),
        Value::Array(items) => J::Array(items.iter().map(to_json).collect()),
        Value::Struct(members) => J::Object(
            members
                .iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .collect(),
        ),
        Value::Nil => J::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse_with_params() {
        let spec =
            FaultSpec::parse("VDI.create:2:SR_BACKEND_FAILURE_78::VDI Creation failed:").unwrap();
        assert_eq!(spec.method, "VDI.create");
        assert_eq!(spec.nth, 2);
        assert_eq!(spec.error.code, "SR_BACKEND_FAILURE_78");
        assert_eq!(spec.error.params, vec!["", "VDI Creation failed", ""]);
        assert!(FaultSpec::parse("VDI.create:0:X").is_err());
        assert!(FaultSpec::parse("VDI.create").is_err());
        assert_eq!(
            parse_delay("VDI.copy:1500").unwrap(),
            ("VDI.copy".to_string(), 1500)
        );
        assert!(parse_delay("VDI.copy").is_err());
    }

    #[test]
    fn the_nth_call_fails_once() {
        let hooks = Hooks::default();
        hooks.next_call("VDI.create");
        hooks.inject_fault(FaultSpec::parse("VDI.create:2:SR_BACKEND_FAILURE_44").unwrap());
        assert!(hooks.next_call("VDI.create").is_none());
        assert_eq!(
            hooks.next_call("VDI.create").unwrap().code,
            "SR_BACKEND_FAILURE_44"
        );
        assert!(hooks.next_call("VDI.create").is_none());
    }
}
