//! Who may use the control socket, with real users: the daemon runs as root, the CLI (and curl)
//! run as throw-away system users created here (`setpriv` switches to them). An outsider is
//! refused, first by the socket's mode (0660, group-owned) and, where the socket is opened up,
//! by the SO_PEERCRED check with a 403 naming its uid; members of `socket_group` are served.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use support::{Daemon, Sim, daemon_config};

const GROUP: &str = "xenapinfs-test-sock";
const OUTSIDER: &str = "xenapinfs-test-outsider";
const MEMBER: &str = "xenapinfs-test-member";

/// Tests sharing the accounts; the last one out removes them.
static ACCOUNT_USERS: Mutex<usize> = Mutex::new(0);

/// The test accounts: a socket group, a user outside it and a user in it (supplementary).
struct Accounts {
    group_gid: u32,
    outsider: (u32, u32),
    member: (u32, u32),
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn user_ids(name: &str) -> (u32, u32) {
    let user = nix::unistd::User::from_name(name)
        .unwrap()
        .unwrap_or_else(|| panic!("user {name} missing"));
    (user.uid.as_raw(), user.gid.as_raw())
}

impl Accounts {
    /// Creates what is missing (idempotent: a crashed earlier run may have left them).
    fn acquire() -> Accounts {
        let mut users = ACCOUNT_USERS.lock().unwrap_or_else(|e| e.into_inner());
        if nix::unistd::Group::from_name(GROUP).unwrap().is_none() {
            run("groupadd", &["--system", GROUP]);
        }
        for (name, groups) in [(OUTSIDER, None), (MEMBER, Some(GROUP))] {
            if nix::unistd::User::from_name(name).unwrap().is_none() {
                let mut args = vec![
                    "--system",
                    "--no-create-home",
                    "--user-group",
                    "--shell",
                    "/usr/sbin/nologin",
                ];
                if let Some(group) = groups {
                    args.extend(["--groups", group]);
                }
                args.push(name);
                run("useradd", &args);
            } else if let Some(group) = groups {
                run("usermod", &["--append", "--groups", group, name]);
            }
        }
        *users += 1;
        Accounts {
            group_gid: nix::unistd::Group::from_name(GROUP)
                .unwrap()
                .unwrap()
                .gid
                .as_raw(),
            outsider: user_ids(OUTSIDER),
            member: user_ids(MEMBER),
        }
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        let mut users = ACCOUNT_USERS.lock().unwrap_or_else(|e| e.into_inner());
        *users -= 1;
        if *users == 0 {
            for name in [OUTSIDER, MEMBER] {
                let _ = Command::new("userdel").arg(name).output();
            }
            let _ = Command::new("groupdel").arg(GROUP).output();
        }
    }
}

/// How a command is run: as whom, with which groups.
enum As {
    /// `uid`/`gid` with no supplementary groups.
    Ids(u32, u32),
    /// The named user with the groups of the group database (`--init-groups`).
    User(&'static str),
}

fn command_as(who: &As, program: &Path) -> Command {
    let mut command = Command::new("setpriv");
    match who {
        As::Ids(uid, gid) => {
            command.args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".to_string(),
            ]);
        }
        As::User(name) => {
            let (uid, gid) = user_ids(name);
            command.args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--init-groups".to_string(),
            ]);
        }
    }
    command.arg("--").arg(program);
    command
}

/// The real CLI as another user: (exit ok, stdout, stderr).
fn cli_as(who: &As, socket: &Path, args: &[&str]) -> (bool, String, String) {
    let mut command = command_as(who, Path::new(env!("CARGO_BIN_EXE_xenapinfs")));
    command.arg("--socket").arg(socket).args(args);
    support::run_captured(&mut command)
}

/// `curl` as another user on the socket: (HTTP status, body). None when curl is not installed.
fn curl_as(who: &As, socket: &Path, path: &str) -> Option<(u16, String)> {
    let curl = ["/usr/bin/curl", "/bin/curl"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())?;
    let output = command_as(who, &curl)
        .args(["-sS", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(socket)
        .arg(format!("http://localhost{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap();
    Some((status.trim().parse().unwrap(), body.to_string()))
}

/// The daemon with its log (warnings) in a file, so refusals can be checked there.
fn start_daemon(sim: &Sim, extra_config: &str) -> (Daemon, PathBuf) {
    // The simulator's temporary directory holds the socket: let other users through it.
    std::fs::set_permissions(sim.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let config = daemon_config(sim, extra_config);
    let log = sim.dir.path().join("daemon.log");
    let daemon = Daemon::start_logging(&config, Some(&log), "warn");
    daemon.settled_status();
    (daemon, log)
}

fn group_config() -> String {
    format!("socket_group = \"{GROUP}\"\n")
}

#[test]
fn the_socket_is_0660_and_owned_by_the_socket_group() {
    let accounts = Accounts::acquire();
    let sim = Sim::plain();
    let (daemon, _) = start_daemon(&sim, &group_config());
    let meta = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), accounts.group_gid);
    assert_eq!(meta.uid(), 0);
}

#[test]
fn an_outsider_cannot_even_connect_and_is_told_why() {
    let accounts = Accounts::acquire();
    let sim = Sim::plain();
    let (daemon, _) = start_daemon(&sim, &group_config());
    let (uid, gid) = accounts.outsider;
    for who in [As::Ids(uid, gid), As::User(OUTSIDER)] {
        let (ok, out, err) = cli_as(&who, &daemon.socket, &["volume", "list"]);
        assert!(!ok, "an outsider was served: {out}");
        assert!(err.contains("Permission denied"), "{err}");
        assert!(
            err.contains(&daemon.socket.display().to_string()),
            "the refusal names the socket: {err}"
        );
        assert!(
            !err.contains("is the service running"),
            "a permission problem is not a stopped service: {err}"
        );
        assert!(err.contains("group"), "the refusal says who may: {err}");
    }
    // The daemon itself is unharmed.
    let (ok, _, err) = daemon.cli(&["status"]);
    assert!(ok, "{err}");
}

#[test]
fn an_outsider_that_can_connect_gets_403_naming_its_uid() {
    let accounts = Accounts::acquire();
    let sim = Sim::plain();
    let (daemon, log) = start_daemon(&sim, &group_config());
    // Open the socket to everyone: only the peer-credential check stands in the way now.
    std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (uid, gid) = accounts.outsider;

    for args in [
        &["status"][..],
        &["volume", "list"],
        &["volume", "create", "--size", "1"],
    ] {
        let (ok, out, err) = cli_as(&As::User(OUTSIDER), &daemon.socket, args);
        assert!(!ok, "xenapinfs {args:?} as an outsider was served: {out}");
        assert!(
            err.contains(&format!("uid {uid} may not use xenapinfsd")),
            "{err}"
        );
        assert!(err.contains(GROUP), "the refusal names the group: {err}");
    }

    // The same with a primary group that merely resembles membership: still refused.
    let (ok, _, err) = cli_as(&As::Ids(uid, gid), &daemon.socket, &["stats"]);
    assert!(!ok);
    assert!(err.contains(&format!("uid {uid}")), "{err}");

    // On the wire: 403 with the one JSON error shape, for every route, known or not.
    for path in ["/v1/health", "/v1/volumes", "/metrics", "/no/such/route"] {
        let Some((status, body)) = curl_as(&As::User(OUTSIDER), &daemon.socket, path) else {
            eprintln!("curl not installed: wire check skipped");
            break;
        };
        assert_eq!(status, 403, "{path}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["kind"], "forbidden", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("uid {uid}")),
            "{body}"
        );
    }

    // Nothing was created by the refused create.
    assert!(sim.sr_dirs().is_empty(), "{:?}", sim.sr_dirs());
    let (ok, out, _) = daemon.cli(&["volume", "list", "--json"]);
    assert!(ok);
    assert_eq!(out.trim(), "[]");

    // The refusal is logged with the caller's uid.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("refused") && l.contains(&format!("uid={uid}"))),
        "no refusal naming uid {uid} in the log:\n{text}"
    );
}

#[test]
fn members_of_the_socket_group_are_served() {
    let accounts = Accounts::acquire();
    let sim = Sim::plain();
    let (daemon, _) = start_daemon(&sim, &group_config());

    // A member through its supplementary groups, as a login gives them.
    let member = As::User(MEMBER);
    let (ok, out, err) = cli_as(&member, &daemon.socket, &["status", "--json"]);
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["xenapi"]["session"], "established", "{status}");

    let (ok, out, err) = cli_as(
        &member,
        &daemon.socket,
        &[
            "volume",
            "create",
            "--size",
            "1",
            "--name",
            "by-member",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let volume: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = volume["id"].as_str().unwrap().to_string();
    let (ok, _, err) = cli_as(&member, &daemon.socket, &["volume", "delete", &id]);
    assert!(ok, "{err}");

    // A process whose primary group is the socket group is a member too.
    let (uid, _) = accounts.outsider;
    let (ok, _, err) = cli_as(
        &As::Ids(uid, accounts.group_gid),
        &daemon.socket,
        &["volume", "list"],
    );
    assert!(ok, "{err}");
    assert!(sim.sr_dirs().is_empty(), "{:?}", sim.sr_dirs());
}

#[test]
fn without_the_socket_group_only_root_is_served() {
    let accounts = Accounts::acquire();
    let sim = Sim::plain();
    let (daemon, log) = start_daemon(&sim, "socket_group = \"xenapinfs-test-no-such-group\"\n");
    let meta = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 0, "the socket stays root's");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("the socket group does not exist")
    );
    std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, _, err) = cli_as(&As::User(MEMBER), &daemon.socket, &["volume", "list"]);
    assert!(!ok, "a member of an unrelated group was served");
    assert!(
        err.contains(&format!("uid {} may not", accounts.member.0)),
        "{err}"
    );
    let (ok, _, err) = daemon.cli(&["volume", "list"]);
    assert!(ok, "root is always served: {err}");
}
