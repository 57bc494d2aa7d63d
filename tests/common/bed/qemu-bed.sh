#!/usr/bin/env bash
# Builds the qemu guest bed once: Debian's 6.1 kernel (unpacked, never installed on the host),
# its modules with a modules.dep, and a busybox initramfs that mounts the host's root read-only
# over virtio-9p and hands over to the per-run init named on the kernel command line
# (`s3nfs.init=PATH`). Everything comes from Debian's packages.
#   usage: qemu-bed.sh BED_DIR
# The bed is ready when BED_DIR/ready exists; a rebuild starts from an empty directory.
# Concurrent callers (test binaries) serialise on BED_DIR.lock.
set -euo pipefail
bed=${1:?usage: qemu-bed.sh BED_DIR}
mkdir -p "$(dirname "$bed")"
exec 9>"$bed.lock"
flock 9
[ -f "$bed/ready" ] && exit 0

pkgs=(qemu-system-x86 busybox-static cpio kmod)
if ! dpkg -s "${pkgs[@]}" >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${pkgs[@]}" >/dev/null ||
        { apt-get update -qq && apt-get install -y -qq "${pkgs[@]}" >/dev/null; }
fi

# The newest 6.1 kernel Debian 12 offers. The unsigned image has the modules in the same package.
kpkg() { apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$' | awk '{print $1}' | sort -V | tail -1; }
pkg=$(kpkg)
if [ -z "$pkg" ]; then apt-get update -qq; pkg=$(kpkg); fi
[ -n "$pkg" ] || { echo "qemu-bed: no linux-image-6.1.0-*-amd64-unsigned in the apt lists" >&2; exit 1; }

rm -rf "$bed" && mkdir -p "$bed/dl" && cd "$bed"
# apt-get download as root warns when _apt cannot write the directory; a world-writable
# download directory keeps the output clean.
chmod 1777 dl
(cd dl && apt-get download -qq "$pkg" 2>&1 | grep -v 'unsandboxed' || true)
deb=$(ls dl/*.deb)
dpkg -x "$deb" kernel
rm -rf dl
V=$(ls kernel/lib/modules | head -1)
echo "$V" > version
echo "$pkg" > package
depmod -b kernel "$V"

# The initramfs: busybox and the modules that reach the 9p root, loaded in this order.
mods="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci netfs fscache 9pnet 9pnet_virtio 9p"
mkdir -p ird/bin ird/mods ird/newroot ird/proc ird/sys ird/dev
cp /bin/busybox ird/bin/
for m in $mods; do
    f=$(find "kernel/lib/modules/$V" -name "$m.ko" -o -name "$m.ko.xz" | head -1)
    [ -n "$f" ] || { echo "qemu-bed: module $m not in $pkg" >&2; exit 1; }
    cp "$f" ird/mods/
done
cat > ird/init <<EOI
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $mods; do insmod /mods/\$m.ko || { echo "s3nfs-bed: insmod \$m failed"; poweroff -f; }; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /newroot ||
    { echo "s3nfs-bed: 9p root mount failed"; poweroff -f; }
init=\$(sed -n 's/.*s3nfs\.init=\([^ ]*\).*/\1/p' /proc/cmdline)
umount /proc /sys /dev
exec switch_root /newroot "\$init"
EOI
chmod +x ird/init
(cd ird && find . | cpio -o -H newc 2>/dev/null | gzip -1 > ../initrd.gz)
rm -rf ird
touch ready
echo "qemu-bed: $pkg ($V) ready in $bed"
