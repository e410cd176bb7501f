#!/bin/sh
# The init of a sysd container (tests/it/sysd.rs): runs as PID 1 of the new pid namespace,
# inside the new private mount namespace, and ends by exec'ing systemd.
# $1 = the container's base dir (ovl/, root/, share/ in it); $2 = the host path of the pty that
# becomes /dev/console.
set -eu
BASE=$1 CONSOLE=$2
R=$BASE/root
mount --make-rprivate /
# The root filesystem: the host's / as the read-only lower layer, a tmpfs as the upper layer.
mount -t tmpfs -o mode=0755,size=4g sysd-upper "$BASE/ovl"
mkdir -p "$BASE/ovl/upper" "$BASE/ovl/work"
mount -t overlay sysd-root -o "lowerdir=/,upperdir=$BASE/ovl/upper,workdir=$BASE/ovl/work" "$R"
# /proc fresh; /proc/sys and /proc/sysrq-trigger read-only: host kernel settings are global.
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
for p in sys sysrq-trigger; do
    [ -e "$R/proc/$p" ] || continue
    mount --bind "$R/proc/$p" "$R/proc/$p"
    mount -o remount,bind,ro "$R/proc/$p"
done
# /sys read-only (no udev here); cgroup2 of the new cgroup namespace on /sys/fs/cgroup.
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
# /dev: the basic nodes, a private devpts, /dev/shm, and the console (the harness's pty: both
# ends stay open, or systemd's console writes fail with EIO).
mount -t tmpfs -o mode=0755,nosuid,size=4m sysd-dev "$R/dev"
mknod -m 666 "$R/dev/null" c 1 3
mknod -m 666 "$R/dev/zero" c 1 5
mknod -m 666 "$R/dev/full" c 1 7
mknod -m 666 "$R/dev/random" c 1 8
mknod -m 666 "$R/dev/urandom" c 1 9
mknod -m 666 "$R/dev/tty" c 5 0
mkdir -m 0755 "$R/dev/pts" "$R/dev/net"
mkdir -m 1777 "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev,size=64m shm "$R/dev/shm"
touch "$R/dev/console"
mount --bind "$CONSOLE" "$R/dev/console"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
# The staging dir (systemd-tmpfiles empties /tmp at boot: never stage there).
mkdir -p "$R/mnt/host"
mount --bind "$BASE/share" "$R/mnt/host"
# Mask what the host has enabled (in the upper layer only): every unit linked from a .wants or
# .requires dir, every SysV rc script without a native unit, and the console getty.
for l in "$R"/etc/systemd/system/*.wants/* "$R"/etc/systemd/system/*.requires/*; do
    [ -L "$l" ] || continue
    ln -sfn /dev/null "$R/etc/systemd/system/${l##*/}"
done
for f in "$R"/etc/rc[2-5].d/S*; do
    [ -e "$f" ] || continue
    u=${f##*/S??}.service
    [ -e "$R/lib/systemd/system/$u" ] || [ -e "$R/etc/systemd/system/$u" ] ||
        ln -sfn /dev/null "$R/etc/systemd/system/$u"
done
ln -sfn /dev/null "$R/etc/systemd/system/console-getty.service"
# The overlay becomes the namespace's root (nsenter lands there too).
mkdir -p "$R/.oldroot"
cd "$R"
pivot_root . .oldroot
cd /
umount -l /.oldroot
rmdir /.oldroot
echo socketd-it >/etc/hostname
exec setpriv --bounding-set -sys_module,-sys_time,-sys_rawio,-syslog,-wake_alarm,-block_suspend,-mac_admin,-mac_override,-sys_pacct \
    env -i container=unshare TERM=vt220 PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --system --unit=multi-user.target --show-status=no --log-color=no
