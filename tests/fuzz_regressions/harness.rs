//! What each fuzz target does with one input. Shared, by `#[path]`, between the cargo-fuzz
//! targets in `fuzz/fuzz_targets/` and the regression test `tests/fuzz_regressions.rs`, so that a
//! kept input is replayed through exactly the code that found it.
//!
//! Every function returns normally for any input: `Ok` or a clean error (a non-empty message,
//! of the kind the callers expect). A panic, an abort or an invariant below that does not hold
//! is a finding.

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use xenapinfs::api::{
    CopyRequest, CreateRequest, ExportQuery, ExportRequest, ExtendRequest, ImportQuery,
};
use xenapinfs::image::ImageError;
use xenapinfs::image::tgz::{TgzLimits, import_tgz};
use xenapinfs::image::transfer::UrlSpec;
use xenapinfs::vhd::{self, Chain, ChainReader, DiskType, VhdError};
use xenapinfs::volume::VolumeId;
use xenapinfs::xenapi::codec::{self, Decoded, Value};
use xenapinfs::xenapi::{
    FromRecord, HostRecord, PbdRecord, PoolRecord, SessionRecord, SrRecord, TaskRecord, VbdRecord,
    VdiRecord, VmRecord,
};

const MIB: u64 = 1 << 20;

/// How the `vhd` target cuts one input into files: `0.vhd` (the leaf), `1.vhd`, ... Parents are
/// found by the header's parent name, so a seed chain names its parents `1.vhd`, `2.vhd`, ...
pub const VHD_SPLIT: &[u8] = b"\n--next-vhd-file--\n";
/// Files per input (the rest of the input goes into the last one).
pub const MAX_VHD_FILES: usize = 4;
/// The virtual size up to which the `vhd` target also grows and flattens the input.
const DEEP_LIMIT: u64 = 8 * MIB;

/// Limits of the `vhd_tgz` target: small, so that a member is at most ~24 MiB (the 16 MiB
/// allowance of `max_vhd_file_size` plus the volume) whatever the input inflates to.
pub fn tgz_limits() -> TgzLimits {
    TgzLimits {
        max_virtual_size: 8 * MIB,
        max_members: 4,
    }
}

/// A fresh directory under `$TMPDIR` (scripts/fuzz points it at /dev/shm).
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("xenapinfs-fuzz-")
        .tempdir()
        .expect("creating a scratch directory")
}

/// Split `data` at [`VHD_SPLIT`] into at most [`MAX_VHD_FILES`] files.
pub fn split_files(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() + 1 < MAX_VHD_FILES {
        match rest.windows(VHD_SPLIT.len()).position(|w| w == VHD_SPLIT) {
            Some(at) => {
                out.push(&rest[..at]);
                rest = &rest[at + VHD_SPLIT.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

/// The inverse of [`split_files`], for seeds.
pub fn join_files(files: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, f) in files.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(VHD_SPLIT);
        }
        out.extend_from_slice(f);
    }
    out
}

/// A VHD error must name the file it is about (every message starts with the path), except
/// the cancellation, which nothing here asks for.
fn clean_vhd_error(e: &VhdError, dir: &Path) {
    let text = e.to_string();
    assert!(
        !matches!(e, VhdError::Cancelled),
        "unexpected cancellation: {text}"
    );
    assert!(
        text.starts_with(&dir.display().to_string()),
        "VHD error does not start with the file it concerns: {text}"
    );
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Reads spread over the merged view: the start, the end, and for each of the first 64 blocks
/// of 2 MiB one aligned and one unaligned piece. Returns (offset, bytes) of each read.
fn sample_reads(reader: &mut ChainReader) -> Vec<(u64, Vec<u8>)> {
    let size = reader.virtual_size();
    let mut spots: Vec<(u64, usize)> = vec![(0, 4096), (size.saturating_sub(4096), 4096)];
    let blocks = size.div_ceil(vhd::BLOCK_SIZE).min(64);
    for b in 0..blocks {
        let start = b * vhd::BLOCK_SIZE;
        spots.push((start, 4096));
        spots.push((start + 700, 1300));
        spots.push((start + vhd::BLOCK_SIZE - 300, 600));
    }
    let mut out = Vec::new();
    for (off, len) in spots {
        let len = (len as u64).min(size.saturating_sub(off)) as usize;
        if len == 0 {
            continue;
        }
        let mut buf = vec![0xA5u8; len];
        reader
            .read_at(off, &mut buf)
            .unwrap_or_else(|e| panic!("read of {len} bytes at {off} of an opened chain: {e}"));
        if !reader.allocated(off / vhd::BLOCK_SIZE)
            && !reader.allocated((off + len as u64 - 1) / vhd::BLOCK_SIZE)
        {
            assert!(
                is_zero(&buf),
                "block {} is not allocated anywhere in the chain but reads non-zero",
                off / vhd::BLOCK_SIZE
            );
        }
        out.push((off, buf));
    }
    // Past the end is an error, not a panic or a short read.
    let mut one = [0u8; 1];
    assert!(reader.read_at(size, &mut one).is_err());
    assert!(reader.read_at(u64::MAX, &mut one).is_err());
    out
}

/// The `vhd` target: write the files, then `inspect` and `check` each, open the chain of
/// `0.vhd`, read samples of the merged view; for small disks also grow a copy and flatten the
/// chain, and check what those wrote.
pub fn run_vhd(data: &[u8]) -> Result<(), String> {
    let dir = scratch();
    let root = dir.path();
    let mut paths = Vec::new();
    for (i, bytes) in split_files(data).into_iter().enumerate() {
        let p = root.join(format!("{i}.vhd"));
        fs::write(&p, bytes).expect("writing a fuzz input file");
        paths.push(p);
    }
    let mut checked_ok = Vec::new();
    for p in &paths {
        let inspected = vhd::inspect(p);
        let checked = vhd::check(p);
        match (&inspected, &checked) {
            (Err(e), Ok(_)) => panic!("check passed but inspect failed: {e}"),
            (Ok(a), Ok(b)) => assert_eq!(a, b, "inspect and check disagree on {}", p.display()),
            _ => {}
        }
        if let Err(e) = &inspected {
            clean_vhd_error(e, root);
        }
        if let Err(e) = &checked {
            clean_vhd_error(e, root);
        }
        if let Ok(info) = &inspected {
            assert!(info.virtual_size > 0 && info.virtual_size <= vhd::MAX_VIRTUAL_SIZE);
            assert_eq!(info.file_size, fs::metadata(p).unwrap().len());
            assert_eq!(
                info.parent.is_some(),
                info.disk_type == DiskType::Differencing
            );
        }
        checked_ok.push(checked.is_ok());
    }
    let leaf = &paths[0];
    let result = match Chain::open(leaf) {
        Ok(chain) => {
            let files = chain.files();
            assert!(!files.is_empty() && files.len() <= vhd::MAX_CHAIN_DEPTH);
            assert_eq!(&files[0].0, leaf);
            for (p, info) in files {
                // Parents only ever come from the leaf's own directory, as plain files.
                assert_eq!(
                    p.parent(),
                    Some(root),
                    "chain left its directory: {}",
                    p.display()
                );
                assert!(fs::symlink_metadata(p).unwrap().is_file());
                assert_eq!(info, &vhd::inspect(p).expect("a chain file inspects"));
            }
            for pair in files.windows(2) {
                let link = pair[0]
                    .1
                    .parent
                    .as_ref()
                    .expect("a child has a parent link");
                assert_eq!(link.uuid, pair[1].1.uuid);
            }
            let size = chain.virtual_size();
            let fixed_leaf = files.len() == 1 && files[0].1.disk_type == DiskType::Fixed;
            let mut reader = ChainReader::new(chain);
            let samples = sample_reads(&mut reader);
            if fixed_leaf {
                let raw = fs::read(leaf).unwrap();
                for (off, buf) in &samples {
                    let at = *off as usize;
                    assert_eq!(
                        &raw[at..at + buf.len()],
                        &buf[..],
                        "fixed disk data at {off}"
                    );
                }
            }
            // A sequential read through the Read trait agrees with read_at.
            let mut head = vec![0u8; size.min(8192) as usize];
            reader
                .read_exact(&mut head)
                .expect("reading the head of an opened chain");
            assert_eq!(
                &head[..head.len().min(4096)],
                &samples[0].1[..head.len().min(4096)]
            );
            if size <= DEEP_LIMIT {
                deep_vhd(root, leaf, size, &samples, checked_ok[0]);
            }
            Ok(())
        }
        Err(e) => {
            clean_vhd_error(&e, root);
            Err(e.to_string())
        }
    };
    drop(dir);
    result
}

/// Flatten the chain into a new VHD (what a snapshot does) and grow a copy of the leaf; what
/// they produce must be valid and read the same.
fn deep_vhd(root: &Path, leaf: &Path, size: u64, samples: &[(u64, Vec<u8>)], leaf_checked: bool) {
    let flat = root.join("flat.vhd");
    let uuid = uuid::Uuid::from_u128(0x0f0f);
    match vhd::copy_flattened(leaf, &flat, uuid, None, &mut |_, _| true) {
        Ok(info) => {
            let checked = vhd::check(&flat).expect("a flattened copy passes check");
            assert_eq!(info, checked);
            assert_eq!(info.virtual_size, vhd::round_up_size(size));
            let mut copy = ChainReader::open(&flat).expect("a flattened copy opens");
            for (off, buf) in samples {
                let mut again = vec![0u8; buf.len()];
                copy.read_at(*off, &mut again).unwrap();
                assert_eq!(&again, buf, "flattened copy differs at {off}");
            }
            fs::remove_file(&flat).unwrap();
        }
        Err(e) => clean_vhd_error(&e, root),
    }
    let grown = root.join("grown.vhd");
    fs::copy(leaf, &grown).unwrap();
    let target = size + vhd::BLOCK_SIZE;
    match vhd::grow(&grown, target) {
        Ok(info) => {
            assert_eq!(info.virtual_size, vhd::round_up_size(target));
            let again = vhd::inspect(&grown).expect("a grown VHD inspects");
            assert_eq!(again.virtual_size, info.virtual_size);
            if leaf_checked && info.parent.is_none() {
                vhd::check(&grown).expect("growing a VHD that passed check keeps it valid");
            }
        }
        Err(e) => clean_vhd_error(&e, root),
    }
    let _ = fs::remove_file(&grown);
}

/// The bytes the `vhd_tgz` target feeds to the importer: gzip input as is, anything else
/// (a tar stream) wrapped into gzip first, stored, so that the fuzzer works on the tar level.
pub fn tgz_stream(data: &[u8]) -> Vec<u8> {
    if data.starts_with(&[0x1f, 0x8b]) {
        return data.to_vec();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// Names in a directory, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// The `vhd_tgz` target: the real streaming import into `<tmp>/staging` with small limits.
/// Nothing may appear outside the staging directory, nothing but regular files inside it, and
/// an imported chain must open and check from its final names.
pub fn run_tgz(data: &[u8]) -> Result<(), String> {
    let dir = scratch();
    let root = dir.path().to_path_buf();
    let staging = root.join("staging");
    fs::create_dir(&staging).unwrap();
    let stream = tgz_stream(data);
    let leaf_uuid = uuid::Uuid::from_u128(0x1eaf);
    let limits = tgz_limits();
    let result = import_tgz(&mut &stream[..], &staging, leaf_uuid, &limits, &mut |_| {
        true
    });
    assert_eq!(
        names(&root),
        ["staging"],
        "the import wrote outside its staging directory"
    );
    for name in names(&staging) {
        let meta = fs::symlink_metadata(staging.join(&name)).unwrap();
        assert!(meta.is_file(), "staging holds a non-regular file {name:?}");
    }
    let out = match result {
        Ok(chain) => {
            assert_eq!(chain.leaf, staging.join(format!("{leaf_uuid}.vhd")));
            assert!(!chain.files.is_empty() && chain.files.len() <= limits.max_members);
            assert!(chain.virtual_size <= limits.max_virtual_size);
            for (i, (p, info)) in chain.files.iter().enumerate() {
                assert_eq!(p.parent(), Some(staging.as_path()));
                assert_eq!(
                    p.file_name().unwrap().to_string_lossy(),
                    format!("{}.vhd", info.uuid)
                );
                assert_eq!(info.hidden, i != 0, "hidden flags");
                assert_eq!(info, &vhd::check(p).expect("an imported file passes check"));
            }
            let opened = Chain::open(&chain.leaf).expect("an imported chain opens");
            let got: Vec<&PathBuf> = opened.files().iter().map(|(p, _)| p).collect();
            let want: Vec<&PathBuf> = chain.files.iter().map(|(p, _)| p).collect();
            assert_eq!(got, want);
            assert_eq!(
                names(&staging).len(),
                chain.files.len(),
                "stray files after import"
            );
            Ok(())
        }
        Err(e) => {
            let text = e.to_string();
            assert!(!text.is_empty());
            assert!(
                e.is_refusal(),
                "a hostile archive must be refused, not fail as {e:?}"
            );
            assert!(!matches!(e, ImageError::Cancelled));
            Err(text)
        }
    };
    drop(dir);
    out
}

/// Decode every record type from `value`, as the client does with `get_record` results, and
/// from each value of a struct (`get_all_records`).
fn records(value: &Value) {
    fn each(v: &Value) {
        let f = match xenapinfs::xenapi::records::Fields::new("fuzz", v) {
            Ok(f) => f,
            Err(e) => {
                assert!(!e.is_empty());
                return;
            }
        };
        let _ = SessionRecord::from_record(&f);
        let _ = PoolRecord::from_record(&f);
        let _ = HostRecord::from_record(&f);
        let _ = VmRecord::from_record(&f);
        let _ = SrRecord::from_record(&f);
        let _ = PbdRecord::from_record(&f);
        let _ = VdiRecord::from_record(&f);
        let _ = VbdRecord::from_record(&f);
        let _ = TaskRecord::from_record(&f);
    }
    each(value);
    if let Some(map) = value.as_struct() {
        for v in map.values().take(16) {
            each(v);
        }
    }
    let _ = codec::value_to_text(value);
}

/// The decoder runs on tokio worker threads in the daemon (2 MiB stacks): decode there too,
/// so that unbounded recursion shows as a crash here.
const DECODE_STACK: usize = 2 * MIB as usize;

/// The `xenapi_response` target: `decode_response` on the body, the typed records on a
/// success, and `decode_task_result` on the body as text.
pub fn run_xenapi(data: &[u8]) -> Result<(), String> {
    let data = data.to_vec();
    std::thread::Builder::new()
        .stack_size(DECODE_STACK)
        .spawn(move || {
            let out = match codec::decode_response(&data) {
                Ok(Decoded::Success(value)) => {
                    records(&value);
                    Ok(())
                }
                Ok(Decoded::Failure(failure)) => {
                    assert!(!failure.code.is_empty());
                    let _ = failure.to_string();
                    Ok(())
                }
                Err(reason) => {
                    assert!(!reason.is_empty());
                    Err(reason)
                }
            };
            if let Ok(text) = std::str::from_utf8(&data) {
                match codec::decode_task_result(text) {
                    Ok(value) => records(&value),
                    Err(reason) => assert!(!reason.is_empty()),
                }
            }
            out
        })
        .expect("spawning the decoder thread")
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// The request kinds of the `api_request` target; the first input byte picks one.
pub const API_KINDS: [&str; 9] = [
    "create",         // POST /v1/volumes
    "copy",           // snapshot, clone, from-snapshot
    "extend",         // POST .../extend
    "import-url",     // POST .../import with a JSON body (UrlSpec)
    "export-url",     // POST .../export
    "import-query",   // ?format=..&size_gb=.. of the import routes
    "export-query",   // ?format=.. of GET .../export
    "volume-id",      // the {sr}/{vdi} path of every volume route
    "volume-id-json", // a volume id as it comes back in JSON (Deleted, jobs)
];

/// Deserialize a JSON body the way the handlers' `Json` extractor does; it must agree with
/// serde_json.
fn json<T: serde::de::DeserializeOwned + serde::Serialize>(body: &[u8]) -> Result<T, String> {
    let via_axum = axum::Json::<T>::from_bytes(body);
    let via_serde = serde_json::from_slice::<T>(body);
    assert_eq!(
        via_axum.is_ok(),
        via_serde.is_ok(),
        "axum and serde_json disagree"
    );
    match via_axum {
        Ok(axum::Json(v)) => {
            // What was accepted serialises and reads back to the same value.
            let text = serde_json::to_vec(&v).expect("a request serialises");
            let back: T = serde_json::from_slice(&text).expect("a serialised request reads back");
            assert_eq!(
                serde_json::to_value(&back).unwrap(),
                serde_json::to_value(&v).unwrap()
            );
            Ok(v)
        }
        Err(e) => {
            let text = e.body_text();
            assert!(!text.is_empty());
            Err(text)
        }
    }
}

/// The handlers' `optional()`: an empty body means all defaults.
fn optional_json<T: serde::de::DeserializeOwned + serde::Serialize + Default>(
    body: &[u8],
) -> Result<T, String> {
    if body.is_empty() {
        return Ok(T::default());
    }
    json(body)
}

fn query<T: serde::de::DeserializeOwned>(q: &[u8]) -> Result<T, String> {
    let Ok(q) = std::str::from_utf8(q) else {
        return Err("not UTF-8".into());
    };
    let Ok(uri) = format!("/v1/volumes/import?{q}").parse::<axum::http::Uri>() else {
        return Err("not a URI".into());
    };
    match axum::extract::Query::<T>::try_from_uri(&uri) {
        Ok(axum::extract::Query(v)) => Ok(v),
        Err(e) => {
            let text = e.body_text();
            assert!(!text.is_empty());
            Err(text)
        }
    }
}

/// A parsed volume id names exactly two UUIDs: printed, it is the canonical form, no path.
fn volume_id(text: &str) -> Result<VolumeId, String> {
    match VolumeId::parse(text) {
        Ok(id) => {
            let shown = id.to_string();
            assert_eq!(shown.len(), 73);
            assert_eq!(shown.matches('/').count(), 1);
            assert!(!shown.contains(".."));
            assert!(
                shown
                    .bytes()
                    .all(|b| b == b'/' || b == b'-' || b.is_ascii_hexdigit())
            );
            assert_eq!(VolumeId::parse(&shown), Ok(id));
            assert!(
                text.eq_ignore_ascii_case(&shown),
                "{text:?} parsed as {shown}"
            );
            Ok(id)
        }
        Err(e) => {
            assert!(!e.is_empty());
            Err(e)
        }
    }
}

fn url(spec: &UrlSpec) -> Result<(), String> {
    match spec.validate() {
        Ok((url, headers)) => {
            assert!(matches!(url.scheme(), "http" | "https"));
            assert!(headers.len() <= spec.headers.len());
            Ok(())
        }
        Err(e) => {
            assert!(!e.is_empty());
            // A refused header value may be a token: it is never echoed.
            for h in &spec.headers {
                if let Some((_, value)) = h.split_once(':') {
                    let value = value.trim();
                    let elsewhere = spec.url.contains(value)
                        || spec
                            .headers
                            .iter()
                            .any(|h| h.split(':').next().unwrap_or(h).contains(value));
                    if value.len() >= 8 && !elsewhere {
                        assert!(!e.contains(value), "header value echoed in {e:?}");
                    }
                }
            }
            Err(e)
        }
    }
}

/// The `api_request` target: the first byte picks a request kind from [`API_KINDS`], the rest
/// is its body (or query string, or path), run through the extractor and the checks the
/// handler runs before it does any work.
pub fn run_api(data: &[u8]) -> Result<(), String> {
    let Some((&kind, body)) = data.split_first() else {
        return Ok(());
    };
    match API_KINDS[kind as usize % API_KINDS.len()] {
        "create" => json::<CreateRequest>(body).map(drop),
        "copy" => {
            let request = optional_json::<CopyRequest>(body)?;
            // start_copy: size_gb only for from-snapshot.
            if request.size_gb.is_some() {
                Err("size_gb is only accepted by from-snapshot".into())
            } else {
                Ok(())
            }
        }
        "extend" => json::<ExtendRequest>(body).map(drop),
        "import-url" => url(&json::<UrlSpec>(body)?),
        "export-url" => {
            let request = json::<ExportRequest>(body)?;
            url(&UrlSpec {
                url: request.url,
                headers: request.headers,
            })
        }
        "import-query" => {
            let q = query::<ImportQuery>(body)?;
            // import into an existing volume: no new-volume fields.
            if q.size_gb.is_some() || !q.name.is_empty() || !q.description.is_empty() {
                Err("size_gb, name and description are for new volumes".into())
            } else {
                Ok(())
            }
        }
        "export-query" => query::<ExportQuery>(body).map(drop),
        "volume-id" => {
            let text = String::from_utf8_lossy(body);
            // The router splits {sr}/{vdi} at '/', the handler joins them again.
            let (sr, vdi) = text.split_once('/').unwrap_or((&text, ""));
            volume_id(&format!("{sr}/{vdi}")).map(drop)
        }
        "volume-id-json" => match serde_json::from_slice::<VolumeId>(body) {
            Ok(id) => {
                let text: String = serde_json::from_slice(body).expect("a volume id is a string");
                assert_eq!(volume_id(&text), Ok(id));
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        },
        _ => unreachable!(),
    }
}
