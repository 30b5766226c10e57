"""The simulator driven by the official XenAPI Python SDK (PyPI package "XenAPI").

Run: pip install -r tests/python/requirements.txt; cargo build --bin xenapinfs-sim;
     python3 -m pytest tests/python   (XENAPINFS_SIM overrides the simulator binary)

Each test starts its own simulator in a fresh temporary directory and stops it with SIGTERM,
checking that it exits 0 and leaves no device file behind.
"""

import os
import pathlib
import signal
import ssl
import subprocess
import xmlrpc.client

import pytest
import XenAPI

REPO = pathlib.Path(__file__).resolve().parents[2]
SIM = os.environ.get("XENAPINFS_SIM", str(REPO / "target" / "debug" / "xenapinfs-sim"))
PASSWORD = "sdk-secret"
VM_UUID = "3f2a9c1e-5b7d-4e8f-a1b2-c3d4e5f60718"
NFS = {"server": "nfs.example", "serverpath": "/volumes"}
MIB = 1 << 20


class Simulator:
    def __init__(self, tmp_path, *extra):
        self.export = tmp_path / "export"
        self.dev_dir = tmp_path / "dev"
        self.export.mkdir()
        self.dev_dir.mkdir()
        self.ca_file = tmp_path / "ca.pem"
        self.proc = subprocess.Popen(
            [SIM, "--listen", "127.0.0.1:0", "--export", str(self.export),
             "--dev-dir", str(self.dev_dir), "--password", PASSWORD,
             "--vm-uuid", VM_UUID, "--auth-failure-delay-ms", "0",
             "--tls-ca-out", str(self.ca_file), *extra],
            stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        assert self.url.startswith("http"), self.url
        self.slave_url = self.proc.stdout.readline().strip() if "--pool-slave" in extra else None

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=30) == 0
        assert os.listdir(self.dev_dir) == []


@pytest.fixture
def start_sim(tmp_path_factory):
    started = []

    def start(*extra):
        sim = Simulator(tmp_path_factory.mktemp("sim"), *extra)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


def login(url, **kwargs):
    session = XenAPI.Session(url, **kwargs)
    session.xenapi.login_with_password("root", PASSWORD, "2.21", "sdk-conformance")
    return session


def failure_of(call, *args):
    with pytest.raises(XenAPI.Failure) as caught:
        call(*args)
    return caught.value.details


def test_volume_lifecycle_through_the_sdk(start_sim, tmp_path):
    sim = start_sim()
    session = login(sim.url)
    x = session.xenapi
    host = x.pool.get_master(x.pool.get_all()[0])
    assert x.host.get_address(host) == "127.0.0.1"

    sr = x.SR.create(host, NFS, "0", "sdk volume", "", "nfs", "user", True, {})
    sr_uuid = x.SR.get_uuid(sr)
    assert (sim.export / sr_uuid).is_dir()
    assert [x.PBD.get_currently_attached(p) for p in x.SR.get_PBDs(sr)] == [True]

    vdi = x.VDI.create({"SR": sr, "virtual_size": str(10 * MIB + 1), "type": "user",
                        "sharable": False, "read_only": False, "other_config": {"k": "v"},
                        "name_label": "sdk disk"})
    vdi_uuid = x.VDI.get_uuid(vdi)
    assert x.VDI.get_virtual_size(vdi) == str(12 * MIB)  # int64 as a string, rounded to 2 MiB
    vhd = sim.export / sr_uuid / f"{vdi_uuid}.vhd"
    assert vhd.is_file()

    # Forget the SR and bring it back the way the agent does.
    for pbd in x.SR.get_PBDs(sr):
        x.PBD.unplug(pbd)
    x.SR.forget(sr)
    assert failure_of(x.VDI.get_record, vdi)[0] == "HANDLE_INVALID"
    assert vhd.is_file()
    sr = x.SR.introduce(sr_uuid, "sdk volume", "", "nfs", "user", True, {})
    assert failure_of(x.SR.introduce, sr_uuid, "again", "", "nfs", "user", True, {}) == [
        "SR_UUID_EXISTS", sr_uuid]
    pbd = x.PBD.create({"host": host, "SR": sr, "device_config": NFS, "other_config": {}})
    assert failure_of(x.PBD.create, {"host": host, "SR": sr, "device_config": NFS})[0] == "PBD_EXISTS"
    x.PBD.plug(pbd)
    x.SR.scan(sr)
    vdi = x.VDI.get_by_uuid(vdi_uuid)
    assert x.VDI.get_SR(vdi) == sr
    assert x.VDI.get_virtual_size(vdi) == str(12 * MIB)
    assert x.SR.get_virtual_allocation(sr) == str(12 * MIB)
    assert x.VDI.get_location(vdi) == vdi_uuid

    vm = x.VM.get_by_uuid(VM_UUID)
    assert x.VM.get_resident_on(vm) == host
    vbd = x.VBD.create({"VM": vm, "VDI": vdi, "userdevice": "autodetect", "bootable": False,
                        "mode": "RW", "type": "Disk", "unpluggable": True, "empty": False,
                        "other_config": {}, "qos_algorithm_type": "",
                        "qos_algorithm_params": {}})
    assert x.VBD.get_userdevice(vbd) == "1"
    assert x.VBD.get_device(vbd) == ""
    x.VBD.plug(vbd)
    assert failure_of(x.VBD.plug, vbd) == ["DEVICE_ALREADY_ATTACHED", vbd]
    device = x.VBD.get_device(vbd)
    assert device == "xvdb"
    node = sim.dev_dir / device
    assert node.stat().st_size == 12 * MIB

    data = os.urandom(3 * MIB + 4096)
    fd = os.open(node, os.O_RDWR)
    try:
        os.pwrite(fd, data, 5 * MIB - 4096)
        os.pwrite(fd, b"end of disk", 12 * MIB - 11)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert failure_of(x.VDI.destroy, vdi) == ["VDI_IN_USE", vdi, "destroy"]
    assert failure_of(x.PBD.unplug, pbd) == ["VDI_IN_USE", vdi]
    x.VBD.unplug(vbd)
    assert failure_of(x.VBD.unplug, vbd) == ["DEVICE_ALREADY_DETACHED", vbd]
    assert not node.exists()

    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(vhd), str(raw)], check=True)
    content = raw.read_bytes()
    assert len(content) == 12 * MIB
    assert content[5 * MIB - 4096:8 * MIB] == data
    assert content[-11:] == b"end of disk"
    assert content[:5 * MIB - 4096] == bytes(5 * MIB - 4096)

    x.VBD.destroy(vbd)
    x.VDI.destroy(vdi)
    assert not vhd.exists()
    assert failure_of(x.SR.destroy, sr) == ["SR_HAS_PBD", sr]
    x.PBD.unplug(pbd)
    x.SR.destroy(sr)

    assert sr not in x.SR.get_all()
    assert all(r["SR"] != sr for r in x.PBD.get_all_records().values())
    assert all(r["VDI"] != vdi for r in x.VBD.get_all_records().values())
    assert all(r["uuid"] != vdi_uuid for r in x.VDI.get_all_records().values())
    assert failure_of(x.VDI.get_by_uuid, vdi_uuid) == ["UUID_INVALID", "VDI", vdi_uuid]
    assert os.listdir(sim.export) == []
    session.xenapi.session.logout()


def test_errors_reach_the_sdk_as_failures(start_sim):
    sim = start_sim()
    session = XenAPI.Session(sim.url)
    details = failure_of(session.xenapi.login_with_password, "root", "wrong")
    assert details[0] == "SESSION_AUTHENTICATION_FAILED"
    assert "wrong" not in " ".join(details)
    x = login(sim.url).xenapi
    host = x.pool.get_master(x.pool.get_all()[0])
    assert failure_of(x.SR.create, host, {"server": "nfs.example"}, "0", "v", "", "nfs", "user",
                      True, {})[0] == "SR_BACKEND_FAILURE_101"
    assert failure_of(x.SR.create, host, {"serverpath": "/volumes"}, "0", "v", "", "nfs", "user",
                      True, {})[0] == "SR_BACKEND_FAILURE_102"
    details = failure_of(x.SR.create, host, {"server": "other", "serverpath": "/volumes"}, "0",
                         "v", "", "nfs", "user", True, {})
    assert details[0] == "SR_BACKEND_FAILURE_73" and details[1] == "" and len(details) == 4
    assert failure_of(x.SR.create, host, NFS, "0", "v", "", "lvm", "user", True, {}) == [
        "SR_UNKNOWN_DRIVER", "lvm"]
    assert failure_of(x.VDI.get_record, "OpaqueRef:nope") == ["HANDLE_INVALID", "VDI", "OpaqueRef:nope"]
    assert failure_of(x.VDI.frobnicate)[0] == "MESSAGE_METHOD_UNKNOWN"
    assert os.listdir(sim.export) == []


def test_tls_with_the_generated_ca(start_sim):
    sim = start_sim("--tls")
    assert sim.url.startswith("https://127.0.0.1:")
    context = ssl.create_default_context(cafile=str(sim.ca_file))
    session = login(sim.url, transport=xmlrpc.client.SafeTransport(context=context))
    assert len(session.xenapi.pool.get_all()) == 1
    session.xenapi.session.logout()

    untrusted = XenAPI.Session(sim.url)
    with pytest.raises(ssl.SSLError):
        untrusted.xenapi.login_with_password("root", PASSWORD)


def test_pool_supporter_answers_host_is_slave(start_sim):
    sim = start_sim("--pool-slave")
    master = sim.url.removeprefix("http://").rstrip("/")
    details = failure_of(XenAPI.Session(sim.slave_url).xenapi.login_with_password, "root", PASSWORD)
    assert details == ["HOST_IS_SLAVE", master]
    session = login(f"http://{details[1]}/")
    assert len(session.xenapi.host.get_all()) == 2
