//! Images in and out of volumes through the real CLI, daemon and simulator: every format, both
//! modes, round trips, URLs, stdin, and images that must be refused without leaving anything.

mod support;

use support::{make_image, text};

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use support::{
    World, assert_same_disk, assert_same_image, image_server, patterned_raw, qemu_img,
    staging_leftovers,
};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn remote() -> &'static str {
    "mode = \"remote\"\n"
}

/// Asserts nothing is left behind: no staging on the share, nothing introduced in xapi.
async fn assert_clean(world: &World) {
    assert_eq!(staging_leftovers(&world.sim.export), Vec::<PathBuf>::new());
    world.assert_xapi_clean().await;
}

async fn import_each_qemu_format(mode_config: &str) {
    let world = World::start_with(mode_config).await;
    let dir = world.sim.dir.path();
    let raw = dir.join("disk.raw");
    patterned_raw(&raw, 64 * MIB);
    for format in ["qcow2", "vmdk", "vdi", "vhdx", "vhd", "raw"] {
        let image = dir.join(format!("image.{format}"));
        make_image(&raw, format, &image);
        let volume = world.ok(&[
            "volume",
            "create",
            "--size",
            "1",
            "--name",
            format,
            "--image",
            text(&image),
        ]);
        assert_eq!(
            volume["size_bytes"], GIB,
            "{format}: the volume keeps the size asked for"
        );
        assert_same_disk(&raw, &world.vhd(volume["id"].as_str().unwrap()), format);
    }
    assert_clean(&world).await;
}

#[tokio::test]
async fn every_qemu_format_imports_in_local_mode() {
    import_each_qemu_format("").await;
}

#[tokio::test]
async fn every_qemu_format_imports_in_remote_mode() {
    import_each_qemu_format(remote()).await;
}

#[tokio::test]
async fn a_volume_sized_from_its_image_and_a_declared_format() {
    let world = World::start().await;
    let dir = world.sim.dir.path();
    let raw = dir.join("disk.raw");
    patterned_raw(&raw, 64 * MIB);
    let image = dir.join("disk.qcow2");
    make_image(&raw, "qcow2", &image);
    qemu_img(&["resize", "-f", "qcow2", text(&image), "1536M"]);
    let volume = world.ok(&[
        "volume",
        "create",
        "--image",
        text(&image),
        "--image-format",
        "qcow2",
    ]);
    assert_eq!(
        volume["size_bytes"],
        2 * GIB,
        "1.5 GiB of image gives a 2 GiB volume"
    );
    assert_same_disk(
        &raw,
        &world.vhd(volume["id"].as_str().unwrap()),
        "sized from the image",
    );
    assert_clean(&world).await;
}

#[tokio::test]
async fn vhd_tgz_round_trip_and_reimport_in_both_modes() {
    for mode in ["", remote()] {
        let world = World::start_with(mode).await;
        let dir = world.sim.dir.path();
        let raw = dir.join("disk.raw");
        patterned_raw(&raw, 32 * MIB);
        let original = world.ok(&[
            "volume",
            "create",
            "--size",
            "1",
            "--image",
            text(&raw),
            "--image-format",
            "raw",
        ]);
        let id = original["id"].as_str().unwrap();

        let tgz = dir.join("disk.tgz");
        world.ok(&["volume", "export", id, text(&tgz), "--format", "vhd-tgz"]);
        let listing = Command::new("tar").arg("-tzf").arg(&tgz).output().unwrap();
        let names = String::from_utf8_lossy(&listing.stdout);
        assert_eq!(
            names.trim().trim_start_matches("./"),
            "0.vhd",
            "a one-VHD chain is 0.vhd"
        );

        let copy = world.ok(&["volume", "create", "--image", text(&tgz)]);
        assert_eq!(copy["size_bytes"], GIB);
        assert_same_disk(
            &raw,
            &world.vhd(copy["id"].as_str().unwrap()),
            "re-imported tarball",
        );

        // Overwriting an existing volume with it.
        let target = world.create(1, "target");
        world.ok(&[
            "volume",
            "import",
            &target,
            text(&tgz),
            "--image-format",
            "vhd-tgz",
        ]);
        assert_same_disk(&raw, &world.vhd(&target), "overwritten volume");
        assert_clean(&world).await;
    }
}

#[tokio::test]
async fn legacy_tarball_names_are_accepted() {
    let world = World::start().await;
    let dir = world.sim.dir.path();
    let raw = dir.join("disk.raw");
    patterned_raw(&raw, 16 * MIB);
    let work = dir.join("work");
    std::fs::create_dir(&work).unwrap();
    make_image(&raw, "vhd", &work.join("image.vhd"));
    let tgz = dir.join("legacy.tgz");
    let status = Command::new("tar")
        .arg("-czf")
        .arg(&tgz)
        .arg("-C")
        .arg(&work)
        .arg("image.vhd")
        .status()
        .unwrap();
    assert!(status.success());
    let volume = world.ok(&["volume", "create", "--size", "1", "--image", text(&tgz)]);
    assert_same_disk(
        &raw,
        &world.vhd(volume["id"].as_str().unwrap()),
        "legacy tarball",
    );
    assert_clean(&world).await;
}

#[tokio::test]
async fn exports_in_every_format_read_back_identically() {
    let world = World::start().await;
    let dir = world.sim.dir.path();
    let raw = dir.join("disk.raw");
    let content = patterned_raw(&raw, 32 * MIB);
    let volume = world.ok(&["volume", "create", "--size", "1", "--image", text(&raw)]);
    let id = volume["id"].as_str().unwrap();
    for (format, driver) in [
        ("qcow2", "qcow2"),
        ("vmdk", "vmdk"),
        ("raw", "raw"),
        ("vhd", "vpc"),
    ] {
        let out = dir.join(format!("out.{format}"));
        world.ok(&["volume", "export", id, text(&out), "--format", format]);
        assert_same_image(&raw, &out, driver, format);
    }
    let output = Command::new(env!("CARGO_BIN_EXE_xenapinfs"))
        .arg("--socket")
        .arg(&world.daemon.socket)
        .args(["volume", "export", id, "-", "--format", "raw"])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(
        output.stdout.len() as u64,
        GIB,
        "stdout gets the whole disk"
    );
    assert_eq!(&output.stdout[..content.len()], &content[..]);
    assert_clean(&world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn images_from_stdin_and_to_and_from_urls_with_headers() {
    let world = World::start().await;
    let dir = world.sim.dir.path();
    let raw = dir.join("disk.raw");
    patterned_raw(&raw, 16 * MIB);
    let qcow2 = dir.join("disk.qcow2");
    make_image(&raw, "qcow2", &qcow2);

    let mut child = Command::new(env!("CARGO_BIN_EXE_xenapinfs"))
        .arg("--socket")
        .arg(&world.daemon.socket)
        .args(["volume", "create", "--size", "1", "--image", "-", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(&qcow2).unwrap())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let volume: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let id = volume["id"].as_str().unwrap().to_string();
    assert_same_disk(&raw, &world.vhd(&id), "from stdin");

    let served = dir.join("served");
    std::fs::create_dir(&served).unwrap();
    std::fs::copy(&qcow2, served.join("img")).unwrap();
    let base = image_server(served.clone(), "s3cret").await;
    let url = format!("{base}img");
    let error = world.fails(&["volume", "create", "--size", "1", "--image", &url]);
    assert!(error.contains("401"), "{error}");
    let volume = world.ok(&[
        "volume",
        "create",
        "--size",
        "1",
        "--image",
        &url,
        "--header",
        "X-Auth-Token: s3cret",
    ]);
    assert_same_disk(
        &raw,
        &world.vhd(volume["id"].as_str().unwrap()),
        "from a URL",
    );

    let put = format!("{base}exported");
    world.ok(&[
        "volume",
        "export",
        &id,
        &put,
        "--format",
        "qcow2",
        "--header",
        "X-Auth-Token: s3cret",
    ]);
    assert_same_image(&raw, &served.join("exported"), "qcow2", "PUT to a URL");
    assert_clean(&world).await;
}

/// Refused images: the error names the problem, the volume keeps its content, nothing is left.
#[tokio::test]
async fn hostile_and_wrong_images_are_refused_without_a_trace() {
    let world = World::start().await;
    let dir = world.sim.dir.path();
    let raw = dir.join("disk.raw");
    patterned_raw(&raw, 16 * MIB);
    let target = world.ok(&["volume", "create", "--size", "1", "--image", text(&raw)]);
    let id = target["id"].as_str().unwrap().to_string();
    let volumes_before = world.ok(&["volume", "list"]);

    let secret = dir.join("secret");
    std::fs::write(&secret, b"host secret").unwrap();
    let backed = dir.join("backed.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        text(&secret),
        "-F",
        "raw",
        text(&backed),
    ]);
    let big = dir.join("big.qcow2");
    qemu_img(&["create", "-f", "qcow2", text(&big), "3G"]);
    let vmdk = dir.join("disk.vmdk");
    make_image(&raw, "vmdk", &vmdk);
    let truncated = dir.join("truncated.tgz");
    let whole = dir.join("whole.tgz");
    world.ok(&["volume", "export", &id, text(&whole), "--format", "vhd-tgz"]);
    let bytes = std::fs::read(&whole).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let not_gzip = dir.join("garbage.tgz");
    std::fs::write(
        &not_gzip,
        [0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3, 4, 5],
    )
    .unwrap();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![text(&backed)], "backing file"),
        (vec![text(&big)], "more than"),
        (
            vec![text(&vmdk), "--image-format", "qcow2"],
            "declared as qcow2 but the content is vmdk",
        ),
        (vec![text(&truncated)], "gzip"),
        (vec![text(&not_gzip)], "gzip"),
        (
            vec![text(&raw), "--image-format", "vhd-tgz"],
            "declared as vhd-tgz",
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec!["volume", "import", id.as_str()];
        all.extend(args.iter());
        let error = world.fails(&all);
        assert!(
            error.to_lowercase().contains(&expected.to_lowercase()),
            "{args:?}: expected {expected:?} in {error}"
        );
        assert_same_disk(
            &raw,
            &world.vhd(&id),
            "the refused import must leave the volume unchanged",
        );
        assert_eq!(
            world.ok(&["volume", "list"]),
            volumes_before,
            "{args:?}: no volume may appear or change"
        );
        assert_clean(&world).await;
    }
    let error = world.fails(&["volume", "create", "--image", text(&backed)]);
    assert!(error.contains("backing file"), "{error}");
    assert_eq!(
        world.ok(&["volume", "list"]),
        volumes_before,
        "a refused image creates no volume"
    );
    assert_clean(&world).await;
}
