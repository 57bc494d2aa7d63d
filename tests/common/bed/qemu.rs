//! The qemu backend: `qemu-system-x86_64` with software emulation (TCG), booting Debian's 6.1
//! kernel from the bed that `qemu-bed.sh` builds once under `target/guest-bed` (kernel, its
//! modules with a modules.dep, and a busybox initramfs). The initramfs mounts the host's root
//! read-only over virtio-9p (`cache=loose`) and switches to the run's init, named on the kernel
//! command line as `s3nfs.init=`.
//!
//! Why these settings:
//! - `-accel tcg`: `/dev/kvm` on these machines is a nested software hypervisor (kvm_pvm) that
//!   stops a stock kernel with "KVM internal error ... emulation failure".
//! - `norandmaps`: without it every exec lays the loader out anew and TCG translates it again;
//!   2,000 execs of `touch` took 60 s, with it 15 s.
//! - `mitigations=off`: speculative-execution barriers only cost time in a throw-away guest.
//! - `-nodefaults`, no network device: the guest reaches nothing but its own loopback and the
//!   namespaces its script makes.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{bed_dir, guest_path, BootLines, GuestOpts};

/// The script that builds the bed.
fn bed_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/bed/qemu-bed.sh")
}

/// Ok when the bed is ready, building it first if needed (a minute; it fetches one kernel
/// package with apt). Err says what failed.
pub(super) fn available() -> Result<(), String> {
    let bed = bed_dir();
    if !bed.join("ready").is_file() {
        let out = Command::new("bash")
            .arg(bed_script())
            .arg(&bed)
            .output()
            .map_err(|e| format!("run {}: {e}", bed_script().display()))?;
        if !out.status.success() {
            return Err(format!(
                "building the qemu bed with {} {} failed: {}",
                bed_script().display(),
                bed.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    if !Path::new("/usr/bin/qemu-system-x86_64").is_file() {
        return Err("qemu-system-x86_64 not found; `apt-get install qemu-system-x86`".into());
    }
    Ok(())
}

fn version() -> String {
    std::fs::read_to_string(bed_dir().join("version"))
        .expect("bed version")
        .trim()
        .to_string()
}

pub(super) fn boot_lines(token: &str) -> BootLines {
    // Read after /tmp and /mnt are covered by the guest's tmpfs: a bed under them is reached
    // through /run/host.
    let kernel = guest_path(bed_dir().join("kernel"));
    BootLines {
        early: "mount -t proc proc /proc\n\
                mount -t sysfs sys /sys\n\
                mount -t devtmpfs dev /dev\n\
                mkdir -p /dev/pts /dev/shm\n\
                mount -t devpts devpts /dev/pts\n\
                mount -t tmpfs -o mode=1777 shm /dev/shm"
            .into(),
        modules: format!(
            "S3NFS_MODROOT={kernel}\n\
             modprobe -d $S3NFS_MODROOT nfsv3 || echo \"@@{token}@@ STEP guest_modprobe rc=1\""
        ),
    }
}

pub(super) fn command(init: &Path, opts: &GuestOpts) -> Command {
    let bed = bed_dir();
    let v = version();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none"])
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            &opts.mem,
        ])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(bed.join(format!("kernel/boot/vmlinuz-{v}")))
        .arg("-initrd")
        .arg(bed.join("initrd.gz"))
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 norandmaps mitigations=off s3nfs.init={}",
            init.display()
        ))
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ]);
    cmd
}
