# Starts the XenAPI simulator and xenapinfsd in a temporary directory, for the scripts in
# scripts/. Source it, then call `world_start`; everything is stopped and removed on exit.
# Sets: work, bin, url, XENAPINFS_SOCKET, call_log.

world_build() {
  local profile=${1:-release}
  if [ "$profile" = release ]; then
    cargo build --release --bins --quiet
    bin=target/release
  else
    cargo build --bins --quiet
    bin=target/debug
  fi
}

world_stop() {
  [ -n "${daemon_pid:-}" ] && kill -TERM "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null || true
  [ -n "${sim_pid:-}" ] && kill -TERM "$sim_pid" 2>/dev/null && wait "$sim_pid" 2>/dev/null || true
  daemon_pid="" sim_pid=""
  [ -n "${work:-}" ] && rm -rf "$work"
}

world_start() {
  work=$(mktemp -d -t xenapinfs.XXXXXX)
  trap world_stop EXIT
  mkdir -p "$work/export" "$work/dev" "$work/state"
  local vm_uuid password
  vm_uuid=$(cat /proc/sys/kernel/random/uuid)
  echo "$vm_uuid" > "$work/hypervisor-uuid"
  password=pw-$RANDOM$RANDOM
  call_log="$work/calls.jsonl"

  "$bin/xenapinfs-sim" --listen 127.0.0.1:0 --export "$work/export" --dev-dir "$work/dev" \
    --password "$password" --vm-uuid "$vm_uuid" --call-log "$call_log" \
    > "$work/sim.out" 2> "$work/sim.err" &
  sim_pid=$!
  for _ in $(seq 200); do [ -s "$work/sim.out" ] && break; sleep 0.05; done
  url=$(head -n1 "$work/sim.out")
  if [ -z "$url" ]; then cat "$work/sim.err" >&2; echo "the simulator did not start" >&2; exit 1; fi

  printf '%s' "$password" > "$work/password"
  cat > "$work/xenapinfs.toml" <<CONF
xenapi_connection_url = "$url"
xenapi_connection_password_file = "$work/password"
xenapi_nfs_server = "nfs.example"
xenapi_nfs_serverpath = "/volumes"
xenapi_sr_base_path = "$work/export"
# A plain directory stands in for the NFS mount.
share_mount_check = false
socket = "$work/xenapinfs.sock"
state_dir = "$work/state"
hypervisor_uuid_path = "$work/hypervisor-uuid"
device_dir = "$work/dev"
CONF
  export XENAPINFS_SOCKET="$work/xenapinfs.sock"
  world_start_daemon
}

# Starts xenapinfsd on the world's configuration (again, after a crash) and waits until it
# serves, which is after it has recovered what the last stop interrupted.
world_start_daemon() {
  rm -f "$XENAPINFS_SOCKET"
  "$bin/xenapinfsd" --config "$work/xenapinfs.toml" 2>> "$work/daemon.log" &
  daemon_pid=$!
  for _ in $(seq 200); do
    if "$bin/xenapinfs" status --json 2>/dev/null | grep -q '"mode": "\(local\|remote\)"'; then return 0; fi
    sleep 0.05
  done
  cat "$work/daemon.log" >&2
  echo "xenapinfsd did not reach the simulator" >&2
  exit 1
}

# Calls one of the simulator's own control methods: sim_control set_delay VDI.copy 4000
sim_control() {
  python3 -c 'import sys, xmlrpc.client
args = [int(a) if a.isdigit() else a for a in sys.argv[3:]]
getattr(xmlrpc.client.ServerProxy(sys.argv[1]).simulator, sys.argv[2])(*args)' "$url" "$@"
}

# Prints a field of the JSON document on stdin: json_field id
json_field() {
  python3 -c 'import json,sys; v=json.load(sys.stdin)
for k in sys.argv[1].split("."): v=v[k]
print(v)' "$1"
}
