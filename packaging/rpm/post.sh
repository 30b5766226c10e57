# %post ($1 = 1 on first install, 2 or more on upgrade). What %tmpfiles_create and
# %systemd_post expand to: create the runtime and state directories; on first install,
# enable the units or not as the distribution's preset policy says.
systemd-tmpfiles --create /usr/lib/tmpfiles.d/xenapinfs.conf >/dev/null 2>&1 || :
if [ "$1" -eq 1 ]; then
    if [ -x /usr/lib/systemd/systemd-update-helper ]; then
        /usr/lib/systemd/systemd-update-helper install-system-units xenapinfs.socket xenapinfs.service || :
    else
        systemctl --no-reload preset xenapinfs.socket xenapinfs.service >/dev/null 2>&1 || :
    fi
fi
