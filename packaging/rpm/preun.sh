# %preun ($1 = 0 on erase, 1 or more on upgrade). What %systemd_preun expands to: on erase,
# disable and stop the units.
if [ "$1" -eq 0 ]; then
    if [ -x /usr/lib/systemd/systemd-update-helper ]; then
        /usr/lib/systemd/systemd-update-helper remove-system-units xenapinfs.service xenapinfs.socket || :
    else
        systemctl --no-reload disable --now xenapinfs.service xenapinfs.socket >/dev/null 2>&1 || :
    fi
fi
