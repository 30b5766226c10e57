//! The `simulator.*` methods: test hooks reachable over XML-RPC without a session.

use std::path::Path;
use std::sync::Arc;

use super::codec::Value;
use super::dispatch::{as_int64, as_string, as_strings};
use super::error::{ApiError, ApiResult};
use super::hooks::FaultSpec;
use super::state::SimState;

fn arity(name: &str, params: &[Value], min: usize, max: usize) -> ApiResult<()> {
    if params.len() < min || params.len() > max {
        return Err(ApiError::new(
            "MESSAGE_PARAMETER_COUNT_MISMATCH",
            [
                format!("simulator.{name}"),
                min.to_string(),
                params.len().to_string(),
            ],
        ));
    }
    Ok(())
}

/// Runs `simulator.<name>`.
pub fn call(sim: &Arc<SimState>, name: &str, params: &[Value]) -> ApiResult<Value> {
    match name {
        "inject_fault" => {
            arity(name, params, 3, 4)?;
            let method = as_string(&params[0])?;
            let nth = as_int64(&params[1])?;
            let code = as_string(&params[2])?;
            let error_params = params.get(3).map_or(Ok(Vec::new()), as_strings)?;
            let nth = u64::try_from(nth)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| ApiError::internal("simulator.inject_fault: nth counts from 1"))?;
            sim.hooks.inject_fault(FaultSpec {
                method,
                nth,
                error: ApiError::new(code, error_params),
            });
        }
        "clear_faults" => {
            arity(name, params, 0, 0)?;
            sim.hooks.clear_faults();
        }
        "set_delay" => {
            arity(name, params, 2, 2)?;
            let method = as_string(&params[0])?;
            let millis = u64::try_from(as_int64(&params[1])?).map_err(|_| {
                ApiError::internal("simulator.set_delay: milliseconds cannot be negative")
            })?;
            sim.hooks.set_delay(&method, millis);
        }
        "set_hang" => {
            arity(name, params, 2, 2)?;
            let method = as_string(&params[0])?;
            let hang = match &params[1] {
                Value::Bool(b) => *b,
                _ => return Err(ApiError::internal("simulator.set_hang: expected a boolean")),
            };
            sim.hooks.set_hang(&method, hang);
        }
        "move_master" => {
            arity(name, params, 0, 0)?;
            if sim.slave_address.get().is_none() {
                return Err(ApiError::internal(
                    "simulator.move_master: needs --pool-slave",
                ));
            }
            // The other host takes over; sessions of the old master are gone with it.
            sim.master_moved
                .fetch_xor(true, std::sync::atomic::Ordering::SeqCst);
            sim.db
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .sessions
                .clear();
        }
        "expire_sessions" => {
            arity(name, params, 0, 0)?;
            sim.db
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .sessions
                .clear();
        }
        "set_call_log" => {
            arity(name, params, 1, 1)?;
            let path = as_string(&params[0])?;
            let path = (!path.is_empty()).then(|| Path::new(&path));
            sim.hooks
                .set_call_log(path)
                .map_err(|e| ApiError::internal(format!("simulator.set_call_log: {e}")))?;
        }
        _ => {
            return Err(ApiError::new(
                "MESSAGE_METHOD_UNKNOWN",
                [format!("simulator.{name}")],
            ));
        }
    }
    Ok(Value::String(String::new()))
}
