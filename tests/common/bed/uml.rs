//! The user-mode-linux backend: Debian's `linux.uml` with the host's root over hostfs
//! (`root=/dev/root rootfstype=hostfs rootflags=/ ro`) and the UML kernel's own modules from
//! `/usr/lib/uml/modules/<ver>`. Console on stdin/stdout (`con=null con0=fd:0,fd:1`).
//!
//! UML keeps guest memory in a file in `$TMPDIR`: each run gets its own directory, in
//! `/dev/shm` when it has room (memory-backed, fast), else in the work directory. It forks
//! helper processes, which is why the harness kills the whole process group.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{bed_dir, run_guest_on, Backend, BootLines, GuestOpts};

const INSTALL_HINT: &str = "install it with `apt-get install user-mode-linux kmod`";

/// Where `linux.uml` is, if on PATH.
fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("linux.uml"))
        .find(|p| p.is_file())
}

/// The UML kernel's module version (a directory in `/usr/lib/uml/modules`).
fn modules_version() -> Option<String> {
    let mut vers: Vec<String> = fs::read_dir("/usr/lib/uml/modules")
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("modules.dep").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    vers.sort();
    vers.pop()
}

/// Ok when user-mode-linux and its modules are installed; else how to install them.
pub(super) fn available() -> Result<(), String> {
    if binary().is_none() {
        return Err(format!("linux.uml not found on PATH; {INSTALL_HINT}"));
    }
    if modules_version().is_none() {
        return Err(format!(
            "no UML kernel modules in /usr/lib/uml/modules/<ver>; {INSTALL_HINT}"
        ));
    }
    if !Path::new("/sbin/modprobe").exists() && !Path::new("/usr/sbin/modprobe").exists() {
        return Err(format!("modprobe not found; {INSTALL_HINT}"));
    }
    Ok(())
}

/// Whether a UML guest boots on this host and runs a script: probed by booting one, the answer
/// kept in the bed directory for as long as the host stays up (its boot id).
pub(super) fn boots() -> Result<(), String> {
    available()?;
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let memo = bed_dir().join("uml-probe");
    if let Some((id, answer)) = fs::read_to_string(&memo)
        .ok()
        .as_deref()
        .and_then(|s| s.split_once('\n'))
    {
        if id == boot_id.trim() {
            return if answer == "ok" {
                Ok(())
            } else {
                Err(answer.to_string())
            };
        }
    }
    let opts = GuestOpts::default().mem("256M").timeout_secs(120);
    let out = run_guest_on(Backend::Uml, "kv probe ok\n", &opts);
    let answer = if out.value("probe") == Some("ok") {
        Ok(())
    } else {
        // The line that says why, where UML printed one.
        let why = out
            .console
            .lines()
            .find(|l| l.contains("failed, errno") || l.contains("Kernel panic"))
            .map(str::trim)
            .unwrap_or("the probe guest never reported back");
        Err(format!("does not boot here: {why}"))
    };
    let _ = fs::create_dir_all(bed_dir());
    let text = match &answer {
        Ok(()) => "ok".to_string(),
        Err(e) => e.replace('\n', " "),
    };
    let _ = fs::write(&memo, format!("{}\n{text}", boot_id.trim()));
    answer
}

pub(super) fn boot_lines(token: &str) -> BootLines {
    let ver = modules_version().expect("UML modules");
    BootLines {
        early: "mount -t proc proc /proc\nmount -t sysfs sys /sys".into(),
        modules: format!(
            "mkdir -p /run/modroot/lib/modules/{ver}\n\
             mount --bind /usr/lib/uml/modules/{ver} /run/modroot/lib/modules/{ver}\n\
             S3NFS_MODROOT=/run/modroot\n\
             modprobe -d $S3NFS_MODROOT nfsv3 || echo \"@@{token}@@ STEP guest_modprobe rc=1\""
        ),
    }
}

/// The `linux.uml` command, and the directory for its guest memory file (kept until it exits).
pub(super) fn command(init: &Path, opts: &GuestOpts, work: &Path) -> (Command, Option<tempfile::TempDir>) {
    let need = mem_bytes(&opts.mem) + (256 << 20);
    let memdir = if free_bytes("/dev/shm") > need {
        tempfile::Builder::new()
            .prefix("s3nfs-uml-")
            .tempdir_in("/dev/shm")
            .ok()
    } else {
        None
    };
    let tmpdir = memdir
        .as_ref()
        .map(|d| d.path().to_path_buf())
        .unwrap_or_else(|| work.to_path_buf());
    let mut cmd = Command::new(binary().expect("linux.uml"));
    cmd.arg(format!("mem={}", opts.mem))
        .args(["root=/dev/root", "rootfstype=hostfs", "rootflags=/", "ro"])
        .arg(format!("init={}", init.display()))
        .args(["con=null", "con0=fd:0,fd:1"])
        .env("TMPDIR", &tmpdir);
    (cmd, memdir)
}

fn free_bytes(dir: &str) -> u64 {
    let c = std::ffi::CString::new(dir).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    st.f_bavail as u64 * st.f_frsize as u64
}

fn mem_bytes(mem: &str) -> u64 {
    let (n, mul) = match mem.chars().last() {
        Some('G' | 'g') => (&mem[..mem.len() - 1], 1 << 30),
        Some('M' | 'm') => (&mem[..mem.len() - 1], 1 << 20),
        Some('K' | 'k') => (&mem[..mem.len() - 1], 1 << 10),
        _ => (mem, 1),
    };
    n.parse::<u64>().unwrap_or(1 << 30) * mul
}
