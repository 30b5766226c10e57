//! From a parsed call to a response, in xapi's order: unknown method, parameter count, session,
//! then the implementation (behind injected faults and delays). `Async.<Class>.<msg>` runs the
//! same implementation in a task and returns the task reference at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::codec::{self, Value};
use super::error::{ApiError, ApiResult};
use super::model::{self, Map, Task};
use super::state::SimState;

/// The implementation of one message.
pub type Handler = Arc<dyn Fn(&Ctx, &Args) -> ApiResult<Value> + Send + Sync>;

/// One XenAPI message: its parameters after the session, how many of them are required (the
/// rest have defaults and may be left out), and whether it has an `Async.` form.
#[derive(Clone)]
pub struct Method {
    pub params: usize,
    pub required: usize,
    pub session: bool,
    pub async_ok: bool,
    pub handler: Handler,
}

/// The message table.
#[derive(Default, Clone)]
pub struct Methods {
    table: HashMap<String, Method>,
}

impl Methods {
    /// Adds a message taking a session and `params` further parameters, `required` of them
    /// mandatory.
    pub fn add(
        &mut self,
        name: &str,
        params: usize,
        required: usize,
        async_ok: bool,
        handler: impl Fn(&Ctx, &Args) -> ApiResult<Value> + Send + Sync + 'static,
    ) {
        self.table.insert(
            name.to_string(),
            Method {
                params,
                required,
                session: true,
                async_ok,
                handler: Arc::new(handler),
            },
        );
    }

    /// Adds a message that takes no session (login).
    pub fn add_sessionless(
        &mut self,
        name: &str,
        params: usize,
        required: usize,
        handler: impl Fn(&Ctx, &Args) -> ApiResult<Value> + Send + Sync + 'static,
    ) {
        self.table.insert(
            name.to_string(),
            Method {
                params,
                required,
                session: false,
                async_ok: false,
                handler: Arc::new(handler),
            },
        );
    }

    pub fn get(&self, name: &str) -> Option<&Method> {
        self.table.get(name)
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.table.keys().cloned().collect();
        names.sort();
        names
    }
}

/// What a handler knows about the call it serves.
pub struct Ctx<'a> {
    pub sim: &'a Arc<SimState>,
    /// The caller's session reference ("" for login).
    pub session: String,
    /// Set when running as an `Async.` task.
    pub task: Option<TaskCtx>,
}

/// The task an async call runs in.
#[derive(Clone)]
pub struct TaskCtx {
    pub task: String,
    pub cancel: Arc<AtomicBool>,
}

impl Ctx<'_> {
    pub fn db(&self) -> std::sync::MutexGuard<'_, model::Db> {
        self.sim
            .db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reports progress (0..1) on the task, if any.
    pub fn progress(&self, value: f64) {
        if let Some(task) = &self.task
            && let Some(t) = self.db().tasks.get_mut(&task.task)
        {
            t.progress = value.clamp(0.0, 1.0);
        }
    }

    /// True once `task.cancel` was called on the task running this call.
    pub fn cancelled(&self) -> bool {
        self.task
            .as_ref()
            .is_some_and(|t| t.cancel.load(Ordering::SeqCst))
    }

    pub fn check_cancelled(&self) -> ApiResult<()> {
        match &self.task {
            Some(t) if t.cancel.load(Ordering::SeqCst) => Err(ApiError::task_cancelled(&t.task)),
            _ => Ok(()),
        }
    }

    /// An identifier for `current_operations` entries: the task, or a fresh one.
    pub fn operation_id(&self) -> String {
        match &self.task {
            Some(t) => t.task.clone(),
            None => model::new_ref(),
        }
    }
}

/// Typed access to the parameters after the session.
pub struct Args<'a> {
    values: &'a [Value],
}

fn runtime_error(expected: &str, got: &Value) -> ApiError {
    ApiError::internal(format!(
        "Rpc.Runtime_error(\"{expected}\", {})",
        describe(got)
    ))
}

fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("S({s})"),
        Value::Int(i) => format!("I32({i})"),
        Value::Int64(i) => format!("I({i})"),
        Value::Bool(b) => format!("B({b})"),
        Value::Double(d) => format!("F({d})"),
        Value::DateTime(d) => format!("D({})", codec::format_datetime(d)),
        Value::Base64(_) => "B64(...)".into(),
        Value::Array(_) => "[...]".into(),
        Value::Struct(_) => "{...}".into(),
        Value::Nil => "N".into(),
    }
}

pub fn as_string(value: &Value) -> ApiResult<String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        other => Err(runtime_error("string", other)),
    }
}

pub fn as_int64(value: &Value) -> ApiResult<i64> {
    match value {
        Value::Int(i) => Ok(i64::from(*i)),
        Value::Int64(i) => Ok(*i),
        Value::String(s) => s.trim().parse().map_err(|_| runtime_error("int64", value)),
        other => Err(runtime_error("int64", other)),
    }
}

pub fn as_bool(value: &Value) -> ApiResult<bool> {
    match value {
        Value::Bool(b) => Ok(*b),
        other => Err(runtime_error("bool", other)),
    }
}

pub fn as_map(value: &Value) -> ApiResult<Map> {
    match value {
        Value::Struct(members) => members
            .iter()
            .map(|(k, v)| Ok((k.clone(), as_string(v)?)))
            .collect(),
        other => Err(runtime_error("(string -> string) map", other)),
    }
}

pub fn as_strings(value: &Value) -> ApiResult<Vec<String>> {
    match value {
        Value::Array(items) => items.iter().map(as_string).collect(),
        other => Err(runtime_error("string set", other)),
    }
}

/// Enums are accepted in any case and stored with the datamodel's spelling.
pub fn as_enum(value: &Value, choices: &[&'static str]) -> ApiResult<&'static str> {
    let text = as_string(value)?;
    choices
        .iter()
        .find(|c| c.eq_ignore_ascii_case(&text))
        .copied()
        .ok_or_else(|| ApiError::internal(format!("Rpc.Runtime_error(\"Unknown tag '{text}'\")")))
}

impl<'a> Args<'a> {
    fn required(&self, index: usize) -> ApiResult<&'a Value> {
        self.values
            .get(index)
            .ok_or_else(|| ApiError::internal(format!("missing parameter {index}")))
    }

    pub fn string(&self, index: usize) -> ApiResult<String> {
        as_string(self.required(index)?)
    }

    pub fn int64(&self, index: usize) -> ApiResult<i64> {
        as_int64(self.required(index)?)
    }

    pub fn bool(&self, index: usize) -> ApiResult<bool> {
        as_bool(self.required(index)?)
    }

    pub fn map(&self, index: usize) -> ApiResult<Map> {
        as_map(self.required(index)?)
    }

    /// A defaulted string parameter.
    pub fn string_or(&self, index: usize, default: &str) -> ApiResult<String> {
        self.values
            .get(index)
            .map_or(Ok(default.to_string()), as_string)
    }

    /// A defaulted map parameter.
    pub fn map_or_empty(&self, index: usize) -> ApiResult<Map> {
        self.values.get(index).map_or(Ok(Map::new()), as_map)
    }

    /// A constructor's record parameter.
    pub fn record(&self, index: usize) -> ApiResult<RecordArg<'a>> {
        match self.required(index)? {
            Value::Struct(fields) => Ok(RecordArg { fields }),
            other => Err(runtime_error("struct", other)),
        }
    }
}

/// The struct a constructor (`VDI.create`, `VBD.create`, `PBD.create`) takes.
pub struct RecordArg<'a> {
    fields: &'a BTreeMap<String, Value>,
}

impl RecordArg<'_> {
    fn field(&self, name: &str) -> ApiResult<&Value> {
        self.fields
            .get(name)
            .ok_or_else(|| ApiError::field_not_found(name))
    }

    pub fn string(&self, name: &str) -> ApiResult<String> {
        as_string(self.field(name)?)
    }

    pub fn string_or(&self, name: &str, default: &str) -> ApiResult<String> {
        self.fields
            .get(name)
            .map_or(Ok(default.to_string()), as_string)
    }

    pub fn int64(&self, name: &str) -> ApiResult<i64> {
        as_int64(self.field(name)?)
    }

    pub fn bool(&self, name: &str) -> ApiResult<bool> {
        as_bool(self.field(name)?)
    }

    pub fn bool_or(&self, name: &str, default: bool) -> ApiResult<bool> {
        self.fields.get(name).map_or(Ok(default), as_bool)
    }

    pub fn map(&self, name: &str) -> ApiResult<Map> {
        as_map(self.field(name)?)
    }

    pub fn map_or_empty(&self, name: &str) -> ApiResult<Map> {
        self.fields.get(name).map_or(Ok(Map::new()), as_map)
    }

    pub fn strings_or_empty(&self, name: &str) -> ApiResult<Vec<String>> {
        self.fields.get(name).map_or(Ok(Vec::new()), as_strings)
    }

    pub fn enumeration(&self, name: &str, choices: &[&'static str]) -> ApiResult<&'static str> {
        as_enum(self.field(name)?, choices)
    }
}

/// Which side of the pool a listener plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Master,
    /// A pool supporter: every XenAPI call fails with HOST_IS_SLAVE.
    Slave,
}

/// What the HTTP layer sends back.
pub enum Reply {
    /// A methodResponse body (success or API failure).
    Xml { body: Vec<u8>, host_is_slave: bool },
    /// Not an XML-RPC call: HTTP 500.
    Malformed(codec::ParseError),
}

/// Handles one request body. Runs on a blocking thread: handlers may sleep and touch files.
pub fn handle(sim: &Arc<SimState>, role: Role, body: &[u8]) -> Reply {
    let call = match codec::parse_call(body) {
        Ok(call) => call,
        Err(e) => return Reply::Malformed(e),
    };
    let started = Instant::now();
    if let Some(control) = call.method.strip_prefix("simulator.") {
        let outcome = super::control::call(sim, control, &call.params);
        return Reply::Xml {
            body: encode(&outcome),
            host_is_slave: false,
        };
    }
    let moved = sim.master_moved.load(std::sync::atomic::Ordering::SeqCst);
    let outcome = if (role == Role::Slave) != moved {
        let master = match (moved, sim.slave_address.get()) {
            (true, Some(slave)) => slave.clone(),
            _ => sim.master_address.clone(),
        };
        Err(ApiError::new("HOST_IS_SLAVE", [master]))
    } else {
        guarded(|| execute(sim, &call.method, &call.params))
    };
    sim.hooks.log_call(
        &call.method,
        &call.params,
        outcome.as_ref().map(|_| ()),
        started.elapsed(),
    );
    let host_is_slave = matches!(&outcome, Err(e) if e.code == "HOST_IS_SLAVE");
    let body = match &outcome {
        // xapi answers this one without the Status envelope.
        Ok(value) if call.method == "system.listMethods" => codec::unwrapped(value),
        _ => encode(&outcome),
    };
    Reply::Xml {
        body,
        host_is_slave,
    }
}

/// Runs `work`, turning a panic into INTERNAL_ERROR as xapi turns exceptions into one.
fn guarded(work: impl FnOnce() -> ApiResult<Value>) -> ApiResult<Value> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        Err(ApiError::internal(format!("simulator bug: {message}")))
    })
}

fn encode(outcome: &ApiResult<Value>) -> Vec<u8> {
    match outcome {
        Ok(value) => codec::success(value),
        Err(e) => codec::failure(&e.code, &e.params),
    }
}

/// Runs one XenAPI call on the master.
pub fn execute(sim: &Arc<SimState>, name: &str, params: &[Value]) -> ApiResult<Value> {
    if name == "system.listMethods" {
        return Ok(Value::Array(
            sim.methods.names().into_iter().map(Value::String).collect(),
        ));
    }
    let (base, is_async) = match name.strip_prefix("Async.") {
        Some(base) => (base, true),
        None => (name, false),
    };
    let method = sim
        .methods
        .get(base)
        .filter(|m| !is_async || m.async_ok)
        .ok_or_else(|| ApiError::new("MESSAGE_METHOD_UNKNOWN", [name]))?;
    let leading = usize::from(method.session);
    let given = params.len() as i64 - leading as i64;
    if given < method.required as i64 || given > method.params as i64 {
        return Err(ApiError::new(
            "MESSAGE_PARAMETER_COUNT_MISMATCH",
            [
                name.to_string(),
                method.required.to_string(),
                given.to_string(),
            ],
        ));
    }
    let session = if method.session {
        let handle = as_string(&params[0]).unwrap_or_default();
        sim.check_session(&handle)?;
        handle
    } else {
        String::new()
    };
    let args = &params[leading..];
    if is_async {
        return Ok(Value::String(start_task(
            sim,
            name,
            base,
            method.clone(),
            session,
            args.to_vec(),
        )));
    }
    if let Some(fault) = sim.hooks.next_call(base) {
        return Err(fault);
    }
    let ctx = Ctx {
        sim,
        session,
        task: None,
    };
    pause_for(sim, base, &ctx);
    (method.handler)(&ctx, &Args { values: args })
}

/// Sleeps for the delay set on `method`, except where the handler paces itself (`VDI.copy`).
fn pause_for(sim: &Arc<SimState>, method: &str, ctx: &Ctx) {
    if method == "VDI.copy" {
        return;
    }
    let delay = sim.hooks.delay(method);
    let until = Instant::now() + delay;
    while (Instant::now() < until || sim.hooks.is_hung(method)) && !ctx.cancelled() {
        let left = until.saturating_duration_since(Instant::now());
        std::thread::sleep(match left.is_zero() {
            true => Duration::from_millis(20),
            false => left.min(Duration::from_millis(20)),
        });
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn start_task(
    sim: &Arc<SimState>,
    name: &str,
    base: &str,
    method: Method,
    session: String,
    args: Vec<Value>,
) -> String {
    let task_ref = model::new_ref();
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let mut db = sim
            .db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let host = db.master.clone();
        db.tasks.insert(
            task_ref.clone(),
            Task {
                uuid: model::new_uuid(),
                name_label: name.to_string(),
                name_description: String::new(),
                created: unix_now(),
                finished: 0,
                status: "pending".into(),
                resident_on: host,
                progress: 0.0,
                result: String::new(),
                error_info: Vec::new(),
                other_config: Map::new(),
                cancel: cancel.clone(),
                cancellable: base == "VDI.copy",
                destroy_when_done: false,
            },
        );
    }
    let sim = sim.clone();
    let base = base.to_string();
    let task = task_ref.clone();
    std::thread::spawn(move || {
        let ctx = Ctx {
            sim: &sim,
            session,
            task: Some(TaskCtx {
                task: task.clone(),
                cancel: cancel.clone(),
            }),
        };
        let outcome = match sim.hooks.next_call(&base) {
            Some(fault) => Err(fault),
            None => {
                pause_for(&sim, &base, &ctx);
                guarded(|| {
                    ctx.check_cancelled()
                        .and_then(|()| (method.handler)(&ctx, &Args { values: &args }))
                })
            }
        };
        let mut db = sim
            .db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(record) = db.tasks.get_mut(&task) else {
            return;
        };
        record.finished = unix_now();
        match outcome {
            Ok(value) => {
                record.status = "success".into();
                record.progress = 1.0;
                record.result = codec::value_fragment(&value);
            }
            Err(e) => {
                record.status = if e.code == "TASK_CANCELLED" {
                    "cancelled"
                } else {
                    "failure"
                }
                .into();
                record.progress = 1.0;
                record.error_info = std::iter::once(e.code).chain(e.params).collect();
            }
        }
        if record.destroy_when_done {
            db.tasks.remove(&task);
        }
    });
    task_ref
}

/// `task.cancel`: only pending, cancellable tasks.
pub fn cancel_task(sim: &SimState, task: &str) -> ApiResult<()> {
    let mut db = sim
        .db
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let record = model::lookup_mut(&mut db.tasks, "task", task)?;
    if record.status != "pending" || !record.cancellable {
        return Err(ApiError::new(
            "OPERATION_NOT_ALLOWED",
            [format!(
                "task {} cannot be cancelled in state {}",
                record.uuid, record.status
            )],
        ));
    }
    record.status = "cancelling".into();
    record.cancel.store(true, Ordering::SeqCst);
    Ok(())
}

/// `task.destroy`: deferred until a pending task ends.
pub fn destroy_task(sim: &SimState, task: &str) -> ApiResult<()> {
    let mut db = sim
        .db
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let record = model::lookup_mut(&mut db.tasks, "task", task)?;
    if record.status == "pending" || record.status == "cancelling" {
        record.destroy_when_done = true;
    } else {
        db.tasks.remove(task);
    }
    Ok(())
}
