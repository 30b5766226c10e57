//! session and task messages.

use super::classes::{reference, void};
use super::dispatch::{self, Methods};
use super::error::ApiError;
use super::model::{self, Db, Map, Session};
use super::state::unix_now;

/// xapi's `max_sessions_per_originator`.
const MAX_PER_ORIGINATOR: usize = 500;
/// xapi's limit for root sessions without an originator (`max_tasks * 2`).
const MAX_ANONYMOUS: usize = 400;

/// Makes room for one more session in the originator's group, dropping the least recently
/// used ones, as xapi's session GC does.
fn evict_over_limit(db: &mut Db, originator: &str) {
    let limit = if originator.is_empty() {
        MAX_ANONYMOUS
    } else {
        MAX_PER_ORIGINATOR
    };
    let mut group: Vec<(u64, String)> = db
        .sessions
        .iter()
        .filter(|(_, s)| s.originator == originator)
        .map(|(r, s)| (s.used_seq, r.clone()))
        .collect();
    if group.len() < limit {
        return;
    }
    group.sort();
    for (_, handle) in group.iter().take(group.len() + 1 - limit) {
        db.sessions.remove(handle);
    }
}

pub fn register(m: &mut Methods) {
    m.add_sessionless("session.login_with_password", 4, 2, |ctx, args| {
        let user = args.string(0)?;
        let password = args.string(1)?;
        let originator = args.string_or(3, "")?;
        let config = &ctx.sim.config;
        let accepted = user == "root" && config.password.as_ref().is_none_or(|p| *p == password);
        if !accepted {
            // xapi sleeps before refusing, to slow down guessing.
            std::thread::sleep(config.auth_failure_delay);
            return Err(ApiError::new(
                "SESSION_AUTHENTICATION_FAILED",
                [user.as_str(), "Authentication failure"],
            ));
        }
        let handle = model::new_ref();
        let mut db = ctx.db();
        let host = db.master.clone();
        db.session_seq += 1;
        let used_seq = db.session_seq;
        evict_over_limit(&mut db, &originator);
        db.sessions.insert(
            handle.clone(),
            Session {
                uuid: model::new_uuid(),
                this_host: host,
                originator,
                user,
                last_active: unix_now(),
                used_seq,
                other_config: Map::new(),
            },
        );
        reference(handle)
    });
    m.add("session.logout", 0, 0, false, |ctx, _| {
        ctx.db().sessions.remove(&ctx.session);
        void()
    });
    m.add("session.local_logout", 0, 0, false, |ctx, _| {
        ctx.db().sessions.remove(&ctx.session);
        void()
    });
    m.add("task.cancel", 1, 1, true, |ctx, args| {
        dispatch::cancel_task(ctx.sim, &args.string(0)?)?;
        void()
    });
    m.add("task.destroy", 1, 1, true, |ctx, args| {
        dispatch::destroy_task(ctx.sim, &args.string(0)?)?;
        void()
    });
}
