//! `cargo fuzz run api_request`: see `harness::run_api` (shared with `tests/fuzz_regressions.rs`).

#![no_main]

#[path = "../../tests/fuzz_regressions/harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = harness::run_api(data);
});
