//! What VBD.plug makes appear in the appliance: `DEV_DIR/xvdX`, a file standing in for the
//! block device.
//!
//! Normally the file is a `qemu-storage-daemon` FUSE export of the VHD itself, so writes land in
//! the VHD as they would through tapdisk. qemu's `vpc` driver ignores blktap's batmap and may
//! place new blocks over it, so after unplug the VHD is rewritten in XenServer's layout
//! (flattened copy + rename). Where FUSE or the daemon is missing, or the VHD has a parent (qemu
//! would read the chain wrongly), the file is a plain raw copy of the merged chain instead,
//! written back as a new flat VHD on unplug.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::vhd::{self, ChainReader};

use super::SimConfig;

/// How long the FUSE export may take to come up or go away.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(15);

enum Backing {
    Fuse(Child),
    Raw,
}

struct Export {
    dev: PathBuf,
    vhd: PathBuf,
    read_only: bool,
    size: u64,
    uuid: uuid::Uuid,
    backing: Backing,
}

/// The exports of every plugged VBD of the appliance, by VBD reference.
pub struct Devices {
    dev_dir: PathBuf,
    /// `qemu-storage-daemon` and `qemu-img`, when FUSE exports can be used.
    qemu: Option<Qemu>,
    /// Why FUSE exports are not used, when they are not.
    fallback_reason: &'static str,
    exports: Mutex<HashMap<String, Export>>,
    warned: AtomicBool,
}

impl Devices {
    pub fn new(config: &SimConfig) -> Devices {
        let (qemu, fallback_reason) = if config.no_fuse {
            (None, "FUSE exports are disabled (--no-fuse)")
        } else {
            match find_qemu(config.qemu_storage_daemon.as_deref()) {
                Some(qemu) => (Some(qemu), ""),
                None => (
                    None,
                    "FUSE, qemu-storage-daemon or qemu-img is not available",
                ),
            }
        };
        Devices {
            dev_dir: config.dev_dir.clone(),
            qemu,
            fallback_reason,
            exports: Mutex::new(HashMap::new()),
            warned: AtomicBool::new(false),
        }
    }

    /// Exposes `vhd` as `DEV_DIR/<device>` for the VBD `vbd`; returns once the file is usable.
    pub fn expose(
        &self,
        vbd: &str,
        vhd_path: &Path,
        device: &str,
        read_only: bool,
    ) -> Result<(), String> {
        let info = vhd::inspect(vhd_path).map_err(|e| e.to_string())?;
        let dev = self.dev_dir.join(device);
        match std::fs::remove_file(&dev) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(format!(
                    "{}: cannot remove a stale device file: {e}",
                    dev.display()
                ));
            }
        }
        let backing = match (&self.qemu, &info.parent) {
            (Some(qemu), None) => {
                if !read_only && info.allocated_blocks == 0 {
                    // qemu puts its first block right after the BAT, over blktap's batmap and
                    // footer, and would show those bytes as disk data: start from qemu's layout.
                    qemu.recreate_empty(vhd_path, info.virtual_size)?;
                }
                Backing::Fuse(start_fuse_export(&qemu.daemon, vhd_path, &dev, read_only)?)
            }
            (qemu, _) => {
                if !self.warned.swap(true, Ordering::SeqCst) {
                    let why = if qemu.is_none() {
                        self.fallback_reason
                    } else {
                        "a VHD with a parent cannot be exported through qemu (it ignores VHD parents)"
                    };
                    eprintln!(
                        "xenapinfs-sim: {why}; plugged VBDs are plain raw copies of the disk, written back as a new VHD on unplug"
                    );
                }
                fill_raw(vhd_path, &dev, read_only)?;
                Backing::Raw
            }
        };
        self.exports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                vbd.to_string(),
                Export {
                    dev,
                    vhd: vhd_path.to_path_buf(),
                    read_only,
                    size: info.virtual_size,
                    uuid: info.uuid,
                    backing,
                },
            );
        Ok(())
    }

    /// Takes the device away and brings the VHD back into XenServer's layout.
    pub fn withdraw(&self, vbd: &str) -> Result<(), String> {
        let Some(export) = self
            .exports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(vbd)
        else {
            return Ok(());
        };
        finish(export)
    }

    /// Unplugs everything (at shutdown); reports every failure.
    pub fn withdraw_all(&self) -> Vec<String> {
        let exports: Vec<(String, Export)> = self
            .exports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain()
            .collect();
        exports
            .into_iter()
            .filter_map(|(vbd, export)| finish(export).err().map(|e| format!("{vbd}: {e}")))
            .collect()
    }
}

struct Qemu {
    daemon: PathBuf,
    img: PathBuf,
}

impl Qemu {
    /// Replaces an empty VHD by an empty one in qemu's own layout (footer right after the BAT).
    /// The uuid is restored when the VHD is normalised at unplug.
    fn recreate_empty(&self, vhd_path: &Path, size: u64) -> Result<(), String> {
        let temp = super::storage::temp_beside(vhd_path, "plug");
        let output = Command::new(&self.img)
            .args([
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                "subformat=dynamic,force_size=on",
            ])
            .arg(&temp)
            .arg(size.to_string())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.img.display()))?;
        if !output.status.success() {
            let _ = std::fs::remove_file(&temp);
            return Err(format!(
                "qemu-img create failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        std::fs::rename(&temp, vhd_path).map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            format!("{}: {e}", vhd_path.display())
        })
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The qemu tools to use, if FUSE exports can work here.
fn find_qemu(configured: Option<&Path>) -> Option<Qemu> {
    if OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_err()
    {
        return None;
    }
    let daemon = match configured {
        Some(path) => path.to_path_buf(),
        None => on_path("qemu-storage-daemon")?,
    };
    let img = daemon
        .parent()
        .map(|dir| dir.join("qemu-img"))
        .filter(|p| p.is_file())
        .or_else(|| on_path("qemu-img"))?;
    daemon.is_file().then_some(Qemu { daemon, img })
}

/// qemu's option syntax doubles commas inside values.
fn qemu_escape(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

fn start_fuse_export(
    daemon: &Path,
    vhd_path: &Path,
    dev: &Path,
    read_only: bool,
) -> Result<Child, String> {
    File::create(dev).map_err(|e| format!("{}: {e}", dev.display()))?;
    let ro = if read_only { ",read-only=on" } else { "" };
    let mut child = Command::new(daemon)
        .arg("--blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=f{ro}",
            qemu_escape(vhd_path)
        ))
        .arg("--blockdev")
        .arg(format!("driver=vpc,file=f,node-name=d{ro}"))
        .arg("--export")
        .arg(format!(
            "type=fuse,id=e,node-name=d,mountpoint={},writable={}",
            qemu_escape(dev),
            if read_only { "off" } else { "on" }
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            let _ = std::fs::remove_file(dev);
            format!("cannot start {}: {e}", daemon.display())
        })?;
    let parent_dev = dev
        .parent()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| m.dev());
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            let _ = std::fs::remove_file(dev);
            return Err(format!(
                "qemu-storage-daemon exited ({status}): {}",
                stderr.trim()
            ));
        }
        let mounted = std::fs::metadata(dev).ok().map(|m| m.dev()) != parent_dev;
        if mounted {
            return Ok(child);
        }
        if started.elapsed() > EXPORT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(dev);
            return Err(format!(
                "the FUSE export on {} did not come up",
                dev.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stop_fuse_export(mut child: Child, dev: &Path) -> Result<(), String> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() < EXPORT_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
    }
    // The daemon unmounts on exit; make sure nothing is left mounted if it did not.
    let _ = nix::mount::umount2(dev, nix::mount::MntFlags::MNT_DETACH);
    std::fs::remove_file(dev).map_err(|e| format!("{}: {e}", dev.display()))
}

fn fill_raw(vhd_path: &Path, dev: &Path, read_only: bool) -> Result<(), String> {
    let mut reader = ChainReader::open(vhd_path).map_err(|e| e.to_string())?;
    let size = reader.virtual_size();
    let mut out = File::create(dev).map_err(|e| format!("{}: {e}", dev.display()))?;
    let mut buf = vec![0u8; vhd::BLOCK_SIZE as usize];
    let blocks = size.div_ceil(vhd::BLOCK_SIZE);
    let fill = (|| -> Result<(), String> {
        for index in 0..blocks {
            if !reader.allocated(index) {
                continue;
            }
            let start = index * vhd::BLOCK_SIZE;
            let n = (size - start).min(vhd::BLOCK_SIZE) as usize;
            reader
                .read_at(start, &mut buf[..n])
                .map_err(|e| e.to_string())?;
            if buf[..n].iter().all(|b| *b == 0) {
                continue;
            }
            out.seek(SeekFrom::Start(start))
                .map_err(|e| e.to_string())?;
            out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        }
        out.set_len(size).map_err(|e| e.to_string())?;
        out.sync_all().map_err(|e| e.to_string())
    })();
    if let Err(e) = fill {
        let _ = std::fs::remove_file(dev);
        return Err(e);
    }
    if read_only {
        let mut perms = std::fs::metadata(dev)
            .map_err(|e| e.to_string())?
            .permissions();
        perms.set_readonly(true);
        let _ = std::fs::set_permissions(dev, perms);
    }
    Ok(())
}

/// Rewrites `vhd` in place (same uuid) through a temporary file and a rename.
fn renormalise(vhd_path: &Path, uuid: uuid::Uuid) -> Result<(), String> {
    let temp = super::storage::temp_beside(vhd_path, "unplug");
    vhd::copy_flattened(vhd_path, &temp, uuid, None, &mut |_, _| true)
        .map_err(|e| e.to_string())
        .and_then(|_| {
            std::fs::rename(&temp, vhd_path).map_err(|e| format!("{}: {e}", vhd_path.display()))
        })
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&temp);
        })
}

fn finish(export: Export) -> Result<(), String> {
    match export.backing {
        Backing::Fuse(child) => {
            stop_fuse_export(child, &export.dev)?;
            if export.read_only {
                Ok(())
            } else {
                renormalise(&export.vhd, export.uuid)
            }
        }
        Backing::Raw => {
            let result = if export.read_only {
                Ok(())
            } else {
                let temp = super::storage::temp_beside(&export.vhd, "unplug");
                File::open(&export.dev)
                    .map_err(|e| format!("{}: {e}", export.dev.display()))
                    .and_then(|mut raw| {
                        vhd::write_dynamic_from(
                            &mut raw,
                            export.size,
                            &temp,
                            export.uuid,
                            &mut |_, _| true,
                        )
                        .map_err(|e| e.to_string())
                    })
                    .and_then(|_| {
                        std::fs::rename(&temp, &export.vhd)
                            .map_err(|e| format!("{}: {e}", export.vhd.display()))
                    })
                    .inspect_err(|_| {
                        let _ = std::fs::remove_file(&temp);
                    })
            };
            let removed = std::fs::remove_file(&export.dev)
                .map_err(|e| format!("{}: {e}", export.dev.display()));
            result.and(removed)
        }
    }
}
