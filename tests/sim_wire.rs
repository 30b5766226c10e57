//! The simulator binary on the wire: raw HTTP and XML over a plain TCP stream, compared with the
//! bytes xapi sends.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VM_UUID: &str = "0b8f8d3e-7a0c-4c39-9a64-6f1d2f3b4c5d";
const PASSWORD: &str = "wire-secret";

struct Sim {
    child: Option<Child>,
    addr: String,
    export: PathBuf,
    dev_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sim {
    fn start(extra: &[&str]) -> Sim {
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("export");
        let dev_dir = dir.path().join("dev");
        std::fs::create_dir_all(&export).unwrap();
        std::fs::create_dir_all(&dev_dir).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_xenapinfs-sim"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--password",
                PASSWORD,
                "--vm-uuid",
                VM_UUID,
            ])
            .args(["--auth-failure-delay-ms", "0"])
            .arg("--export")
            .arg(&export)
            .arg("--dev-dir")
            .arg(&dev_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start xenapinfs-sim");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("http://")
            .and_then(|rest| rest.strip_suffix('/'))
            .unwrap_or_else(|| panic!("first line should be the URL, got {line:?}"))
            .to_string();
        Sim {
            child: Some(child),
            addr,
            export,
            dev_dir,
            _dir: dir,
        }
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(&self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
    }

    /// SIGTERM and the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "simulator did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// One HTTP response as bytes: status line, headers (lower-cased names), body.
struct Response {
    status_line: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn send(stream: &mut TcpStream, path: &str, body: &str, extra_headers: &str) -> Response {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    read_response(stream)
}

fn read_response(stream: &mut TcpStream) -> Response {
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .expect("responses carry content-length");
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    Response {
        status_line: status_line.trim_end().to_string(),
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

fn method_call(method: &str, params: &[&str]) -> String {
    let params: String = params
        .iter()
        .map(|p| format!("<param>{p}</param>"))
        .collect();
    format!(
        "<?xml version=\"1.0\"?><methodCall><methodName>{method}</methodName><params>{params}</params></methodCall>"
    )
}

fn string(text: &str) -> String {
    format!("<value><string>{text}</string></value>")
}

const SUCCESS_HEAD: &str = "<?xml version=\"1.0\"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name>";
const SUCCESS_TAIL: &str = "</member></struct></value></param></params></methodResponse>";

/// The value of a successful call whose result is a string (a reference, a uuid...).
fn success_string(response: &Response) -> String {
    let inner = response
        .body
        .strip_prefix(SUCCESS_HEAD)
        .and_then(|rest| rest.strip_suffix(SUCCESS_TAIL))
        .unwrap_or_else(|| panic!("not a Success envelope: {}", response.body));
    inner
        .strip_prefix("<value>")
        .and_then(|v| v.strip_suffix("</value>"))
        .unwrap_or_else(|| panic!("not a string value: {inner}"))
        .to_string()
}

fn login(stream: &mut TcpStream) -> String {
    let response = send(
        stream,
        "/",
        &method_call(
            "session.login_with_password",
            &[&string("root"), &string(PASSWORD)],
        ),
        "",
    );
    success_string(&response)
}

fn call(stream: &mut TcpStream, session: &str, method: &str, params: &[&str]) -> String {
    let session = string(session);
    let mut all = vec![session.as_str()];
    all.extend_from_slice(params);
    success_string(&send(stream, "/", &method_call(method, &all), ""))
}

#[test]
fn login_response_is_byte_exact_with_xapi_headers_and_keep_alive() {
    let sim = Sim::start(&[]);
    let mut stream = sim.connect();
    let response = send(
        &mut stream,
        "/",
        &method_call(
            "session.login_with_password",
            &[
                "<value>root</value>",
                &string(PASSWORD),
                &string("2.21"),
                &string("wire-test"),
            ],
        ),
        "",
    );
    assert_eq!(response.status_line, "HTTP/1.1 200 OK");
    let session = success_string(&response);
    assert!(
        session.starts_with("OpaqueRef:") && session.len() == "OpaqueRef:".len() + 36,
        "{session}"
    );
    assert_eq!(
        response.body,
        format!("{SUCCESS_HEAD}<value>{session}</value>{SUCCESS_TAIL}")
    );
    assert_eq!(response.header("content-type"), Some("text/xml"));
    assert_eq!(response.header("connection"), Some("keep-alive"));
    assert_eq!(response.header("cache-control"), Some("no-cache, no-store"));
    assert_eq!(response.header("access-control-allow-origin"), Some("*"));
    assert_eq!(
        response.header("access-control-allow-headers"),
        Some("X-Requested-With")
    );
    assert_eq!(response.header("date"), None, "xapi sends no Date header");

    // Same connection, /RPC2, typed int64 as a string and a void result.
    let pool = call(&mut stream, &session, "pool.get_all", &[]);
    assert!(pool.starts_with("<array><data><value>OpaqueRef:"), "{pool}");
    let master = call(
        &mut stream,
        &session,
        "session.get_this_host",
        &[&string(&session)],
    );
    let response = send(
        &mut stream,
        "/RPC2",
        &method_call(
            "host.get_API_version_major",
            &[&string(&session), &string(&master)],
        ),
        "",
    );
    assert_eq!(success_string(&response), "2", "int64 is bare digits");
    let response = send(
        &mut stream,
        "/",
        &method_call("system.listMethods", &[]),
        "",
    );
    assert!(
        response.body.starts_with(
            "<?xml version=\"1.0\"?><methodResponse><params><param><value><array><data><value>"
        ),
        "system.listMethods has no Status envelope: {}",
        &response.body[..200]
    );
    assert!(response.body.contains("<value>VDI.copy</value>"));
    let response = send(
        &mut stream,
        "/",
        &method_call("session.logout", &[&string(&session)]),
        "Connection: close\r\n",
    );
    assert_eq!(
        response.body,
        format!("{SUCCESS_HEAD}<value></value>{SUCCESS_TAIL}")
    );
    assert_eq!(response.header("connection"), Some("close"));
}

#[test]
fn failures_use_the_error_description_envelope() {
    let sim = Sim::start(&[]);
    let mut stream = sim.connect();
    let response = send(
        &mut stream,
        "/",
        &method_call(
            "VDI.get_record",
            &[&string("OpaqueRef:bogus"), &string("OpaqueRef:NULL")],
        ),
        "",
    );
    assert_eq!(response.status_line, "HTTP/1.1 200 OK");
    assert_eq!(
        response.body,
        "<?xml version=\"1.0\"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data><value>SESSION_INVALID</value><value>OpaqueRef:bogus</value></data></array></value></member></struct></value></param></params></methodResponse>"
    );

    let session = login(&mut stream);
    let expect_failure = |stream: &mut TcpStream,
                          method: &str,
                          params: &[&str],
                          description: &[&str]| {
        let response = send(stream, "/", &method_call(method, params), "");
        let values: String = description
            .iter()
            .map(|d| format!("<value>{d}</value>"))
            .collect();
        assert_eq!(
            response.body,
            format!(
                "<?xml version=\"1.0\"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data>{values}</data></array></value></member></struct></value></param></params></methodResponse>"
            ),
            "{method}"
        );
    };
    let s = string(&session);
    expect_failure(
        &mut stream,
        "VDI.get_record",
        &[&s, &string("OpaqueRef:nope")],
        &["HANDLE_INVALID", "VDI", "OpaqueRef:nope"],
    );
    expect_failure(
        &mut stream,
        "SR.get_by_uuid",
        &[&s, &string("x")],
        &["UUID_INVALID", "SR", "x"],
    );
    expect_failure(
        &mut stream,
        "VDI.frobnicate",
        &[&s],
        &["MESSAGE_METHOD_UNKNOWN", "VDI.frobnicate"],
    );
    expect_failure(
        &mut stream,
        "VDI.get_record",
        &[&s],
        &[
            "MESSAGE_PARAMETER_COUNT_MISMATCH",
            "VDI.get_record",
            "1",
            "0",
        ],
    );
    expect_failure(
        &mut stream,
        "VBD.create",
        &[
            &s,
            "<value><struct><member><name>VM</name><value>OpaqueRef:NULL</value></member></struct></value>",
        ],
        &[
            "INTERNAL_ERROR",
            "Server_helpers.Dispatcher_FieldNotFound(&quot;VDI&quot;)",
        ],
    );
    expect_failure(
        &mut stream,
        "session.login_with_password",
        &[&string("root"), &string("wrong")],
        &[
            "SESSION_AUTHENTICATION_FAILED",
            "root",
            "Authentication failure",
        ],
    );
}

#[test]
fn malformed_xml_is_http_500_with_the_parse_error() {
    let sim = Sim::start(&[]);
    let mut stream = sim.connect();
    let response = send(
        &mut stream,
        "/",
        "<methodCall><methodName>x</methodName><params><param>",
        "",
    );
    assert_eq!(response.status_line, "HTTP/1.1 500 Internal Error");
    assert_eq!(response.header("content-type"), Some("text/html"));
    assert_eq!(response.header("connection"), Some("close"));
    assert!(response.body.contains("Parse_error"), "{}", response.body);

    let mut stream = sim.connect();
    let unknown_tag = method_call("pool.get_all", &["<value><bogus>1</bogus></value>"]);
    let response = send(&mut stream, "/", &unknown_tag, "");
    assert_eq!(response.status_line, "HTTP/1.1 500 Internal Error");
    assert!(response.body.contains("bogus"), "{}", response.body);

    let mut stream = sim.connect();
    let huge = method_call("pool.get_all", &[&string(&"x".repeat(301 * 1024))]);
    let response = send(&mut stream, "/", &huge, "");
    assert_eq!(response.status_line, "HTTP/1.1 413 Payload Too Large");
}

fn plug_a_new_disk(sim: &Sim, stream: &mut TcpStream, session: &str) -> (String, PathBuf) {
    let s = session;
    let pool = call(stream, s, "pool.get_all", &[]);
    let pool = pool
        .trim_start_matches("<array><data><value>")
        .trim_end_matches("</value></data></array>");
    let host = call(stream, s, "pool.get_master", &[&string(pool)]);
    let config = "<value><struct><member><name>server</name><value>nfs.example</value></member><member><name>serverpath</name><value>/volumes</value></member></struct></value>";
    let sr = call(
        stream,
        s,
        "SR.create",
        &[
            &string(&host),
            config,
            &string("0"),
            &string("wire"),
            &string(""),
            &string("nfs"),
            &string("user"),
            "<value><boolean>1</boolean></value>",
        ],
    );
    let vdi = call(
        stream,
        s,
        "VDI.create",
        &[&format!(
            "<value><struct><member><name>SR</name><value>{sr}</value></member><member><name>virtual_size</name><value><string>4194304</string></value></member><member><name>type</name><value>User</value></member><member><name>sharable</name><value><boolean>0</boolean></value></member><member><name>read_only</name><value><boolean>0</boolean></value></member><member><name>other_config</name><value><struct/></value></member></struct></value>"
        )],
    );
    let vm = call(stream, s, "VM.get_by_uuid", &[&string(VM_UUID)]);
    let vbd = call(
        stream,
        s,
        "VBD.create",
        &[&format!(
            "<value><struct><member><name>VM</name><value>{vm}</value></member><member><name>VDI</name><value>{vdi}</value></member><member><name>userdevice</name><value>autodetect</value></member><member><name>bootable</name><value><boolean>0</boolean></value></member><member><name>mode</name><value>rw</value></member><member><name>type</name><value>disk</value></member><member><name>unpluggable</name><value><boolean>1</boolean></value></member><member><name>empty</name><value><boolean>0</boolean></value></member><member><name>other_config</name><value><struct></struct></value></member><member><name>qos_algorithm_type</name><value></value></member><member><name>qos_algorithm_params</name><value><struct></struct></value></member></struct></value>"
        )],
    );
    assert_eq!(call(stream, s, "VBD.get_userdevice", &[&string(&vbd)]), "1");
    assert_eq!(call(stream, s, "VBD.get_device", &[&string(&vbd)]), "");
    call(stream, s, "VBD.plug", &[&string(&vbd)]);
    assert_eq!(call(stream, s, "VBD.get_device", &[&string(&vbd)]), "xvdb");
    let sr_uuid = call(stream, s, "SR.get_uuid", &[&string(&sr)]);
    let vdi_uuid = call(stream, s, "VDI.get_uuid", &[&string(&vdi)]);
    (
        vbd,
        sim.export.join(sr_uuid).join(format!("{vdi_uuid}.vhd")),
    )
}

#[test]
fn sigterm_unplugs_everything_and_exits_zero() {
    let mut sim = Sim::start(&[]);
    let mut stream = sim.connect();
    let session = login(&mut stream);
    let (_, vhd) = plug_a_new_disk(&sim, &mut stream, &session);
    let device = sim.dev_dir.join("xvdb");
    assert_eq!(std::fs::metadata(&device).unwrap().len(), 4 << 20);
    write_at(&device, 1 << 20, b"written before SIGTERM");
    drop(stream);

    let status = sim.stop();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(
        entries(&sim.dev_dir),
        Vec::<String>::new(),
        "no device may be left behind"
    );
    let info = xenapinfs::vhd::check(&vhd).expect("the VHD is valid after shutdown");
    assert_eq!(info.virtual_size, 4 << 20);
    let mut expected = vec![0u8; 4 << 20];
    expected[1 << 20..(1 << 20) + 22].copy_from_slice(b"written before SIGTERM");
    assert_eq!(
        read_disk(&vhd),
        expected,
        "the data, and zeros everywhere else"
    );
}

#[test]
fn repeated_plugs_keep_earlier_data_and_read_zeros_elsewhere() {
    let sim = Sim::start(&[]);
    let mut stream = sim.connect();
    let session = login(&mut stream);
    let (vbd, vhd) = plug_a_new_disk(&sim, &mut stream, &session);
    let device = sim.dev_dir.join("xvdb");
    let mut expected = vec![0u8; 4 << 20];
    for (round, offset) in [(0u8, 4096usize), (1, (3 << 20) - 7), (2, 17)] {
        let data: Vec<u8> = (0..100_000).map(|i| (i % 251) as u8 ^ round).collect();
        let end = (offset + data.len()).min(4 << 20);
        write_at(&device, offset as u64, &data[..end - offset]);
        expected[offset..end].copy_from_slice(&data[..end - offset]);
        call(&mut stream, &session, "VBD.unplug", &[&string(&vbd)]);
        xenapinfs::vhd::check(&vhd).expect("valid VHD after unplug");
        assert_eq!(read_disk(&vhd), expected, "round {round}");
        call(&mut stream, &session, "VBD.plug", &[&string(&vbd)]);
    }
    let mut seen = vec![0u8; 4 << 20];
    std::fs::File::open(&device)
        .unwrap()
        .read_exact(&mut seen)
        .unwrap();
    assert_eq!(seen, expected, "the device shows what was written");
}

fn read_disk(vhd: &Path) -> Vec<u8> {
    let mut reader = xenapinfs::vhd::ChainReader::open(vhd).unwrap();
    let mut buf = vec![0; reader.virtual_size() as usize];
    reader.read_at(0, &mut buf).unwrap();
    buf
}

#[test]
fn without_fuse_the_device_is_a_raw_copy_written_back_on_unplug() {
    let sim = Sim::start(&["--no-fuse"]);
    let mut stream = sim.connect();
    let session = login(&mut stream);
    let (vbd, vhd) = plug_a_new_disk(&sim, &mut stream, &session);
    let device = sim.dev_dir.join("xvdb");
    write_at(&device, 3 << 20, b"raw fallback");
    call(&mut stream, &session, "VBD.unplug", &[&string(&vbd)]);
    assert!(!device.exists());
    xenapinfs::vhd::check(&vhd).expect("valid VHD after write-back");
    let mut reader = xenapinfs::vhd::ChainReader::open(&vhd).unwrap();
    let mut buf = vec![0; 12];
    reader.read_at(3 << 20, &mut buf).unwrap();
    assert_eq!(buf, b"raw fallback");
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(data, offset).unwrap();
    file.sync_all().unwrap();
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
