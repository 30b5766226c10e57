//! Header parsers for the formats qemu-img reads, written for hostile input: every offset and
//! size read from an image is checked against the file before it is used, arithmetic is
//! checked, nothing is allocated from an untrusted size before that size is bounded, and a
//! parser never panics (the tests feed them random and truncated bytes).
//!
//! Each parser applies the safety rules of its format (no external files, no parents, no
//! encryption, a consistent header) and returns the virtual size it found. A refusal is
//! [`ImageError::Refused`] whose message names the structure, the field and the rule.

pub mod qcow2;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::ImageError;

/// Positioned reads over an image, so parsers run the same on a file and on a byte slice.
pub trait ReadAt {
    /// Size of the image in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; callers check bounds first (see [`read`]).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

/// An image in memory (tests, small buffers).
impl ReadAt for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).ok();
        let range = start.and_then(|s| Some(s..s.checked_add(buf.len())?));
        match range.and_then(|r| self.get(r)) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// An open image file whose size was taken once, when it was opened.
pub struct FileSource {
    file: File,
    size: u64,
}

impl FileSource {
    pub fn new(file: File, size: u64) -> Self {
        FileSource { file, size }
    }
}

impl ReadAt for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(&self.file, buf, offset)
    }
}

/// `what` spans `offset..offset+len`; refuse unless that lies inside the image.
pub fn check_span(src: &dyn ReadAt, what: &str, offset: u64, len: u64) -> Result<(), ImageError> {
    let size = src.size();
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(refused(format!(
            "{what} at offset {offset:#x} ({len} bytes) lies outside the {size}-byte file"
        ))),
    }
}

/// Read `buf.len()` bytes of `what` at `offset`, refusing spans outside the image.
pub fn read(src: &dyn ReadAt, what: &str, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
    check_span(src, what, offset, buf.len() as u64)?;
    src.read_exact_at(buf, offset)
        .map_err(|source| ImageError::Io {
            context: format!("reading {what} at offset {offset:#x}"),
            source,
        })
}

/// A fixed-size structure at `offset`.
pub fn read_array<const N: usize>(
    src: &dyn ReadAt,
    what: &str,
    offset: u64,
) -> Result<[u8; N], ImageError> {
    let mut buf = [0u8; N];
    read(src, what, offset, &mut buf)?;
    Ok(buf)
}

/// Refuse a virtual size above the caller's limit before any table sized by it is read.
pub fn check_virtual_size(format: &str, size: u64, limit: u64) -> Result<(), ImageError> {
    if size > limit {
        return Err(ImageError::TooLarge {
            what: format!("the {format} virtual size"),
            size,
            limit,
        });
    }
    Ok(())
}

pub(crate) fn refused(msg: impl Into<String>) -> ImageError {
    ImageError::Refused(msg.into())
}

/// Text from an image for an error message: escaped, and cut to a readable length.
pub(crate) fn shown(bytes: &[u8]) -> String {
    const MAX: usize = 200;
    let cut = &bytes[..bytes.len().min(MAX)];
    let mut s = format!("{:?}", String::from_utf8_lossy(cut));
    if bytes.len() > MAX {
        s.push_str("...");
    }
    s
}

// Field access on buffers whose size the caller fixed; an out-of-range field reads as zero so
// a mistake can never become a panic on hostile input.
fn field<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(src) = off.checked_add(N).and_then(|end| b.get(off..end)) {
        a.copy_from_slice(src);
    }
    a
}

pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes(field(b, off))
}
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(field(b, off))
}
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(field(b, off))
}
pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(field(b, off))
}
pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(field(b, off))
}
pub(crate) fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(field(b, off))
}
pub(crate) fn bytes<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    field(b, off)
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::{Path, PathBuf};

    /// Run the real qemu-img; the test fails with its stderr if it fails.
    pub fn qemu_img(args: &[&str]) {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img is installed");
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `qemu-img create -f FORMAT [OPTS] DIR/NAME SIZE`, returning the path.
    pub fn create(dir: &Path, name: &str, format: &str, opts: &[&str], size: &str) -> PathBuf {
        let path = dir.join(name);
        let p = path.to_str().unwrap();
        let mut args = vec!["create", "-q", "-f", format];
        args.extend_from_slice(opts);
        args.push(p);
        args.push(size);
        qemu_img(&args);
        path
    }

    /// A raw file of `size` bytes, holes except `chunk` random bytes every `stride`.
    pub fn random_raw(path: &Path, size: u64, stride: u64, chunk: usize, seed: u64) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(path).unwrap();
        f.set_len(size).unwrap();
        let mut rng = Rng::new(seed);
        let mut buf = vec![0u8; chunk];
        let mut at = 0;
        while at < size {
            rng.fill(&mut buf);
            let n = (size - at).min(chunk as u64) as usize;
            f.write_all_at(&buf[..n], at).unwrap();
            at += stride;
        }
    }

    /// Convert a raw file holding some data into `format` with `opts`.
    pub fn with_data(dir: &Path, name: &str, format: &str, opts: &[&str]) -> PathBuf {
        let raw = dir.join(format!("{name}.src.raw"));
        random_raw(&raw, 6 << 20, 1 << 20, 70_000, 7);
        let path = dir.join(name);
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", format];
        args.extend_from_slice(opts);
        args.push(raw.to_str().unwrap());
        args.push(path.to_str().unwrap());
        qemu_img(&args);
        path
    }

    /// A LUKS-encrypted 10 MiB qcow2, made once (qemu spends seconds on key derivation).
    pub fn luks_qcow2() -> &'static [u8] {
        static IMAGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        IMAGE.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = create(
                dir.path(),
                "luks.qcow2",
                "qcow2",
                &[
                    "--object",
                    "secret,id=s0,data=hunter2",
                    "-o",
                    "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                ],
                "10M",
            );
            std::fs::read(path).unwrap()
        })
    }

    pub fn refusal(r: Result<impl std::fmt::Debug, crate::image::ImageError>) -> String {
        match r {
            Err(crate::image::ImageError::Refused(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    /// A small deterministic generator (xorshift64*) so random-input tests are repeatable.
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed.max(1))
        }
        pub fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub fn below(&mut self, n: u64) -> u64 {
            if n == 0 { 0 } else { self.next() % n }
        }
        pub fn fill(&mut self, buf: &mut [u8]) {
            for b in buf {
                *b = self.next() as u8;
            }
        }
    }

    /// Feed variants of a valid image to `check`: truncated at many lengths, with random bytes
    /// changed in the first `hot` bytes (where headers live), and wholly random buffers. One
    /// working buffer is reused, so large images cost no more memory than one copy.
    pub fn mutations(
        valid: &[u8],
        hot: usize,
        seed: u64,
        count: usize,
        check: &mut dyn FnMut(&Vec<u8>),
    ) {
        let mut rng = Rng::new(seed);
        let mut buf: Vec<u8> = Vec::with_capacity(valid.len());
        for cut in [0, 1, 3, 4, 8, 64, 72, 100, 104, 511, 512, 513, 4096, 65536] {
            if cut < valid.len() {
                buf.clear();
                buf.extend_from_slice(&valid[..cut]);
                check(&buf);
            }
        }
        let mut whole = valid.to_vec();
        let hot = hot.min(whole.len());
        for _ in 0..count {
            let cut = rng.below(valid.len() as u64 + 1) as usize;
            buf.clear();
            buf.extend_from_slice(&valid[..cut]);
            check(&buf);
            if hot == 0 {
                continue;
            }
            let mut changed = Vec::new();
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(hot as u64) as usize;
                changed.push((i, whole[i]));
                whole[i] = rng.next() as u8;
            }
            check(&whole);
            for (i, b) in changed.into_iter().rev() {
                whole[i] = b;
            }
        }
        for len in [16usize, 512, 4096, 70000, 300_000] {
            buf.clear();
            buf.resize(len, 0);
            rng.fill(&mut buf);
            check(&buf);
        }
    }
}
