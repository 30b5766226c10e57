//! Health of the agent as an operator sees it: the share mount check at start, and
//! `GET /metrics` after real work done through the CLI.

mod support;

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use support::{World, patterned_raw, wait_with_timeout};
use xenapinfs::api::client::ApiClient;

#[test]
fn the_daemon_refuses_to_start_when_the_share_is_not_mounted() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("sr-mount");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    let socket = dir.path().join("xenapinfs.sock");
    let config = dir.path().join("xenapinfs.toml");
    // share_mount_check is on by default; nothing listens at the XenAPI URL, and nothing
    // needs to: the agent must stop before reaching for it.
    std::fs::write(
        &config,
        format!(
            "xenapi_connection_url = \"http://127.0.0.1:9\"\n\
             xenapi_connection_password = \"unused\"\n\
             xenapi_nfs_server = \"nfs.example\"\n\
             xenapi_nfs_serverpath = \"/volumes\"\n\
             xenapi_sr_base_path = \"{}\"\n\
             socket = \"{}\"\n\
             state_dir = \"{}\"\n",
            base.display(),
            socket.display(),
            dir.path().join("state").display(),
        ),
    )
    .unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    let mut daemon = Command::new(env!("CARGO_BIN_EXE_xenapinfsd"))
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_with_timeout(&mut daemon, Duration::from_secs(20));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut daemon.stderr.take().unwrap(), &mut stderr).unwrap();

    assert!(!status.success(), "started without its share: {stderr}");
    assert_ne!(
        status.code(),
        Some(78),
        "a missing mount is not a configuration error: a restart may find it"
    );
    for wanted in [
        base.display().to_string(),
        "nothing is mounted there".to_string(),
        "nfs or nfs4 mount of nfs.example:/volumes".to_string(),
        "share_mount_check = false".to_string(),
    ] {
        assert!(stderr.contains(&wanted), "{wanted:?} not in: {stderr}");
    }
    let mut datagram = vec![0u8; 4096];
    let length = notify
        .recv(&mut datagram)
        .expect("no STATUS= sent to systemd");
    let message = String::from_utf8_lossy(&datagram[..length]).into_owned();
    assert!(
        message.starts_with("STATUS=refusing to start: the share is not mounted")
            && message.contains(&base.display().to_string()),
        "{message}"
    );
    assert!(
        !socket.exists(),
        "the control socket must not be served without the share"
    );
}

/// Samples of an exposition by series (`name{labels}`), checking every line's format on
/// the way: comments are `# HELP|TYPE|UNIT name ...` or the final `# EOF`, samples are
/// `name{label="value",...} number`.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let is_name = |name: &str| {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    assert!(text.ends_with("# EOF\n"), "no # EOF at the end: {text}");
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if line == "# EOF" {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            let keyword = words.next().unwrap_or_default();
            let name = words.next().unwrap_or_default();
            assert!(
                matches!(keyword, "HELP" | "TYPE" | "UNIT") && is_name(name),
                "bad comment line: {line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line: {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(is_name(name), "bad metric name in {line:?}");
        let labels = &series[name.len()..];
        if !labels.is_empty() {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix("\"}"))
                .unwrap_or_else(|| panic!("bad labels in {line:?}"));
            for pair in inner.split("\",") {
                let (key, value) = pair
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("bad label in {line:?}"));
                assert!(is_name(key), "bad label name in {line:?}");
                assert!(
                    !value.contains('\n') && !value.ends_with('\\'),
                    "bad label value in {line:?}"
                );
            }
        }
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad sample value in {line:?}"));
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "series {series} given twice"
        );
    }
    samples
}

/// GETs `/metrics` over the control socket: (content type, samples).
async fn scrape(socket: &Path) -> (String, BTreeMap<String, f64>) {
    let response = ApiClient::new(socket)
        .send("GET", "/metrics", None)
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        content_type,
        parse_exposition(std::str::from_utf8(&body).unwrap()),
    )
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no series {series}; have {:?}", samples.keys()))
}

fn operations(samples: &BTreeMap<String, f64>, operation: &str, outcome: &str) -> f64 {
    value(
        samples,
        &format!("xenapinfs_operations_total{{operation=\"{operation}\",outcome=\"{outcome}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_operations_bytes_and_xenapi_calls_done_through_the_cli() {
    let world = World::start().await;
    let (content_type, before) = scrape(&world.daemon.socket).await;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert_eq!(operations(&before, "create", "succeeded"), 0.0);
    assert!(
        value(
            &before,
            "xenapinfs_xenapi_calls_total{method=\"session.login_with_password\"}"
        ) >= 1.0
    );

    let id = world.create(2, "metered");
    let refusal = world.fails(&["volume", "extend", &id, "--size", "1"]);
    assert!(!refusal.is_empty());
    world.ok(&["volume", "snapshot", &id, "--name", "metered-snap"]);
    let image = world.sim.dir.path().join("image.raw");
    patterned_raw(&image, 8 << 20);
    world.ok(&[
        "volume",
        "create",
        "--size",
        "1",
        "--image",
        image.to_str().unwrap(),
    ]);
    let exported = world.sim.dir.path().join("exported.vhd");
    world.ok(&[
        "volume",
        "export",
        &id,
        exported.to_str().unwrap(),
        "--format",
        "vhd",
    ]);

    // A job is counted as it ends, which may be a moment after its last byte was sent.
    let started = Instant::now();
    let after = loop {
        let (_, samples) = scrape(&world.daemon.socket).await;
        if value(&samples, "xenapinfs_jobs_running") == 0.0
            && operations(&samples, "export", "succeeded") == 1.0
        {
            break samples;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "jobs still running: {samples:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(operations(&after, "create", "succeeded"), 1.0);
    assert_eq!(operations(&after, "extend", "failed"), 1.0);
    assert_eq!(operations(&after, "extend", "succeeded"), 0.0);
    assert_eq!(operations(&after, "snapshot", "succeeded"), 1.0);
    assert_eq!(operations(&after, "create-from-image", "succeeded"), 1.0);
    assert_eq!(
        value(
            &after,
            "xenapinfs_operation_duration_seconds_count{operation=\"snapshot\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&after, "xenapinfs_imported_bytes_total"),
        (8 << 20) as f64
    );
    assert_eq!(
        value(&after, "xenapinfs_exported_bytes_total"),
        std::fs::metadata(&exported).unwrap().len() as f64
    );
    let calls = |samples: &BTreeMap<String, f64>| -> f64 {
        samples
            .iter()
            .filter(|(series, _)| series.starts_with("xenapinfs_xenapi_calls_total{"))
            .map(|(_, v)| v)
            .sum()
    };
    assert!(calls(&after) > calls(&before), "{after:?}");
    assert!(value(&after, "xenapinfs_xenapi_calls_total{method=\"SR.create\"}") >= 2.0);
    world.assert_xapi_clean().await;
}
