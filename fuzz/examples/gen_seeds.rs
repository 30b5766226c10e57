//! Writes the seed corpora: `gen_seeds DIR` creates `DIR/<target>/<seed name>` for every fuzz
//! target (see `tests/fuzz_regressions/seeds.rs` for what they are and how they are made).

#[path = "../../tests/fuzz_regressions/harness.rs"]
mod harness;
#[path = "../../tests/fuzz_regressions/seeds.rs"]
mod seeds;

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "fuzz/corpus".into());
    for (target, seeds) in seeds::all() {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).expect("creating the corpus directory");
        for (name, data) in &seeds {
            std::fs::write(d.join(format!("seed-{name}")), data).expect("writing a seed");
        }
        println!("{target}: {} seeds in {}", seeds.len(), d.display());
    }
}
