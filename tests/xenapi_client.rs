//! The XenAPI client against the simulator over real HTTP and HTTPS.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{SIM_PASSWORD, Sim, SimOptions, VM_UUID};
use tokio_util::sync::CancellationToken;
use xenapinfs::xenapi::codec::Value;
use xenapinfs::xenapi::*;

const GIB: u64 = 1 << 30;

fn nfs_config() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("server".to_string(), "nfs.example".to_string()),
        ("serverpath".to_string(), "/volumes".to_string()),
    ])
}

fn sr_spec() -> SrSpec<'static> {
    SrSpec {
        name_label: "test volume",
        name_description: "made by xenapi_client tests",
        sr_type: "nfs",
        content_type: "user",
        shared: true,
    }
}

async fn new_sr_with_vdi(client: &XenApiClient, size: u64) -> (Ref<Sr>, Ref<Vdi>) {
    let host = client.pool_master().await.unwrap();
    let sr = client
        .sr_create(&host, &nfs_config(), &sr_spec(), &BTreeMap::new())
        .await
        .unwrap();
    let vdi = client
        .vdi_create(&NewVdi {
            sr: &sr,
            name_label: "disk",
            name_description: "",
            virtual_size: size,
            other_config: &BTreeMap::new(),
        })
        .await
        .unwrap();
    (sr, vdi)
}

fn string(value: &str) -> Value {
    Value::String(value.to_string())
}

#[tokio::test]
async fn logs_in_and_reads_typed_records() {
    let sim = Sim::plain();
    let client = sim.client();
    client.connect().await.unwrap();
    assert!(client.state().logged_in);

    let master = client.pool_master().await.unwrap();
    let host: HostRecord = client.get_record(&master).await.unwrap();
    assert!(!host.address.is_empty());
    assert_eq!(client.session_this_host().await.unwrap(), master);

    let vm = client.get_by_uuid::<Vm>(VM_UUID).await.unwrap();
    let record: VmRecord = client.get_record(&vm).await.unwrap();
    assert_eq!(record.uuid, VM_UUID);
    assert_eq!(record.power_state, "Running");
    assert_eq!(client.vm_resident_on(&vm).await.unwrap(), master);
    assert!(!record.is_control_domain);

    let (sr, vdi) = new_sr_with_vdi(&client, GIB + 1).await;
    let record: VdiRecord = client.get_record(&vdi).await.unwrap();
    // int64 fields arrive as strings and come out as integers, rounded up to 2 MiB as SM does.
    assert_eq!(record.virtual_size, GIB + 2 * 1024 * 1024);
    assert_eq!(record.sr, sr);
    let srs = client.get_all_records::<Sr>().await.unwrap();
    assert!(
        srs.iter()
            .any(|(r, rec)| *r == sr && rec.sr_type == "nfs" && rec.vdis.contains(&vdi))
    );
    let vhd = sim
        .export
        .join(client.get_record(&sr).await.unwrap().uuid)
        .join(format!("{}.vhd", record.uuid));
    assert!(vhd.is_file(), "{} should exist", vhd.display());
}

#[tokio::test]
async fn logs_in_again_after_the_session_expires() {
    let sim = Sim::plain();
    let client = sim.client();
    client.connect().await.unwrap();
    client.pool_master().await.unwrap();
    sim.control("simulator.expire_sessions", &[]).await;

    // The next call meets SESSION_INVALID, logs in again and succeeds without the caller noticing.
    client.pool_master().await.unwrap();
    assert_eq!(client.state().logins, 2);
    let methods = sim.logged_methods();
    assert_eq!(
        methods
            .iter()
            .filter(|m| *m == "session.login_with_password")
            .count(),
        2
    );
}

#[tokio::test]
async fn follows_host_is_slave_to_the_master() {
    let sim = Sim::start(SimOptions {
        pool_slave: true,
        ..SimOptions::default()
    });
    let slave = sim.slave_url.clone().unwrap();
    let client = sim.client_with(&slave, SIM_PASSWORD, TlsTrust::Insecure);
    client.connect().await.unwrap();
    assert_eq!(
        client.state().url,
        sim.url,
        "calls must go to the master after the redirect"
    );
    client.pool_master().await.unwrap();
}

#[tokio::test]
async fn wrong_password_is_an_authentication_failure_that_does_not_echo_the_password() {
    let sim = Sim::plain();
    let client = sim.client_with(&sim.url, "not-the-password", TlsTrust::Insecure);
    let error = client.connect().await.unwrap_err();
    assert!(error.is("SESSION_AUTHENTICATION_FAILED"), "{error}");
    assert!(!error.to_string().contains("not-the-password"), "{error}");
    assert!(!client.state().logged_in);
}

#[tokio::test]
async fn an_unreachable_host_is_a_transport_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    drop(listener);
    let sim = Sim::plain();
    let client = sim.client_with(&url, SIM_PASSWORD, TlsTrust::Insecure);
    let error = client.connect().await.unwrap_err();
    assert!(error.is_unreachable(), "{error}");
    assert!(client.state().last_error.is_some());
}

#[tokio::test]
async fn api_errors_keep_code_and_parameters() {
    let sim = Sim::plain();
    let client = sim.client();

    let bogus: Ref<Vdi> = Ref::new("OpaqueRef:00000000-0000-4000-8000-000000000000");
    let error = client.get_record(&bogus).await.unwrap_err();
    assert!(error.is("HANDLE_INVALID"), "{error}");
    assert_eq!(error.params(), ["VDI", bogus.as_str()]);

    let error = client
        .get_by_uuid::<Sr>("11111111-2222-4333-8444-555555555555")
        .await
        .unwrap_err();
    assert!(error.is("UUID_INVALID"), "{error}");
    assert_eq!(error.params()[0], "SR");

    let error = client.call("VDI.frobnicate", &[]).await.unwrap_err();
    assert!(error.is("MESSAGE_METHOD_UNKNOWN"), "{error}");

    let host = client.pool_master().await.unwrap();
    let mut wrong = nfs_config();
    wrong.insert("server".into(), "elsewhere.example".into());
    let error = client
        .sr_create(&host, &wrong, &sr_spec(), &BTreeMap::new())
        .await
        .unwrap_err();
    assert!(
        error.code().unwrap().starts_with("SR_BACKEND_FAILURE"),
        "{error}"
    );

    sim.control(
        "simulator.inject_fault",
        &[
            string("VDI.create"),
            Value::Int(1),
            string("SR_BACKEND_FAILURE_78"),
            Value::Array(vec![string(""), string("VDI Creation failed"), string("")]),
        ],
    )
    .await;
    let sr = client
        .sr_create(&host, &nfs_config(), &sr_spec(), &BTreeMap::new())
        .await
        .unwrap();
    let error = client
        .vdi_create(&NewVdi {
            sr: &sr,
            name_label: "x",
            name_description: "",
            virtual_size: GIB,
            other_config: &BTreeMap::new(),
        })
        .await
        .unwrap_err();
    assert!(error.is("SR_BACKEND_FAILURE_78"), "{error}");
    assert_eq!(error.params()[1], "VDI Creation failed");
    assert!(error.to_string().contains("VDI.create"), "{error}");
}

fn progress_recorder() -> (Arc<Mutex<Vec<f64>>>, impl FnMut(f64) + Send) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    (seen, move |p| sink.lock().unwrap().push(p))
}

#[tokio::test]
async fn async_vdi_copy_reports_progress_and_returns_the_new_vdi() {
    let sim = Sim::plain();
    let client = sim.client();
    let (_, vdi) = new_sr_with_vdi(&client, 64 << 20).await;
    let (target, _) = new_sr_with_vdi(&client, 2 << 20).await;
    sim.control(
        "simulator.set_delay",
        &[string("VDI.copy"), Value::Int(1500)],
    )
    .await;

    let task = client.vdi_copy_async(&vdi, &target).await.unwrap();
    let (seen, mut on_progress) = progress_recorder();
    let cancel = CancellationToken::new();
    let result = client
        .wait_task(
            &task,
            TaskWait {
                poll_interval: Duration::from_millis(100),
                timeout: Some(Duration::from_secs(60)),
                stall_timeout: None,
                cancel: &cancel,
                on_progress: &mut on_progress,
            },
        )
        .await
        .unwrap();
    let copy: Ref<Vdi> = Ref::new(result.as_str().expect("task result is a VDI reference"));
    let record: VdiRecord = client.get_record(&copy).await.unwrap();
    assert_eq!(record.sr, target);
    assert_eq!(record.virtual_size, 64 << 20);

    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.len() >= 3,
        "progress should be reported along the way: {seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "progress never goes back: {seen:?}"
    );
    assert_eq!(*seen.last().unwrap(), 1.0);
    // The finished task is destroyed, not left behind in xapi.
    assert!(
        client
            .get_record(&task)
            .await
            .unwrap_err()
            .is("HANDLE_INVALID")
    );
}

#[tokio::test]
async fn cancelling_an_async_copy_leaves_no_copy_behind() {
    let sim = Sim::plain();
    let client = sim.client();
    let (_, vdi) = new_sr_with_vdi(&client, 64 << 20).await;
    let (target, _) = new_sr_with_vdi(&client, 2 << 20).await;
    let target_dir = sim
        .export
        .join(client.get_record(&target).await.unwrap().uuid);
    let before = support::entries(&target_dir);
    sim.control(
        "simulator.set_delay",
        &[string("VDI.copy"), Value::Int(5000)],
    )
    .await;

    let task = client.vdi_copy_async(&vdi, &target).await.unwrap();
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let mut on_progress = move |p: f64| {
        if p > 0.0 {
            trigger.cancel();
        }
    };
    let error = client
        .wait_task(
            &task,
            TaskWait {
                poll_interval: Duration::from_millis(100),
                timeout: None,
                stall_timeout: None,
                cancel: &cancel,
                on_progress: &mut on_progress,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, XenApiError::TaskCancelled { .. }),
        "{error}"
    );
    assert_eq!(
        support::entries(&target_dir),
        before,
        "no partial copy may remain"
    );
    let vdis: SrRecord = client.get_record(&target).await.unwrap();
    assert_eq!(vdis.vdis.len(), 1);
}

#[tokio::test]
async fn a_failing_task_returns_the_xenapi_error() {
    let sim = Sim::plain();
    let client = sim.client();
    let (_, vdi) = new_sr_with_vdi(&client, 8 << 20).await;
    let (target, _) = new_sr_with_vdi(&client, 2 << 20).await;
    sim.control(
        "simulator.inject_fault",
        &[
            string("VDI.copy"),
            Value::Int(1),
            string("SR_BACKEND_FAILURE_44"),
            Value::Array(vec![
                string(""),
                string("There is insufficient space"),
                string(""),
            ]),
        ],
    )
    .await;
    let task = client.vdi_copy_async(&vdi, &target).await.unwrap();
    let cancel = CancellationToken::new();
    let error = client
        .wait_task(
            &task,
            TaskWait {
                poll_interval: Duration::from_millis(50),
                timeout: Some(Duration::from_secs(30)),
                stall_timeout: None,
                cancel: &cancel,
                on_progress: &mut |_| {},
            },
        )
        .await
        .unwrap_err();
    assert!(error.is("SR_BACKEND_FAILURE_44"), "{error}");
}

mod tls {
    use super::*;

    fn tls_sim() -> Sim {
        Sim::start(SimOptions {
            tls: true,
            ..SimOptions::default()
        })
    }

    #[tokio::test]
    async fn pinned_fingerprint_passes() {
        let sim = tls_sim();
        let pin = Fingerprint::parse(sim.fingerprint.as_deref().unwrap()).unwrap();
        let client = sim.client_with(&sim.url, SIM_PASSWORD, TlsTrust::Pinned(pin));
        client.connect().await.unwrap();
    }

    #[tokio::test]
    async fn wrong_fingerprint_fails_and_says_so() {
        let sim = tls_sim();
        let client = sim.client_with(
            &sim.url,
            SIM_PASSWORD,
            TlsTrust::Pinned(Fingerprint([7; 32])),
        );
        let error = client.connect().await.unwrap_err();
        assert!(
            matches!(
                &error,
                XenApiError::Transport {
                    source: TransportError::Tls(_),
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("fingerprint"), "{error}");
    }

    #[tokio::test]
    async fn right_ca_passes_and_system_store_refuses_the_private_ca() {
        let sim = tls_sim();
        let client = sim.client_with(
            &sim.url,
            SIM_PASSWORD,
            TlsTrust::CaFile(sim.ca_file.clone()),
        );
        client.connect().await.unwrap();

        let client = sim.client_with(&sim.url, SIM_PASSWORD, TlsTrust::System);
        let error = client.connect().await.unwrap_err();
        assert!(
            matches!(
                &error,
                XenApiError::Transport {
                    source: TransportError::Tls(_),
                    ..
                }
            ),
            "{error}"
        );
    }

    #[tokio::test]
    async fn wrong_ca_fails() {
        let sim = tls_sim();
        let other = tls_sim();
        let client = sim.client_with(
            &sim.url,
            SIM_PASSWORD,
            TlsTrust::CaFile(other.ca_file.clone()),
        );
        let error = client.connect().await.unwrap_err();
        assert!(
            matches!(
                &error,
                XenApiError::Transport {
                    source: TransportError::Tls(_),
                    ..
                }
            ),
            "{error}"
        );
    }

    #[tokio::test]
    async fn insecure_accepts_anything() {
        let sim = tls_sim();
        let client = sim.client_with(&sim.url, SIM_PASSWORD, TlsTrust::Insecure);
        client.connect().await.unwrap();
    }
}

/// A one-trick HTTP server: answers every request with `status` and `body`.
fn canned_server(status: &'static str, body: String) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut reader = BufReader::new(stream);
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    let mut request = vec![0; length];
                    let _ = reader.read_exact(&mut request);
                    let answer = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: text/xml\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = reader.get_mut().write_all(answer.as_bytes());
                    length = 0;
                }
            }
        }
    });
    url
}

fn failure_body(code: &str, param: &str) -> String {
    format!(
        "<?xml version=\"1.0\"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data><value>{code}</value><value>{param}</value></data></array></value></member></struct></value></param></params></methodResponse>"
    )
}

#[tokio::test]
async fn a_non_xenapi_answer_is_a_protocol_error() {
    let sim = Sim::plain();
    let url = canned_server("200 OK", "<html>proxy login page</html>".into());
    let error = sim
        .client_with(&url, SIM_PASSWORD, TlsTrust::Insecure)
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(error, XenApiError::Protocol { .. }), "{error}");
}

#[tokio::test]
async fn an_http_error_status_is_a_transport_error_with_the_status() {
    let sim = Sim::plain();
    let url = canned_server("503 Service Unavailable", "xapi is starting".into());
    let error = sim
        .client_with(&url, SIM_PASSWORD, TlsTrust::Insecure)
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(
            &error,
            XenApiError::Transport {
                source: TransportError::Status { status: 503, .. },
                ..
            }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn endless_master_redirects_stop_with_a_clear_error() {
    let sim = Sim::plain();
    // A "slave" that names another "slave" as the master would redirect forever.
    let url = canned_server("200 OK", failure_body("HOST_IS_SLAVE", "127.0.0.1"));
    let error = sim
        .client_with(&url, SIM_PASSWORD, TlsTrust::Insecure)
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(error, XenApiError::TooManyRedirects { .. }),
        "{error}"
    );
}

#[tokio::test]
async fn a_task_that_outlives_its_timeout_is_cancelled_and_reported() {
    let sim = Sim::plain();
    let client = sim.client();
    let (_, vdi) = new_sr_with_vdi(&client, 64 << 20).await;
    let (target, _) = new_sr_with_vdi(&client, 2 << 20).await;
    sim.control(
        "simulator.set_delay",
        &[string("VDI.copy"), Value::Int(10_000)],
    )
    .await;
    let task = client.vdi_copy_async(&vdi, &target).await.unwrap();
    let cancel = CancellationToken::new();
    let error = client
        .wait_task(
            &task,
            TaskWait {
                poll_interval: Duration::from_millis(100),
                timeout: Some(Duration::from_millis(500)),
                stall_timeout: None,
                cancel: &cancel,
                on_progress: &mut |_| {},
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(error, XenApiError::TaskTimeout { .. }), "{error}");
    let record: SrRecord = client.get_record(&target).await.unwrap();
    assert_eq!(
        record.vdis.len(),
        1,
        "the timed-out copy must not leave a VDI"
    );
}
