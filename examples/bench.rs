//! The benchmarks of `scripts/bench`: builds its own images, runs xenapinfs (release) against
//! the simulator and the reference tools on the same data in the same run, and prints ratios.
//!
//! Run through `scripts/bench`, which builds everything in release mode first.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;
use xenapinfs::image::tgz::export_tgz;
use xenapinfs::vhd;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 2 << 30;
const BLOCK: u64 = 2 * MIB;

fn main() -> anyhow::Result<()> {
    let bin = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/release".into()),
    );
    let work = tempfile::Builder::new()
        .prefix("xenapinfs-bench")
        .tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))?;
    let dir = work.path();
    println!(
        "xenapinfs benchmarks in {} ({} cores)",
        dir.display(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    // Images: 600 MiB of data (half random, half compressible) in a 2 GiB disk; the same as a
    // 3-deep chain of 200 MiB layers.
    let images = dir.join("images");
    std::fs::create_dir(&images)?;
    let raw = images.join("disk.raw");
    let layers = write_layers(&raw)?;
    let single = images.join(format!("{}.vhd", Uuid::new_v4()));
    vhd::write_dynamic_from(
        &mut std::fs::File::open(&raw)?,
        SIZE,
        &single,
        Uuid::new_v4(),
        &mut |_, _| true,
    )?;
    let chain = build_chain(&images, &layers)?;
    let single_tgz = images.join("single.tgz");
    export_tgz(
        std::slice::from_ref(&single),
        &mut std::fs::File::create(&single_tgz)?,
        2,
        &mut |_| true,
    )?;
    let chain_tgz = images.join("chain.tgz");
    export_tgz(
        &chain,
        &mut std::fs::File::create(&chain_tgz)?,
        2,
        &mut |_| true,
    )?;
    println!(
        "images: {} MiB of data in a {} GiB disk; vhd {} MiB, vhd tgz {} MiB, chain tgz {} MiB\n",
        layers.iter().map(|l| l.len() as u64).sum::<u64>() * BLOCK / MIB,
        SIZE >> 30,
        size(&single) / MIB,
        size(&single_tgz) / MIB,
        size(&chain_tgz) / MIB
    );

    let world = World::start(&bin, dir)?;
    let scratch = world.export.join("scratch");
    std::fs::create_dir(&scratch)?;

    // 1. vhd tgz import vs tar -xzf and cat, into the same directory; every timing ends with
    // the data on disk (the import fsyncs what it writes).
    drop_caches();
    let (ours, stdout) = timed(|| {
        world.cli(&[
            "volume",
            "create",
            "--size",
            "2",
            "--image",
            text(&single_tgz),
            "--json",
        ])
    })?;
    let imported = json_id(&stdout)?;
    let rss = world.daemon_peak_rss_kib()?;
    drop_caches();
    let (tar, _) = timed(|| {
        run(Command::new("sh").arg("-c").arg(format!(
            "tar -xzf {} -C {} && sync",
            text(&single_tgz),
            text(&scratch)
        )))
    })?;
    drop_caches();
    let (cat, _) = timed(|| {
        run(Command::new("sh").arg("-c").arg(format!(
            "cat {} > {}/cat.vhd && sync",
            text(&single),
            text(&scratch)
        )))
    })?;
    let data = size(&single) as f64 / MIB as f64;
    println!("vhd tgz import ({data:.0} MiB of VHD):");
    println!("  xenapinfs {:>7.2} s  {:>7.0} MiB/s", ours, data / ours);
    println!(
        "  tar -xzf  {:>7.2} s  {:>7.0} MiB/s   ratio tar/xenapinfs = {:.2}x (goal >= 2x)",
        tar,
        data / tar,
        tar / ours
    );
    println!(
        "  cat       {:>7.2} s  {:>7.0} MiB/s   xenapinfs/cat = {:.2} (goal <= 1.25)",
        cat,
        data / cat,
        ours / cat
    );
    println!(
        "  xenapinfsd peak RSS after the import: {} MiB (goal <= 64 MiB)\n",
        rss / 1024
    );
    std::fs::remove_dir_all(&scratch)?;
    std::fs::create_dir(&scratch)?;

    // 2. Chain to raw with our reader vs qemu-img convert of one dynamic VHD with the same data.
    let flat = images.join(format!("{}.vhd", Uuid::new_v4()));
    vhd::copy_flattened(&chain[0], &flat, Uuid::new_v4(), None, &mut |_, _| true)?;
    drop_caches();
    let (ours, _) = timed(|| chain_to_raw(&chain[0], &scratch.join("ours.raw")))?;
    drop_caches();
    let (qemu, _) = timed(|| {
        run(Command::new("qemu-img")
            .args(["convert", "-f", "vpc", "-O", "raw"])
            .arg(&flat)
            .arg(scratch.join("qemu.raw")))
    })?;
    println!("chain to raw (3-deep chain vs one dynamic VHD, same content):");
    println!("  xenapinfs reader  {ours:>7.2} s");
    println!(
        "  qemu-img convert  {qemu:>7.2} s   ratio qemu/xenapinfs = {:.2}x (goal >= 1x)\n",
        qemu / ours
    );
    std::fs::remove_dir_all(&scratch)?;
    std::fs::create_dir(&scratch)?;

    // 3. vhd tgz export vs tar -czf, size within 5%.
    let ours_tgz = dir.join("ours.tgz");
    drop_caches();
    let (ours, _) = timed(|| {
        world.cli(&[
            "volume",
            "export",
            &imported,
            text(&ours_tgz),
            "--format",
            "vhd-tgz",
        ])
    })?;
    let named = scratch.join("0.vhd");
    std::fs::copy(&single, &named)?;
    let tar_tgz = dir.join("tar.tgz");
    drop_caches();
    let (tar, _) = timed(|| {
        run(Command::new("tar")
            .arg("-czf")
            .arg(&tar_tgz)
            .arg("-C")
            .arg(&scratch)
            .arg("0.vhd"))
    })?;
    println!("vhd tgz export:");
    println!(
        "  xenapinfs {ours:>7.2} s  {:>6} MiB",
        size(&ours_tgz) / MIB
    );
    println!(
        "  tar -czf  {tar:>7.2} s  {:>6} MiB   ratio tar/xenapinfs = {:.2}x (goal >= 1.5x), size ratio {:.3} (goal <= 1.05)\n",
        size(&tar_tgz) / MIB,
        tar / ours,
        size(&ours_tgz) as f64 / size(&tar_tgz) as f64
    );
    std::fs::remove_dir_all(&scratch)?;

    // 4. qcow2 through a local attach vs bare qemu-img convert onto the same kind of target (a
    // VHD exported through qemu-storage-daemon FUSE, as the simulator plugs disks).
    let qcow2 = images.join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2))?;
    drop_caches();
    let (ours, _) =
        timed(|| world.cli(&["volume", "create", "--size", "2", "--image", text(&qcow2)]))?;
    let unplug = last_call_seconds(&dir.join("calls.jsonl"), "VBD.unplug")?;
    let bare = bare_convert_onto_fuse(dir, &qcow2)?;
    println!(
        "qcow2 import in local mode (upload, attach, qemu-img convert onto the device, detach):"
    );
    println!("  xenapinfs         {ours:>7.2} s");
    println!(
        "  bare qemu-img     {bare:>7.2} s   overhead {:.0}% (goal <= 10%)",
        (ours / bare - 1.0) * 100.0
    );
    println!(
        "  of which the simulator's VBD.unplug {unplug:.2} s (it rewrites the VHD in XenServer's layout, as tapdisk does while writing); overhead without it {:.0}%",
        ((ours - unplug) / bare - 1.0) * 100.0
    );
    Ok(())
}

/// Duration of the last logged call of `method`, from the simulator's call log.
fn last_call_seconds(log: &Path, method: &str) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(log)?;
    let millis = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["method"] == method)
        .find_map(|e| e["ms"].as_f64())
        .ok_or_else(|| anyhow::anyhow!("no {method} in the call log"))?;
    Ok(millis / 1000.0)
}

/// Writes the raw disk: 300 blocks (600 MiB), alternately random and compressible text, spread
/// over the disk; returns the block numbers of each of three 100-block layers.
fn write_layers(raw: &Path) -> anyhow::Result<Vec<Vec<u64>>> {
    let mut file = std::fs::File::create(raw)?;
    file.set_len(SIZE)?;
    let mut random = std::fs::File::open("/dev/urandom")?;
    let line = b"xenapinfs benchmark, compressible line of text\n";
    let text: Vec<u8> = line.iter().copied().cycle().take(BLOCK as usize).collect();
    let mut layers = vec![Vec::new(), Vec::new(), Vec::new()];
    let mut buffer = vec![0u8; BLOCK as usize];
    for n in 0..300u64 {
        let block = n * (SIZE / BLOCK) / 300;
        if n % 2 == 0 {
            random.read_exact(&mut buffer)?;
        } else {
            buffer.copy_from_slice(&text);
            buffer[..8].copy_from_slice(&n.to_be_bytes());
        }
        file.seek(SeekFrom::Start(block * BLOCK))?;
        file.write_all(&buffer)?;
        layers[(n % 3) as usize].push(block);
    }
    file.sync_all()?;
    Ok(layers)
}

/// A 3-deep chain whose merged content is the raw disk: each layer holds a third of the blocks.
fn build_chain(dir: &Path, layers: &[Vec<u64>]) -> anyhow::Result<Vec<PathBuf>> {
    let raw = dir.join("disk.raw");
    let mut chain: Vec<PathBuf> = Vec::new();
    for layer in layers {
        let mut content = std::fs::File::open(&raw)?;
        let layer_raw = dir.join("layer.raw");
        let mut out = std::fs::File::create(&layer_raw)?;
        out.set_len(SIZE)?;
        let mut buffer = vec![0u8; BLOCK as usize];
        for block in layer {
            content.seek(SeekFrom::Start(block * BLOCK))?;
            content.read_exact(&mut buffer)?;
            out.seek(SeekFrom::Start(block * BLOCK))?;
            out.write_all(&buffer)?;
        }
        drop(out);
        let path = dir.join(format!("{}.vhd", Uuid::new_v4()));
        vhd::write_dynamic_from(
            &mut std::fs::File::open(&layer_raw)?,
            SIZE,
            &path,
            Uuid::new_v4(),
            &mut |_, _| true,
        )?;
        std::fs::remove_file(layer_raw)?;
        if let Some(parent) = chain.first() {
            vhd::make_child_of(&path, parent)?;
            vhd::set_hidden(parent, true)?;
        }
        chain.insert(0, path);
    }
    Ok(chain)
}

/// The merged chain into a sparse raw file, as the agent exports raw.
fn chain_to_raw(leaf: &Path, out: &Path) -> anyhow::Result<String> {
    let file = std::fs::File::create(out)?;
    vhd::write_raw(leaf, &file, out, &mut |_, _| true)?;
    Ok(String::new())
}

fn bare_convert_onto_fuse(dir: &Path, qcow2: &Path) -> anyhow::Result<f64> {
    // An empty VHD in qemu's own layout, as the simulator plugs empty VDIs.
    let target = dir.join("bare.vhd");
    run(Command::new("qemu-img")
        .args([
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
        ])
        .arg(&target)
        .arg(SIZE.to_string()))?;
    let device = dir.join("bare-device");
    std::fs::write(&device, b"")?;
    let mut daemon = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=f",
            target.display()
        ))
        .args(["--blockdev", "driver=vpc,file=f,node-name=d"])
        .arg("--export")
        .arg(format!(
            "type=fuse,id=e,node-name=d,mountpoint={},writable=on",
            device.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let started = Instant::now();
    while std::fs::metadata(&device)?.len() == 0 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop_caches();
    let (elapsed, _) = timed(|| {
        run(Command::new("qemu-img")
            .args([
                "convert",
                "-n",
                "--target-is-zero",
                "-f",
                "qcow2",
                "-O",
                "raw",
            ])
            .arg(qcow2)
            .arg(&device))
    })?;
    stop(&mut daemon);
    Ok(elapsed)
}

struct World {
    sim: Child,
    daemon: Child,
    bin: PathBuf,
    socket: PathBuf,
    export: PathBuf,
}

impl World {
    fn start(bin: &Path, dir: &Path) -> anyhow::Result<World> {
        let export = dir.join("export");
        let dev = dir.join("dev");
        std::fs::create_dir_all(&export)?;
        std::fs::create_dir_all(&dev)?;
        let vm = Uuid::new_v4().to_string();
        std::fs::write(dir.join("vm-uuid"), &vm)?;
        let mut sim = Command::new(bin.join("xenapinfs-sim"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--password",
                "bench",
                "--vm-uuid",
                &vm,
            ])
            .arg("--export")
            .arg(&export)
            .arg("--dev-dir")
            .arg(&dev)
            .arg("--call-log")
            .arg(dir.join("calls.jsonl"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(sim.stdout.take().expect("piped")),
            &mut line,
        )?;
        let socket = dir.join("xenapinfs.sock");
        let config = dir.join("xenapinfs.toml");
        std::fs::create_dir_all(dir.join("state"))?;
        std::fs::write(
            &config,
            format!(
                "xenapi_connection_url = \"{}\"\nxenapi_connection_password = \"bench\"\nxenapi_nfs_server = \"nfs.example\"\n\
                 xenapi_nfs_serverpath = \"/volumes\"\nxenapi_sr_base_path = \"{}\"\nshare_mount_check = false\nsocket = \"{}\"\nstate_dir = \"{}\"\n\
                 hypervisor_uuid_path = \"{}\"\ndevice_dir = \"{}\"\n",
                line.trim(),
                export.display(),
                socket.display(),
                dir.join("state").display(),
                dir.join("vm-uuid").display(),
                dev.display()
            ),
        )?;
        let daemon = Command::new(bin.join("xenapinfsd"))
            .arg("--config")
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()?;
        let world = World {
            sim,
            daemon,
            bin: bin.to_path_buf(),
            socket,
            export,
        };
        let started = Instant::now();
        loop {
            if let Ok(out) = world.cli(&["status", "--json"])
                && out.contains("\"mode\": \"local\"")
            {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(20),
                "xenapinfsd did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(world)
    }

    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new(self.bin.join("xenapinfs"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "xenapinfs {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?)
    }

    fn daemon_peak_rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.daemon.id()))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .ok_or_else(|| anyhow::anyhow!("no VmHWM"))?;
        Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        stop(&mut self.daemon);
        stop(&mut self.sim);
    }
}

fn stop(child: &mut Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
}

fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(f64, T)> {
    let started = Instant::now();
    let value = f()?;
    Ok((started.elapsed().as_secs_f64(), value))
}

fn run(command: &mut Command) -> anyhow::Result<String> {
    let output = command.output()?;
    anyhow::ensure!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn json_id(text: &str) -> anyhow::Result<String> {
    let value: serde_json::Value = serde_json::from_str(text)?;
    Ok(value["id"].as_str().unwrap_or_default().to_string())
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn text(path: &Path) -> &str {
    path.to_str().expect("utf-8 paths")
}

/// Writes dirty pages and drops the page cache (as root), so each tool starts cold alike.
fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}
