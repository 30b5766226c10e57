//! Load: many clients issuing mixed operations at once over the socket. No operation may hang,
//! every one is accounted for (succeeded, or failed with a reason a caller can act on), the
//! agent's memory stays bounded and nothing is left behind.
//!
//! CI runs it small; `scripts/load` runs it long in release mode (`LOAD_CLIENTS`,
//! `LOAD_SECONDS`) and prints the table.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};
use support::{World, s};
use xenapinfs::api::client::{ApiClient, ClientError};
use xenapinfs::xenapi::codec::Value as Xml;

/// No single operation may take longer than this under load (a deadlock would).
const OPERATION_LIMIT: Duration = Duration::from_secs(120);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One finished operation.
struct Sample {
    kind: &'static str,
    /// `None` on success, else the error's kind.
    failure: Option<String>,
    latency: Duration,
}

/// Errors a caller gets for racing other callers; anything else under load is a bug.
const EXPECTED_FAILURES: [&str; 2] = ["conflict", "not_found"];

struct Client {
    api: ApiClient,
    hot: Arc<Vec<String>>,
    own: Vec<String>,
    seed: u64,
}

impl Client {
    fn next(&mut self, n: u64) -> u64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed % n
    }

    /// A volume to work on: mostly its own, sometimes one every client shares.
    fn target(&mut self) -> Option<String> {
        if self.own.is_empty() || self.next(3) == 0 {
            let i = self.next(self.hot.len() as u64) as usize;
            return Some(self.hot[i].clone());
        }
        let i = self.next(self.own.len() as u64) as usize;
        Some(self.own[i].clone())
    }

    async fn job(&self, path: &str, body: Json) -> Result<Json, ClientError> {
        let job: xenapinfs::jobs::Job = self.api.request("POST", path, Some(body)).await?;
        let done = self.api.follow_job(&job.id, &mut |_| {}).await?;
        match done.error {
            Some(error) => Err(ClientError::Api {
                status: 500,
                kind: error.kind,
                message: error.message,
            }),
            None => Ok(done.result.unwrap_or_default()),
        }
    }

    async fn one(&mut self) -> (&'static str, Result<(), ClientError>) {
        let roll = self.next(100);
        let target = self.target().unwrap();
        let path = format!("/v1/volumes/{target}");
        match roll {
            0..=14 if self.own.len() < 4 => {
                let created: Result<Json, _> = self
                    .api
                    .request("POST", "/v1/volumes", Some(json!({"size_gb": 1})))
                    .await;
                let result = created.map(|v| self.own.push(v["id"].as_str().unwrap().into()));
                ("create", result)
            }
            0..=19 => {
                let result: Result<Json, _> = self.api.get("/v1/volumes").await;
                ("list", result.map(drop))
            }
            20..=39 => {
                let result: Result<Json, _> = self.api.get(&path).await;
                ("show", result.map(drop))
            }
            40..=49 => {
                let size = 1 + self.next(3);
                let result: Result<Json, _> = self
                    .api
                    .request(
                        "POST",
                        &format!("{path}/extend"),
                        Some(json!({"size_gb": size})),
                    )
                    .await;
                // Shrinking is refused by design; racing growth makes that likely.
                let result = match result {
                    Err(ClientError::Api { kind, .. }) if kind == "invalid_request" => {
                        Ok(Json::Null)
                    }
                    other => other,
                };
                ("extend", result.map(drop))
            }
            50..=59 => {
                let result = self.job(&format!("{path}/snapshot"), json!({})).await;
                let result = match result {
                    Ok(copy) => {
                        let id = copy["id"].as_str().unwrap_or_default().to_string();
                        self.own.push(id);
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                ("snapshot", result)
            }
            60..=69 => {
                let attached: Result<Json, _> = self
                    .api
                    .request("POST", &format!("{path}/attach"), None)
                    .await;
                let result = match attached {
                    Ok(_) => self
                        .api
                        .request::<Json>("POST", &format!("{path}/detach"), None)
                        .await
                        .map(drop),
                    Err(e) => Err(e),
                };
                ("attach+detach", result)
            }
            70..=79 => {
                let result: Result<Json, _> = self.api.get(&format!("{path}/connection")).await;
                ("connection", result.map(drop))
            }
            80..=89 => {
                let result: Result<Json, _> = self.api.get("/v1/stats").await;
                ("stats", result.map(drop))
            }
            _ if !self.own.is_empty() => {
                let i = self.next(self.own.len() as u64) as usize;
                let victim = self.own.swap_remove(i);
                let result: Result<Json, _> = self
                    .api
                    .request("DELETE", &format!("/v1/volumes/{victim}"), None)
                    .await;
                if result.is_err() {
                    self.own.push(victim);
                }
                ("delete", result.map(drop))
            }
            _ => {
                let result: Result<Json, _> = self.api.get("/v1/status").await;
                ("status", result.map(drop))
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_clients_at_once_are_all_served_and_leave_nothing_behind() {
    let clients = env_or("LOAD_CLIENTS", 32);
    let seconds = env_or("LOAD_SECONDS", 8);
    let world = World::start().await;
    let api = ApiClient::new(&world.daemon.socket);
    let daemon_pid = world.daemon.child.as_ref().unwrap().id();
    let hot: Vec<String> = (0..2)
        .map(|i| world.create(1, &format!("hot-{i}")))
        .collect();

    // A long copy of one volume does not hold up work on another.
    let long = world.slow_snapshot(&hot[0], 3_000).await;
    let started = Instant::now();
    world.ok(&["volume", "extend", &hot[1], "--size", "2"]);
    let other = started.elapsed();
    assert!(
        other < Duration::from_secs(2),
        "extending another volume waited {other:?} for a copy"
    );
    let copy = api.follow_job(&long, &mut |_| {}).await.unwrap();
    let copy_id = copy.result.unwrap()["id"].as_str().unwrap().to_string();
    world.ok(&["volume", "delete", &copy_id]);
    world
        .control("simulator.set_delay", &[s("VDI.copy"), Xml::Int(0)])
        .await;

    let rss_before = peak_rss_kib(daemon_pid);
    let hot = Arc::new(hot);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for n in 0..clients {
        let mut client = Client {
            api: api.clone(),
            hot: hot.clone(),
            own: Vec::new(),
            seed: 0x2545_f491_4f6c_dd1d ^ (n + 1).wrapping_mul(0x9e37_79b9),
        };
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < deadline {
                let started = Instant::now();
                let (kind, result) = tokio::time::timeout(OPERATION_LIMIT, client.one())
                    .await
                    .unwrap_or_else(|_| panic!("an operation hung for {OPERATION_LIMIT:?}"));
                let failure = result.err().map(|e| match e {
                    ClientError::Api { kind, message, .. } => {
                        assert!(!message.is_empty(), "{kind} without a message");
                        if !EXPECTED_FAILURES.contains(&kind.as_str()) {
                            eprintln!("{kind}: {message}");
                        }
                        kind
                    }
                    other => format!("client: {other}"),
                });
                samples.push(Sample {
                    kind,
                    failure,
                    latency: started.elapsed(),
                });
            }
            (samples, client.own)
        }));
    }
    let mut samples = Vec::new();
    let mut leftovers = Vec::new();
    for task in tasks {
        let (s, own) = task.await.unwrap();
        samples.extend(s);
        leftovers.extend(own);
    }
    let elapsed = Duration::from_secs(seconds);

    // The table: throughput and latency per operation kind.
    let mut by_kind: BTreeMap<&str, Vec<&Sample>> = BTreeMap::new();
    for sample in &samples {
        by_kind.entry(sample.kind).or_default().push(sample);
    }
    println!(
        "{clients} clients for {seconds} s: {} operations, {:.1}/s",
        samples.len(),
        samples.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "{:<14} {:>6} {:>6} {:>8} {:>9} {:>9}  failures",
        "operation", "count", "ok", "per s", "p50 ms", "p99 ms"
    );
    for (kind, list) in &by_kind {
        let mut latencies: Vec<Duration> = list.iter().map(|s| s.latency).collect();
        latencies.sort();
        let mut failures: BTreeMap<&str, usize> = BTreeMap::new();
        for sample in list {
            if let Some(f) = &sample.failure {
                *failures.entry(f.as_str()).or_default() += 1;
            }
        }
        println!(
            "{kind:<14} {:>6} {:>6} {:>8.1} {:>9.1} {:>9.1}  {failures:?}",
            list.len(),
            list.iter().filter(|s| s.failure.is_none()).count(),
            list.len() as f64 / elapsed.as_secs_f64(),
            percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
            percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        );
    }
    let rss_after = peak_rss_kib(daemon_pid);
    println!(
        "xenapinfsd peak RSS: {} MiB before, {} MiB after",
        rss_before / 1024,
        rss_after / 1024
    );

    let unexpected: Vec<(&str, &String)> = samples
        .iter()
        .filter_map(|s| s.failure.as_ref().map(|f| (s.kind, f)))
        .filter(|(_, f)| !EXPECTED_FAILURES.contains(&f.as_str()))
        .collect();
    assert!(unexpected.is_empty(), "unexpected failures: {unexpected:?}");
    assert!(
        by_kind.len() >= 8,
        "the mix covers the operations: {:?}",
        by_kind.keys()
    );
    assert!(rss_after < 256 * 1024, "memory bounded: {rss_after} KiB");

    // Everything made is deleted; then the share holds the shared volumes and xapi is clean.
    for id in leftovers {
        world.ok(&["volume", "delete", &id]);
    }
    let jobs = world.ok(&["job", "list"]);
    assert!(
        jobs.as_array()
            .unwrap()
            .iter()
            .all(|j| j["state"] != "running"),
        "no job still running"
    );
    let volumes = world.ok(&["volume", "list"]);
    let mut ids: Vec<&str> = volumes
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut expected: Vec<&str> = hot.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(ids, expected, "only the shared volumes remain");
    for volume in volumes.as_array().unwrap() {
        assert!(volume.get("problem").is_none(), "{volume}");
    }
    world.assert_xapi_clean().await;
    assert!(support::staging_leftovers(&world.sim.export).is_empty());
}
