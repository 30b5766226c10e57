# %postun ($1 = 0 on erase, 1 or more on upgrade). What %systemd_postun_with_restart expands
# to: after an upgrade, restart the agent if it is running (newer systemd defers the restart
# to the end of the transaction).
if [ "$1" -ge 1 ]; then
    if [ -x /usr/lib/systemd/systemd-update-helper ]; then
        /usr/lib/systemd/systemd-update-helper mark-restart-system-units xenapinfs.service || :
    else
        systemctl try-restart xenapinfs.service >/dev/null 2>&1 || :
    fi
fi
