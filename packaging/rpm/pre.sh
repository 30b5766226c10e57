# %pre: create the xenapinfs group before the files are unpacked, so that
# /etc/xenapinfs/xenapinfs.toml gets its group (the same entry as /usr/lib/sysusers.d/xenapinfs.conf).
if command -v systemd-sysusers >/dev/null 2>&1; then
    echo 'g xenapinfs - -' | systemd-sysusers --replace=/usr/lib/sysusers.d/xenapinfs.conf - || :
fi
getent group xenapinfs >/dev/null 2>&1 || groupadd --system xenapinfs || :
