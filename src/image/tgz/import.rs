//! The streaming importer. One thread reads the source, inflates and parses the tar stream;
//! a second one writes the member data, so that inflating and writing overlap.
//!
//! Bounds, all enforced before the bytes are read: a member's tar size against
//! [`max_vhd_file_size`] of the limit, the tar headers, long names and PAX records between two
//! members against [`META_LIMIT`] (the tar crate would otherwise buffer a PAX record of any
//! size in memory), and the zero padding after the end-of-archive marker against
//! [`TRAILER_LIMIT`]. Memory stays at a few MiB whatever the input: [`IN_FLIGHT`] buffers of
//! [`BUF`] bytes, the inflater's window and the BAT of the VHD being inspected.

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use flate2::bufread::MultiGzDecoder;
use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
use uuid::Uuid;

use super::{ImportedChain, TgzLimits, max_vhd_file_size};
use crate::image::ImageError;
use crate::vhd::{self, BLOCK_SIZE, Chain, DiskType, VhdInfo};

/// Size of the buffers member data travels in.
const BUF: usize = 1 << 20;
/// Buffers between the parsing and the writing thread.
const IN_FLIGHT: usize = 4;
/// Read-ahead on the compressed source.
const INPUT_BUF: usize = 256 << 10;
/// Tar headers, GNU long names, PAX records and skipped bytes allowed between two members.
const META_LIMIT: u64 = 1 << 20;
/// Zero bytes allowed after the end-of-archive marker (GNU tar pads to its record size).
const TRAILER_LIMIT: u64 = 1 << 20;
/// Longest member name accepted (a file name on Linux).
const NAME_MAX: usize = 255;
/// The writing thread starts write-back of what it wrote every this many bytes, so that the
/// final fsync has little left to do.
const WRITEBACK_WINDOW: u64 = 32 << 20;
/// Legacy member names, child first: renamed to 0, 1, 2 in this order for those present.
const LEGACY: [&str; 3] = ["snap.vhd", "image.vhd", "base.vhd"];

/// Positions and failures of the reading side, shared by the source and the guard.
#[derive(Default)]
struct Tracker {
    /// Compressed bytes read from the source.
    compressed: Cell<u64>,
    /// The source itself failed (as opposed to the data in it being bad).
    source_failed: Cell<bool>,
    /// Uncompressed bytes handed to the tar parser.
    tar_pos: Cell<u64>,
    /// `tar_pos` may not go past this.
    limit: Cell<u64>,
    /// The tar parser asked for more than `limit`.
    limit_hit: Cell<bool>,
    /// The gzip decoder failed.
    gzip_failed: Cell<bool>,
}

/// The caller's reader, counting bytes for progress and telling its errors apart.
struct Source<'a> {
    inner: &'a mut dyn Read,
    t: &'a Tracker,
}

impl Read for Source<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.t.compressed.set(self.t.compressed.get() + n as u64);
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.t.source_failed.set(true);
                }
                Err(e)
            }
        }
    }
}

/// Between the gzip decoder and the tar parser: counts the uncompressed bytes and refuses to
/// hand out more than the current limit.
struct Guard<'a, R> {
    inner: R,
    t: &'a Tracker,
}

impl<R: Read> Read for Guard<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let pos = self.t.tar_pos.get();
        let room = self.t.limit.get().saturating_sub(pos);
        if room == 0 && !buf.is_empty() {
            self.t.limit_hit.set(true);
            return Err(io::Error::other("size limit reached"));
        }
        let n = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        match self.inner.read(&mut buf[..n]) {
            Ok(got) => {
                self.t.tar_pos.set(pos + got as u64);
                Ok(got)
            }
            Err(e) => {
                if !self.t.source_failed.get() && e.kind() != io::ErrorKind::Interrupted {
                    self.t.gzip_failed.set(true);
                }
                Err(e)
            }
        }
    }
}

/// Turn a read error from anywhere in the source → gzip → tar stack into the right error.
fn stream_error(t: &Tracker, what: &str, e: io::Error) -> ImageError {
    if t.source_failed.get() {
        ImageError::Io {
            context: format!("reading the vhd-tgz source ({what})"),
            source: e,
        }
    } else if t.limit_hit.get() {
        ImageError::Refused(format!(
            "{what}: more than {META_LIMIT} bytes of tar headers, long names or PAX records \
             before the next member"
        ))
    } else if t.gzip_failed.get() {
        ImageError::Refused(format!(
            "{what}: the gzip stream is not valid (not gzip, corrupt or truncated): {e}"
        ))
    } else {
        ImageError::Refused(format!(
            "{what}: the tar archive is not valid (corrupt or truncated): {e}"
        ))
    }
}

/// Where a member goes in the chain, by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// `N.vhd`.
    Numbered(usize),
    /// Index into [`LEGACY`].
    Legacy(usize),
    /// Any other `*.vhd`: accepted only as the one member.
    Single,
}

/// A member written to the staging directory and inspected.
struct Member {
    /// As in the archive, without a leading `./`.
    name: String,
    slot: Slot,
    path: PathBuf,
    /// Metadata as found in the archive (before any rewrite), then updated by checks.
    info: VhdInfo,
    /// Held open so that the final fsync reports write-back errors of the streamed data.
    file: File,
    /// `vhd::check` passed (for a differencing disk: after it was linked to its parent).
    checked: bool,
}

/// Commands for the writing thread.
enum Cmd {
    Open(File),
    Data(Vec<u8>, usize),
    Close(mpsc::Sender<io::Result<File>>),
}

/// The writing thread: writes data buffers to the open member file and returns the buffers.
fn writer(cmds: mpsc::Receiver<Cmd>, free: mpsc::Sender<Vec<u8>>) {
    let mut file: Option<File> = None;
    let mut failed: Option<io::Error> = None;
    let mut written = 0u64;
    let mut flushed = 0u64;
    for cmd in cmds {
        match cmd {
            Cmd::Open(f) => {
                file = Some(f);
                failed = None;
                written = 0;
                flushed = 0;
            }
            Cmd::Data(buf, len) => {
                if failed.is_none()
                    && let Some(f) = file.as_mut()
                {
                    match f.write_all(&buf[..len]) {
                        Ok(()) => {
                            written += len as u64;
                            if written - flushed >= WRITEBACK_WINDOW {
                                start_writeback(f, flushed, written - flushed);
                                flushed = written;
                            }
                        }
                        Err(e) => failed = Some(e),
                    }
                }
                let _ = free.send(buf);
            }
            Cmd::Close(reply) => {
                let result = match (failed.take(), file.take()) {
                    (Some(e), _) => Err(e),
                    (None, Some(f)) => Ok(f),
                    (None, None) => Err(io::Error::other("no member file is open")),
                };
                let _ = reply.send(result);
            }
        }
    }
}

/// Ask the kernel to start writing a range back now (Linux's POSIX_FADV_DONTNEED starts
/// write-back of dirty pages without waiting, and drops the clean ones). Advisory only.
fn start_writeback(file: &File, offset: u64, len: u64) {
    if let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) {
        let _ = posix_fadvise(file, offset, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }
}

/// What a tar entry is, by type and name.
enum Kind {
    /// The `./` directory entry of `tar -C dir -c .`.
    Skip,
    Member(String, Slot),
}

/// Classify an entry by its type and name; refuse anything but regular files with strict
/// names (and the `./` directory).
fn classify<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    limits: &TgzLimits,
    before_members: bool,
) -> Result<Kind, ImageError> {
    use tar::EntryType;

    let raw = entry.path_bytes().into_owned();
    let shown = String::from_utf8_lossy(&raw).into_owned();
    let kind = entry.header().entry_type();
    let refuse = |rule: &str| Err(ImageError::Refused(format!("member {shown:?}: {rule}")));
    let dot_dir = raw == b"." || raw == b"./";
    match kind {
        EntryType::Regular => {}
        EntryType::Directory if dot_dir && before_members => {
            if entry.size() != 0 {
                return refuse("the ./ directory entry has data");
            }
            return Ok(Kind::Skip);
        }
        // A PAX global header applies to the whole archive; nothing in it is used, and the tar
        // parser skips its data within META_LIMIT.
        EntryType::XGlobalHeader => return Ok(Kind::Skip),
        EntryType::Directory => return refuse("directory members are not allowed"),
        EntryType::Symlink => return refuse("symbolic links are not allowed"),
        EntryType::Link => return refuse("hard links are not allowed"),
        EntryType::Char | EntryType::Block => return refuse("device nodes are not allowed"),
        EntryType::Fifo => return refuse("FIFOs are not allowed"),
        EntryType::Continuous => {
            return refuse("contiguous files (tar type '7') are not allowed");
        }
        EntryType::GNUSparse => return refuse("GNU sparse files are not allowed"),
        EntryType::GNULongLink => return refuse("GNU long link names are not allowed"),
        other => {
            return refuse(&format!(
                "tar member type {:?} is not allowed, only regular files",
                char::from(other.as_byte())
            ));
        }
    }
    let pax = entry
        .pax_extensions()
        .map_err(|e| ImageError::Refused(format!("member {shown:?}: malformed PAX header: {e}")))?;
    if let Some(pax) = pax {
        for ext in pax {
            let ext = ext.map_err(|e| {
                ImageError::Refused(format!("member {shown:?}: malformed PAX record: {e}"))
            })?;
            if ext.key_bytes().starts_with(b"GNU.sparse") {
                return refuse("PAX (GNU) sparse files are not allowed");
            }
        }
    }

    if raw.contains(&0) {
        return refuse("the name contains a NUL byte");
    }
    if raw.first() == Some(&b'/') {
        return refuse("absolute paths are not allowed");
    }
    let rest = raw.strip_prefix(b"./").unwrap_or(&raw);
    if rest.split(|&b| b == b'/').any(|c| c == b"..") {
        return refuse("'..' (path traversal) is not allowed");
    }
    if rest.contains(&b'/') {
        return refuse("members in subdirectories are not allowed, only plain names");
    }
    if rest.is_empty() || rest == b"." {
        return refuse("a regular file cannot be named like a directory");
    }
    if rest.len() > NAME_MAX {
        return refuse(&format!("the name is longer than {NAME_MAX} bytes"));
    }
    let Ok(name) = std::str::from_utf8(rest) else {
        return refuse("the name is not UTF-8");
    };
    if name.chars().any(char::is_control) {
        return refuse("the name contains control characters");
    }
    let Some(stem) = name.strip_suffix(".vhd") else {
        return refuse(
            "not a VHD: only N.vhd members (0.vhd the leaf, 1.vhd its parent, ...) are allowed",
        );
    };
    if !stem.is_empty()
        && stem.bytes().all(|b| b.is_ascii_digit())
        && (stem == "0" || !stem.starts_with('0'))
    {
        let index = stem
            .parse::<usize>()
            .ok()
            .filter(|&n| n < limits.max_members);
        return match index {
            Some(n) => Ok(Kind::Member(name.to_string(), Slot::Numbered(n))),
            None => refuse(&format!(
                "too many members: the sequence number is beyond the limit of {} members",
                limits.max_members
            )),
        };
    }
    if let Some(rank) = LEGACY.iter().position(|&l| l == name) {
        return Ok(Kind::Member(name.to_string(), Slot::Legacy(rank)));
    }
    if name == "swap.vhd" {
        return refuse("embedded swap disks (swap.vhd) are not supported");
    }
    if stem.is_empty() || stem.starts_with('.') {
        return refuse("hidden or empty file names are not allowed");
    }
    Ok(Kind::Member(name.to_string(), Slot::Single))
}

/// State of one import while the archive streams in.
struct Importer<'a> {
    staging: &'a Path,
    limits: &'a TgzLimits,
    t: &'a Tracker,
    members: Vec<Member>,
    names: HashSet<String>,
    total: u64,
    cmds: mpsc::SyncSender<Cmd>,
    free: mpsc::Receiver<Vec<u8>>,
}

fn thread_gone() -> ImageError {
    ImageError::Io {
        context: "writing the member data".to_string(),
        source: io::Error::other("the writing thread stopped"),
    }
}

impl Importer<'_> {
    fn member_limit(&self) -> u64 {
        max_vhd_file_size(self.limits.max_virtual_size)
    }

    /// Name-level rules when a member starts: duplicates, count, the single-name rule.
    fn admit(&mut self, name: &str, slot: Slot) -> Result<(), ImageError> {
        if !self.names.insert(name.to_string()) {
            return Err(ImageError::Refused(format!(
                "member {name}: duplicate, the archive holds it twice"
            )));
        }
        if self.members.len() >= self.limits.max_members {
            return Err(ImageError::Refused(format!(
                "member {name}: too many members, at most {} VHDs are allowed",
                self.limits.max_members
            )));
        }
        let odd = if slot == Slot::Single && !self.members.is_empty() {
            Some(name)
        } else {
            self.members
                .iter()
                .find(|m| m.slot == Slot::Single)
                .map(|m| m.name.as_str())
        };
        if let Some(odd) = odd {
            return Err(ImageError::Refused(format!(
                "member {odd}: extra member; a VHD not named N.vhd (or snap.vhd, image.vhd, \
                 base.vhd) is accepted only as the only member of the archive"
            )));
        }
        Ok(())
    }

    /// Stream one member's data into `<staging>/<name>`.
    fn receive<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
        progress: &mut dyn FnMut(u64) -> bool,
    ) -> Result<(PathBuf, File), ImageError> {
        let size = entry.size();
        let limit = self.member_limit();
        if size > limit {
            return Err(ImageError::TooLarge {
                what: format!(
                    "member {name} (a VHD of at most {} bytes of virtual size)",
                    self.limits.max_virtual_size
                ),
                size,
                limit,
            });
        }
        self.total = self.total.saturating_add(size);
        let total_limit = limit.saturating_mul(self.limits.max_members as u64);
        if self.total > total_limit {
            return Err(ImageError::TooLarge {
                what: "the members together".to_string(),
                size: self.total,
                limit: total_limit,
            });
        }
        let path = self.staging.join(name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(ImageError::io_at(&path, "creating"))?;
        self.cmds.send(Cmd::Open(file)).map_err(|_| thread_gone())?;
        self.t
            .limit
            .set(entry.raw_file_position().saturating_add(size));
        let mut done = 0u64;
        while done < size {
            let mut buf = self.free.recv().map_err(|_| thread_gone())?;
            let want = (size - done).min(BUF as u64) as usize;
            let mut got = 0;
            while got < want {
                match entry.read(&mut buf[got..want]) {
                    Ok(0) => {
                        return Err(ImageError::Refused(format!(
                            "member {name}: the archive ends after {} of its {size} bytes \
                             (truncated tar)",
                            done + got as u64
                        )));
                    }
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(stream_error(self.t, &format!("member {name}"), e)),
                }
            }
            self.cmds
                .send(Cmd::Data(buf, got))
                .map_err(|_| thread_gone())?;
            done += got as u64;
            if !progress(self.t.compressed.get()) {
                return Err(ImageError::Cancelled);
            }
        }
        let (tx, rx) = mpsc::channel();
        self.cmds.send(Cmd::Close(tx)).map_err(|_| thread_gone())?;
        let file = rx
            .recv()
            .map_err(|_| thread_gone())?
            .map_err(ImageError::io_at(&path, "writing"))?;
        Ok((path, file))
    }

    /// Validate a complete member on its own, then link it with its numbered neighbours.
    fn complete(&mut self, member: Member) -> Result<(), ImageError> {
        let info = &member.info;
        let name = &member.name;
        if info.disk_type != DiskType::Fixed && info.block_size != BLOCK_SIZE {
            return Err(ImageError::Refused(format!(
                "member {name}: block size {} bytes; XenServer uses {BLOCK_SIZE}-byte blocks",
                info.block_size
            )));
        }
        if info.virtual_size > self.limits.max_virtual_size {
            return Err(ImageError::TooLarge {
                what: format!("the virtual size of member {name}"),
                size: info.virtual_size,
                limit: self.limits.max_virtual_size,
            });
        }
        let bound = max_vhd_file_size(info.virtual_size);
        if info.file_size > bound {
            return Err(ImageError::TooLarge {
                what: format!(
                    "member {name} (a VHD of {} bytes of virtual size)",
                    info.virtual_size
                ),
                size: info.file_size,
                limit: bound,
            });
        }
        if let Some(p) = &info.parent {
            if p.uuid.is_nil() {
                return Err(ImageError::Refused(format!(
                    "member {name}: differencing disk with an all-zero parent UUID (a blktap \
                     'raw parent' reads a file outside the chain)"
                )));
            }
            if p.uuid == info.uuid {
                return Err(ImageError::Refused(format!(
                    "member {name}: loop, its parent UUID {} is its own UUID",
                    p.uuid
                )));
            }
        }
        if let Some(other) = self.members.iter().find(|m| m.info.uuid == info.uuid) {
            return Err(ImageError::Refused(format!(
                "member {name}: its UUID {} is also the UUID of member {} (duplicate UUIDs make \
                 a loop)",
                info.uuid, other.name
            )));
        }
        if member.slot == Slot::Numbered(0) && info.hidden {
            return Err(leaf_hidden(name));
        }
        let differencing = info.disk_type == DiskType::Differencing;
        let mut member = member;
        if !differencing {
            member.info = vhd::check(&member.path).map_err(|e| as_member(&member.name, e))?;
            member.checked = true;
        }
        let slot = member.slot;
        self.members.push(member);
        if let Slot::Numbered(n) = slot {
            let last = self.members.len() - 1;
            let at = |k: Option<usize>| {
                k.and_then(|k| {
                    self.members
                        .iter()
                        .position(|m| m.slot == Slot::Numbered(k))
                })
            };
            let below = at(n.checked_sub(1));
            let above = at(n.checked_add(1));
            if let Some(below) = below {
                link(&mut self.members, below, last)?;
            }
            if let Some(above) = above {
                link(&mut self.members, last, above)?;
            }
        }
        Ok(())
    }
}

/// A VHD error about a staged member, told with the member's name: the tenant sees which
/// member broke which rule, not where the agent stages files on the share.
fn as_member(name: &str, e: vhd::VhdError) -> ImageError {
    ImageError::Vhd(e.about(Path::new(&format!("member {name}"))))
}

fn leaf_hidden(name: &str) -> ImageError {
    ImageError::Refused(format!(
        "member {name}: the leaf is marked hidden (XenServer garbage-collects a hidden VHD \
         without children)"
    ))
}

/// The chain rules between a child and its parent (on the uuids found in the archive), then
/// link the child to the parent's staging file and run the full check on it.
fn link(members: &mut [Member], child: usize, parent: usize) -> Result<(), ImageError> {
    let (p_name, p_uuid, p_size, p_path) = {
        let p = &members[parent];
        (
            p.name.clone(),
            p.info.uuid,
            p.info.virtual_size,
            p.path.clone(),
        )
    };
    let c = &mut members[child];
    let Some(link) = &c.info.parent else {
        return Err(ImageError::Refused(format!(
            "member {}: a {} disk cannot have a parent, but member {p_name} follows it in the \
             chain (only the last member may be dynamic or fixed)",
            c.name, c.info.disk_type
        )));
    };
    if link.uuid != p_uuid {
        return Err(ImageError::Refused(format!(
            "member {}: its parent UUID {} is not the UUID {p_uuid} of member {p_name} (wrong \
             parent)",
            c.name, link.uuid
        )));
    }
    if c.info.virtual_size < p_size {
        return Err(ImageError::Refused(format!(
            "member {}: virtual size {} is smaller than the {p_size} of its parent {p_name}",
            c.name, c.info.virtual_size
        )));
    }
    vhd::set_parent(&c.path, &p_path).map_err(|e| as_member(&c.name, e))?;
    c.info = vhd::check(&c.path).map_err(|e| as_member(&c.name, e))?;
    c.checked = true;
    Ok(())
}

pub(super) fn run(
    src: &mut dyn Read,
    staging: &Path,
    leaf_uuid: Uuid,
    limits: &TgzLimits,
    progress: &mut dyn FnMut(u64) -> bool,
) -> Result<ImportedChain, ImageError> {
    if limits.max_members == 0 {
        return Err(ImageError::Refused(
            "no VHD member is allowed (max_members is 0)".to_string(),
        ));
    }
    let t = Tracker::default();
    let members = std::thread::scope(|s| {
        let (cmd_tx, cmd_rx) = mpsc::sync_channel::<Cmd>(IN_FLIGHT);
        let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
        for _ in 0..IN_FLIGHT + 1 {
            let _ = free_tx.send(vec![0u8; BUF]);
        }
        s.spawn(move || writer(cmd_rx, free_tx));
        let mut imp = Importer {
            staging,
            limits,
            t: &t,
            members: Vec::new(),
            names: HashSet::new(),
            total: 0,
            cmds: cmd_tx,
            free: free_rx,
        };
        let source = BufReader::with_capacity(INPUT_BUF, Source { inner: src, t: &t });
        let guard = Guard {
            inner: MultiGzDecoder::new(source),
            t: &t,
        };
        stream(&mut imp, guard, progress).map(|()| imp.members)
        // Dropping `imp` closes the command channel and ends the writing thread.
    })?;
    finish(members, staging, leaf_uuid, limits)
}

/// Read the archive to its end, member by member, then check what follows the end marker.
fn stream<R: Read>(
    imp: &mut Importer<'_>,
    guard: Guard<'_, R>,
    progress: &mut dyn FnMut(u64) -> bool,
) -> Result<(), ImageError> {
    let t = imp.t;
    let mut archive = tar::Archive::new(guard);
    // Where the next header is expected, and where the current metadata budget started: the
    // end of the last member's data. Skipped entries (the ./ directory, PAX global headers)
    // and their data are paid from the same budget.
    let mut next_header = 0u64;
    let mut budget_from = 0u64;
    {
        let mut entries = archive
            .entries()
            .map_err(|e| stream_error(t, "tar archive", e))?;
        loop {
            t.limit.set(budget_from.saturating_add(META_LIMIT));
            let mut entry = match entries.next() {
                None => break,
                Some(Ok(entry)) => entry,
                Some(Err(e)) => return Err(stream_error(t, "tar archive", e)),
            };
            let size = entry.size();
            next_header = size
                .checked_next_multiple_of(512)
                .and_then(|s| s.checked_add(entry.raw_file_position()))
                .ok_or_else(|| {
                    ImageError::Refused(format!(
                        "member {:?}: tar size {size} overflows",
                        String::from_utf8_lossy(&entry.path_bytes())
                    ))
                })?;
            let before_members = imp.names.is_empty();
            let (name, slot) = match classify(&mut entry, imp.limits, before_members)? {
                Kind::Skip => continue,
                Kind::Member(name, slot) => (name, slot),
            };
            imp.admit(&name, slot)?;
            let (path, file) = imp.receive(&mut entry, &name, progress)?;
            budget_from = next_header;
            let info = vhd::inspect(&path).map_err(|e| as_member(&name, e))?;
            imp.complete(Member {
                name,
                slot,
                path,
                info,
                file,
                checked: false,
            })?;
        }
    }
    // The tar parser stops at the first zero block; it must have read one (an archive that
    // just stops at a member boundary was cut short).
    if t.tar_pos.get() < next_header.saturating_add(512) {
        return Err(ImageError::Refused(
            "tar archive: truncated, it ends without the end-of-archive marker".to_string(),
        ));
    }
    let mut rest = archive.into_inner();
    t.limit.set(u64::MAX);
    let mut buf = vec![0u8; 64 << 10];
    let mut trailer = 0u64;
    loop {
        let n = match rest.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(stream_error(t, "after the end of the tar archive", e)),
        };
        if buf[..n].iter().any(|&b| b != 0) {
            return Err(ImageError::Refused(format!(
                "tar archive: data after the end-of-archive marker (at uncompressed offset {})",
                t.tar_pos.get() - n as u64
            )));
        }
        trailer += n as u64;
        if trailer > TRAILER_LIMIT {
            return Err(ImageError::Refused(format!(
                "tar archive: more than {TRAILER_LIMIT} bytes of padding after the \
                 end-of-archive marker"
            )));
        }
    }
    if imp.members.is_empty() {
        return Err(ImageError::Refused(
            "empty archive: no VHD member (expected 0.vhd, 1.vhd, ...)".to_string(),
        ));
    }
    Ok(())
}

/// Order the members, check the chain, give the files their final names and metadata.
fn finish(
    members: Vec<Member>,
    staging: &Path,
    leaf_uuid: Uuid,
    limits: &TgzLimits,
) -> Result<ImportedChain, ImageError> {
    let mut chain = order(members, limits)?;
    let n = chain.len();
    if chain[0].info.hidden {
        return Err(leaf_hidden(&chain[0].name));
    }
    for i in 0..n - 1 {
        if !chain[i].checked {
            link(&mut chain, i, i + 1)?;
        }
    }
    let base = &chain[n - 1];
    if let Some(p) = &base.info.parent {
        let msg = match chain.iter().find(|m| m.info.uuid == p.uuid) {
            Some(m) => format!(
                "member {}: loop, its parent UUID {} is the UUID of member {}",
                base.name, p.uuid, m.name
            ),
            None => format!(
                "member {}: the last member (the base) is a differencing disk whose parent {} \
                 is not in the archive",
                base.name, p.uuid
            ),
        };
        return Err(ImageError::Refused(msg));
    }
    if !base.checked {
        let info = vhd::check(&base.path)?;
        chain[n - 1].info = info;
        chain[n - 1].checked = true;
    }

    // Final names and metadata: uuids first, then hidden flags, then the parent links from the
    // base up, so that each child records its parent's final mtime.
    let mut paths = Vec::with_capacity(n);
    for (i, m) in chain.iter().enumerate() {
        let uuid = if i == 0 { leaf_uuid } else { Uuid::new_v4() };
        let path = staging.join(format!("{uuid}.vhd"));
        if path != m.path {
            if fs::symlink_metadata(&path).is_ok() {
                return Err(ImageError::Io {
                    context: format!("renaming {} to {}", m.path.display(), path.display()),
                    source: io::Error::from(io::ErrorKind::AlreadyExists),
                });
            }
            fs::rename(&m.path, &path).map_err(|e| ImageError::Io {
                context: format!("renaming {} to {}", m.path.display(), path.display()),
                source: e,
            })?;
        }
        vhd::set_uuid(&path, uuid)?;
        vhd::set_hidden(&path, i != 0)?;
        paths.push(path);
    }
    for i in (0..n - 1).rev() {
        vhd::set_parent(&paths[i], &paths[i + 1])?;
    }
    let opened = Chain::open(&paths[0])?;
    let names_match = opened.files().len() == n
        && opened
            .files()
            .iter()
            .zip(&paths)
            .all(|((p, _), q)| p.file_name() == q.file_name());
    if !names_match {
        return Err(ImageError::Refused(format!(
            "the rewritten chain of {} does not resolve to the {n} imported files",
            paths[0].display()
        )));
    }
    drop(opened);
    let mut files = Vec::with_capacity(n);
    for path in &paths {
        files.push((path.clone(), vhd::check(path)?));
    }
    for m in &chain {
        m.file
            .sync_all()
            .map_err(ImageError::io_at(&m.path, "fsync of"))?;
    }
    File::open(staging)
        .and_then(|d| d.sync_all())
        .map_err(ImageError::io_at(staging, "fsync of directory"))?;
    Ok(ImportedChain {
        leaf: paths[0].clone(),
        virtual_size: files[0].1.virtual_size,
        files,
    })
}

/// Put the members in chain order (leaf first), resolving legacy and single names; refuse
/// duplicates after renaming and gaps.
fn order(members: Vec<Member>, limits: &TgzLimits) -> Result<Vec<Member>, ImageError> {
    if members.len() == 1 && members[0].slot == Slot::Single {
        return Ok(members);
    }
    let mut legacy: Vec<Member> = Vec::new();
    let mut by_index: BTreeMap<usize, Member> = BTreeMap::new();
    for m in members {
        match m.slot {
            Slot::Numbered(i) => {
                by_index.insert(i, m);
            }
            _ => legacy.push(m),
        }
    }
    legacy.sort_by_key(|m| match m.slot {
        Slot::Legacy(rank) => rank,
        _ => usize::MAX,
    });
    for (i, m) in legacy.into_iter().enumerate() {
        if let Some(other) = by_index.get(&i) {
            return Err(ImageError::Refused(format!(
                "member {}: the legacy name is renamed to {i}.vhd, which duplicates member {}",
                m.name, other.name
            )));
        }
        by_index.insert(i, m);
    }
    let count = by_index.len();
    if count > limits.max_members {
        return Err(ImageError::Refused(format!(
            "too many members: {count} VHDs, at most {} are allowed",
            limits.max_members
        )));
    }
    if let Some(missing) = (0..count).find(|i| !by_index.contains_key(i)) {
        let names: Vec<&str> = by_index.values().map(|m| m.name.as_str()).collect();
        return Err(ImageError::Refused(format!(
            "gap in the chain: member {missing}.vhd is missing (the archive holds {}; members \
             must be numbered from 0.vhd without gaps)",
            names.join(", ")
        )));
    }
    Ok(by_index.into_values().collect())
}
