//! `cargo fuzz run vhd_tgz`: see `harness::run_tgz` (shared with `tests/fuzz_regressions.rs`).

#![no_main]

#[path = "../../tests/fuzz_regressions/harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = harness::run_tgz(data);
});
