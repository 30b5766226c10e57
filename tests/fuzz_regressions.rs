//! Replays, through the same functions as the fuzz targets (`fuzz/`), every seed the seed
//! generator makes (valid inputs and hand-made nasty ones: truncated footers, overflowing BAT
//! sizes and offsets, chain loops, path traversal in tar members, deeply nested XML and JSON)
//! and every input kept under `tests/fuzz_regressions/<target>/*.hex` (crashes the fuzzer
//! found, hex-encoded). Each must end in `Ok` or a clean error; a panic fails the test, naming
//! the input.
//!
//! `FUZZ_REGRESSIONS_VERBOSE=1 cargo test --test fuzz_regressions -- --nocapture` prints the
//! outcome of every input. The fuzz targets themselves run with `scripts/fuzz` (not in CI: too
//! long).

#[path = "fuzz_regressions/harness.rs"]
mod harness;
#[path = "fuzz_regressions/seeds.rs"]
mod seeds;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

type Run = fn(&[u8]) -> Result<(), String>;

fn target(name: &str) -> Run {
    match name {
        "vhd" => harness::run_vhd,
        "vhd_tgz" => harness::run_tgz,
        "xenapi_response" => harness::run_xenapi,
        "api_request" => harness::run_api,
        other => panic!("unknown fuzz target {other}"),
    }
}

/// Runs every input, collecting the ones that panicked; returns (ok, refused) counts.
fn replay(name: &str, inputs: &[(String, Vec<u8>)]) -> (usize, usize) {
    let run = target(name);
    let mut failed = Vec::new();
    let (mut ok, mut refused) = (0, 0);
    let verbose = std::env::var_os("FUZZ_REGRESSIONS_VERBOSE").is_some();
    for (input, data) in inputs {
        let outcome = catch_unwind(AssertUnwindSafe(|| run(data)));
        if verbose {
            match &outcome {
                Ok(Ok(())) => eprintln!("{name}/{input}: ok"),
                Ok(Err(e)) => eprintln!("{name}/{input}: {e}"),
                Err(_) => eprintln!("{name}/{input}: PANIC"),
            }
        }
        match outcome {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                assert!(!e.is_empty(), "{name}/{input}: empty error message");
                refused += 1;
            }
            Err(_) => failed.push(input.clone()),
        }
    }
    assert!(
        failed.is_empty(),
        "{name}: these inputs panicked: {failed:?}"
    );
    (ok, refused)
}

/// The kept inputs of one target: `tests/fuzz_regressions/<target>/*.hex`.
fn kept(name: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_regressions")
        .join(name);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "hex"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let clean: String = text.split_whitespace().collect();
            let bytes =
                hex::decode(&clean).unwrap_or_else(|e| panic!("{}: not hex: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    out.sort();
    out
}

fn seeds_of(name: &str) -> Vec<(String, Vec<u8>)> {
    match name {
        "vhd" => seeds::vhd_seeds(),
        "vhd_tgz" => seeds::tgz_seeds(),
        "xenapi_response" => seeds::xenapi_seeds(),
        "api_request" => seeds::api_seeds(),
        _ => unreachable!(),
    }
}

fn check_target(name: &str) {
    let seeds = seeds_of(name);
    assert!(seeds.len() >= 10, "{name}: too few seeds");
    let (ok, refused) = replay(name, &seeds);
    // The valid seeds must stay valid, or the fuzzer starts from nothing.
    assert!(ok > 0, "{name}: no seed was accepted");
    assert!(refused > 0, "{name}: no seed was refused");
    let kept = kept(name);
    replay(name, &kept);
    eprintln!(
        "{name}: {} seeds ({ok} accepted, {refused} refused), {} kept inputs",
        seeds.len(),
        kept.len()
    );
}

#[test]
fn vhd_inputs() {
    check_target("vhd");
}

#[test]
fn vhd_tgz_inputs() {
    check_target("vhd_tgz");
}

#[test]
fn xenapi_response_inputs() {
    check_target("xenapi_response");
}

#[test]
fn api_request_inputs() {
    check_target("api_request");
}

/// Valid seeds that must be accepted, by name: a broken seed generator would otherwise only
/// show as a weaker fuzz run.
#[test]
fn valid_seeds_are_accepted() {
    for (name, must) in [
        (
            "vhd",
            &[
                "tap-dynamic",
                "tap-chain-3",
                "small-chain-3",
                "small-fixed",
                "small-512-blocks",
            ][..],
        ),
        (
            "vhd_tgz",
            &[
                "single",
                "chain-3",
                "chain-3-reversed",
                "legacy-names",
                "data-gz",
                "gnu-tar",
            ][..],
        ),
        (
            "xenapi_response",
            &["login", "failure", "vdi-record", "vdi-all-records"][..],
        ),
        (
            "api_request",
            &[
                "create",
                "copy-empty",
                "import-url",
                "export-url",
                "volume-id",
                "volume-id-json",
            ][..],
        ),
    ] {
        let run = target(name);
        let seeds = seeds_of(name);
        for want in must {
            let Some((_, data)) = seeds.iter().find(|(n, _)| n == want) else {
                continue; // e.g. gnu-tar without tar on the machine
            };
            if let Err(e) = run(data) {
                panic!("{name}/{want} is refused: {e}");
            }
        }
    }
}
