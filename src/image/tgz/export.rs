//! The exporter: the tar stream is cut into chunks that worker threads compress, each primed
//! with the last 32 KiB of the chunk before it and ended with a sync flush (byte-aligned, not
//! final), so that the pieces concatenate into one deflate stream in one gzip member. The
//! calling thread reads the files and writes the output in order.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, mpsc};

use flate2::{Compress, Compression, Crc, FlushCompress, Status};

use crate::image::ImageError;
use crate::vhd::{self, DiskType};

/// Uncompressed bytes per compression job.
const CHUNK: usize = 2 << 20;
/// Deflate's window: how much of the previous chunk primes the next.
const WINDOW: usize = 32 << 10;
/// GNU tar pads the archive to a multiple of its record size (20 blocks).
const RECORD: u64 = 20 * 512;
/// Most compression threads (memory grows with them: two chunks per thread in flight).
const MAX_THREADS: usize = 32;
/// gzip's default level.
const LEVEL: u32 = 6;
/// gzip member header: deflate, no flags, no mtime, OS "Unix".
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];

/// One piece of the uncompressed tar stream.
enum Segment {
    Bytes(Vec<u8>),
    File {
        file: File,
        path: PathBuf,
        left: u64,
    },
}

/// The uncompressed tar stream, produced on demand.
struct TarStream {
    segments: VecDeque<Segment>,
    total: u64,
}

fn io_at(path: &Path, what: &str) -> impl FnOnce(io::Error) -> ImageError {
    ImageError::io_at(path, what)
}

impl TarStream {
    fn new(chain: &[PathBuf]) -> Result<TarStream, ImageError> {
        let mut segments = VecDeque::new();
        let mut total = 0u64;
        for (i, path) in chain.iter().enumerate() {
            let file = File::open(path).map_err(io_at(path, "opening"))?;
            let meta = file.metadata().map_err(io_at(path, "stat of"))?;
            if !meta.is_file() {
                return Err(ImageError::Refused(format!(
                    "{}: not a regular file",
                    path.display()
                )));
            }
            let size = meta.len();
            let mut header = tar::Header::new_gnu();
            let name = format!("{i}.vhd");
            header
                .set_path(&name)
                .map_err(ImageError::io(format!("tar header for {name}")))?;
            header.set_size(size);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
            header.set_entry_type(tar::EntryType::Regular);
            header
                .set_username("root")
                .and_then(|()| header.set_groupname("root"))
                .map_err(ImageError::io(format!("tar header for {name}")))?;
            header.set_cksum();
            segments.push_back(Segment::Bytes(header.as_bytes().to_vec()));
            segments.push_back(Segment::File {
                file,
                path: path.clone(),
                left: size,
            });
            let padding = size.next_multiple_of(512) - size;
            if padding > 0 {
                segments.push_back(Segment::Bytes(vec![0; padding as usize]));
            }
            total += 512 + size + padding;
        }
        // Two zero blocks end the archive; GNU tar then pads to its record size.
        let end = (total + 1024).next_multiple_of(RECORD) - total;
        segments.push_back(Segment::Bytes(vec![0; end as usize]));
        total += end;
        Ok(TarStream { segments, total })
    }

    /// Fill `buf` as far as the stream goes; returns the bytes placed.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, ImageError> {
        let mut got = 0;
        while got < buf.len() {
            let Some(seg) = self.segments.front_mut() else {
                break;
            };
            match seg {
                Segment::Bytes(bytes) => {
                    let n = bytes.len().min(buf.len() - got);
                    buf[got..got + n].copy_from_slice(&bytes[..n]);
                    bytes.drain(..n);
                    got += n;
                    if bytes.is_empty() {
                        self.segments.pop_front();
                    }
                }
                Segment::File { file, path, left } => {
                    let want = (*left).min((buf.len() - got) as u64) as usize;
                    if want == 0 {
                        self.segments.pop_front();
                        continue;
                    }
                    let n = match file.read(&mut buf[got..got + want]) {
                        Ok(0) => {
                            return Err(ImageError::Io {
                                context: format!("reading {}", path.display()),
                                source: io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    "the file shrank during the export",
                                ),
                            });
                        }
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(io_at(path, "reading")(e)),
                    };
                    *left -= n as u64;
                    got += n;
                }
            }
        }
        Ok(got)
    }
}

/// The files must form the chain they claim to: each one the parent of the one before.
fn validate_chain(chain: &[PathBuf]) -> Result<(), ImageError> {
    if chain.is_empty() {
        return Err(ImageError::Refused(
            "nothing to export: the chain is empty".to_string(),
        ));
    }
    let infos = chain
        .iter()
        .map(|p| vhd::inspect(p))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, info) in infos.iter().enumerate() {
        let path = chain[i].display();
        match (&info.parent, infos.get(i + 1)) {
            (Some(link), Some(parent)) if link.uuid != parent.uuid => {
                return Err(ImageError::Refused(format!(
                    "{path}: its parent UUID {} is not the UUID {} of the next file {}",
                    link.uuid,
                    parent.uuid,
                    chain[i + 1].display()
                )));
            }
            (Some(_), Some(_)) => {}
            (Some(link), None) => {
                return Err(ImageError::Refused(format!(
                    "{path}: the last file is a differencing disk; its parent {} is missing \
                     from the chain",
                    link.uuid
                )));
            }
            (None, Some(_)) => {
                return Err(ImageError::Refused(format!(
                    "{path}: a {} disk has no parent, but {} follows it in the chain",
                    info.disk_type,
                    chain[i + 1].display()
                )));
            }
            (None, None) => debug_assert_ne!(info.disk_type, DiskType::Differencing),
        }
    }
    Ok(())
}

struct Job {
    data: Vec<u8>,
    len: usize,
    dict: Vec<u8>,
    last: bool,
    reply: mpsc::Sender<Result<Done, String>>,
}

struct Done {
    /// The input buffer, for reuse.
    data: Vec<u8>,
    len: usize,
    compressed: Vec<u8>,
    crc: Crc,
}

fn worker(jobs: &Mutex<mpsc::Receiver<Job>>, level: u32) {
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(PoisonError::into_inner);
            rx.recv()
        };
        let Ok(job) = job else { return };
        let result = compress_chunk(&job.data[..job.len], &job.dict, job.last, level).map(
            |(compressed, crc)| Done {
                data: job.data,
                len: job.len,
                compressed,
                crc,
            },
        );
        let _ = job.reply.send(result);
    }
}

/// Raw deflate of one chunk primed with `dict`: a sync flush ends it on a byte boundary
/// unless it is the last, which ends the stream.
fn compress_chunk(
    data: &[u8],
    dict: &[u8],
    last: bool,
    level: u32,
) -> Result<(Vec<u8>, Crc), String> {
    let mut c = Compress::new(Compression::new(level), false);
    if !dict.is_empty() {
        c.set_dictionary(dict).map_err(|e| e.to_string())?;
    }
    let mut out = Vec::with_capacity(data.len() + data.len() / 512 + 1024);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    loop {
        let consumed = c.total_in() as usize;
        let status = c
            .compress_vec(&data[consumed..], &mut out, flush)
            .map_err(|e| e.to_string())?;
        let all_in = c.total_in() as usize == data.len();
        let finished = if last {
            status == Status::StreamEnd
        } else {
            all_in && out.len() < out.capacity()
        };
        if finished {
            break;
        }
        out.reserve(64 << 10);
    }
    let mut crc = Crc::new();
    crc.update(data);
    Ok((out, crc))
}

pub(super) fn run(
    chain: &[PathBuf],
    out: &mut dyn Write,
    threads: usize,
    progress: &mut dyn FnMut(u64) -> bool,
) -> Result<u64, ImageError> {
    run_level(chain, out, threads, LEVEL, progress)
}

/// [`run`] with a chosen deflate level (1..=9).
pub(super) fn run_level(
    chain: &[PathBuf],
    out: &mut dyn Write,
    threads: usize,
    level: u32,
    progress: &mut dyn FnMut(u64) -> bool,
) -> Result<u64, ImageError> {
    validate_chain(chain)?;
    let mut stream = TarStream::new(chain)?;
    let total = stream.total;
    let workers = threads.clamp(1, MAX_THREADS);
    std::thread::scope(|s| {
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        for _ in 0..workers {
            let rx = Arc::clone(&job_rx);
            s.spawn(move || worker(&rx, level));
        }
        let mut pending: VecDeque<mpsc::Receiver<Result<Done, String>>> = VecDeque::new();
        let mut spare: Vec<Vec<u8>> = Vec::new();
        let mut dict: Vec<u8> = Vec::new();
        let mut crc = Crc::new();
        let mut produced = 0u64;
        let mut done = 0u64;
        let mut written = 0u64;
        put(out, &GZIP_HEADER, &mut written)?;
        while produced < total || !pending.is_empty() {
            if produced < total && pending.len() <= workers {
                let mut buf = spare.pop().unwrap_or_else(|| vec![0u8; CHUNK]);
                let len = stream.fill(&mut buf)?;
                if len == 0 {
                    return Err(ImageError::Io {
                        context: "building the tar stream".to_string(),
                        source: io::Error::from(io::ErrorKind::UnexpectedEof),
                    });
                }
                produced += len as u64;
                let next_dict = buf[len.saturating_sub(WINDOW)..len].to_vec();
                let (tx, rx) = mpsc::channel();
                job_tx
                    .send(Job {
                        data: buf,
                        len,
                        dict: std::mem::replace(&mut dict, next_dict),
                        last: produced == total,
                        reply: tx,
                    })
                    .map_err(|_| compress_gone())?;
                pending.push_back(rx);
                continue;
            }
            let Some(rx) = pending.pop_front() else { break };
            let finished = rx
                .recv()
                .map_err(|_| compress_gone())?
                .map_err(|e| ImageError::Io {
                    context: "compressing the vhd-tgz".to_string(),
                    source: io::Error::other(e),
                })?;
            put(out, &finished.compressed, &mut written)?;
            crc.combine(&finished.crc);
            done += finished.len as u64;
            spare.push(finished.data);
            if !progress(done) {
                return Err(ImageError::Cancelled);
            }
        }
        let mut trailer = [0u8; 8];
        trailer[..4].copy_from_slice(&crc.sum().to_le_bytes());
        trailer[4..].copy_from_slice(&crc.amount().to_le_bytes());
        put(out, &trailer, &mut written)?;
        out.flush()
            .map_err(ImageError::io("writing the vhd-tgz output"))?;
        Ok(written)
    })
}

fn put(out: &mut dyn Write, bytes: &[u8], written: &mut u64) -> Result<(), ImageError> {
    out.write_all(bytes)
        .map_err(ImageError::io("writing the vhd-tgz output"))?;
    *written += bytes.len() as u64;
    Ok(())
}

fn compress_gone() -> ImageError {
    ImageError::Io {
        context: "compressing the vhd-tgz".to_string(),
        source: io::Error::other("a compression thread stopped"),
    }
}
