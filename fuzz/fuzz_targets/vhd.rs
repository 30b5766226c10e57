//! `cargo fuzz run vhd`: see `harness::run_vhd` (shared with `tests/fuzz_regressions.rs`).

#![no_main]

#[path = "../../tests/fuzz_regressions/harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = harness::run_vhd(data);
});
