//! A user-mode-linux harness: boot a throw-away Linux guest (with the kernel NFS client) from
//! an integration test, run a shell script inside, and get back structured results.
//!
//! The host machine's kernel may lack an NFS client; user-mode-linux (`linux.uml`, Debian
//! package `user-mode-linux`) has one, as loadable modules in `/usr/lib/uml/modules/<ver>`.
//!
//! How a run works:
//! - `run_guest` writes `init`, `prelude.sh` and `script.sh` into a fresh work directory
//!   under `CARGO_TARGET_TMPDIR` and boots
//!   `linux.uml mem=M root=/dev/root rootfstype=hostfs rootflags=/ ro init=<work>/init
//!   con=null con0=fd:0,fd:1` with stdin `/dev/null` and stdout+stderr to `<work>/console.log`.
//! - The guest sees the host's whole filesystem READ-ONLY over hostfs (checked: `ro` boots
//!   fine, writes fail with EROFS), so host binaries and files are used in place by their host
//!   paths. It writes only to tmpfs: `/run`, `/tmp`, `/mnt` (and `/var/tmp`). Host paths under
//!   `/tmp` or `/mnt` are hidden by those tmpfs mounts; the init binds the host's `/tmp` and `/mnt`
//!   read-only at `/run/host/tmp` and `/run/host/mnt` first, and [`guest_path`] translates.
//! - The UML kernel's modules are bound at `/run/modroot/lib/modules/<ver>` and loaded with
//!   `modprobe -d /run/modroot nfsv3` (no need for a `/lib/modules` on the host).
//! - Results travel on the console: the prelude's `step`/`kv` print lines
//!   `@@<token>@@ STEP <name> rc=<n>` and `@@<token>@@ KV <key>=<value>`, with a per-run random
//!   token; the host keeps only those lines for results (kernel and program noise stays in the
//!   log, which is printed, last 200 lines, when an assertion fails).
//! - UML keeps guest memory in a file in `$TMPDIR`: each run gets its own directory, in
//!   `/dev/shm` when it has room (memory-backed, fast) else in the work directory.
//! - On timeout the UML process group is killed (UML forks helper processes).
//!
//! Guest-side helpers (bash, see `PRELUDE`): `step NAME cmd...`, `kv KEY VALUE`,
//! `wait_port PORT [SECS]`, `nfs_mount PORT DIR [OPTS]`, `bg NAME cmd...` / `bg_kill NAME [SIG]`
//! / `bg_pid NAME` / `show_log NAME`, `now_ms`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const INSTALL_HINT: &str = "user-mode-linux is needed for kernel NFS client tests: \
     `apt-get install user-mode-linux kmod` (Debian/Ubuntu), \
     or set S3NFS_SKIP_UML=1 to skip these tests";

/// Where `linux.uml` is, if on PATH.
pub fn uml_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("linux.uml"))
        .find(|p| p.is_file())
}

/// The UML kernel's module version (a directory in `/usr/lib/uml/modules`).
pub fn uml_modules_version() -> Option<String> {
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
pub fn uml_available() -> Result<(), String> {
    if uml_binary().is_none() {
        return Err(format!("linux.uml not found on PATH; {INSTALL_HINT}"));
    }
    if uml_modules_version().is_none() {
        return Err(format!(
            "no UML kernel modules in /usr/lib/uml/modules/<ver>; {INSTALL_HINT}"
        ));
    }
    if !Path::new("/sbin/modprobe").exists() && !Path::new("/usr/sbin/modprobe").exists() {
        return Err(format!("modprobe not found; {INSTALL_HINT}"));
    }
    Ok(())
}

/// For tests that need UML: true to go on. When UML is missing this panics with the install
/// hint, unless `S3NFS_SKIP_UML=1`, then it prints a skip notice and returns false.
pub fn require_uml(test: &str) -> bool {
    match uml_available() {
        Ok(()) => true,
        Err(e) if std::env::var("S3NFS_SKIP_UML").as_deref() == Ok("1") => {
            eprintln!("SKIPPED {test}: {e}");
            false
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

/// The path under which a host file is visible inside the guest.
pub fn guest_path(host: impl AsRef<Path>) -> String {
    let p = host.as_ref();
    let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let s = p.to_string_lossy().into_owned();
    for top in ["/tmp", "/mnt"] {
        if s == top || s.starts_with(&format!("{top}/")) {
            return format!("/run/host{s}");
        }
    }
    s
}

/// A single-quoted shell word.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The s3nfs binary built by cargo for integration tests.
pub fn s3nfs_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_s3nfs"))
}

#[derive(Clone, Debug)]
pub struct GuestOpts {
    /// Guest memory, UML syntax (`768M`). Guest tmpfs contents live in it.
    pub mem: String,
    /// Whole run, boot to power-off.
    pub timeout: Duration,
    /// Size limit of the guest's /tmp and /mnt tmpfs.
    pub tmpfs_size: String,
    /// Exported into the guest script's environment.
    pub env: Vec<(String, String)>,
    /// Print the console log tail even on success.
    pub verbose: bool,
}

impl Default for GuestOpts {
    fn default() -> Self {
        GuestOpts {
            mem: "768M".into(),
            timeout: Duration::from_secs(300),
            tmpfs_size: "2g".into(),
            env: Vec::new(),
            verbose: std::env::var_os("S3NFS_UML_VERBOSE").is_some(),
        }
    }
}

impl GuestOpts {
    pub fn env(mut self, k: &str, v: impl ToString) -> Self {
        self.env.push((k.into(), v.to_string()));
        self
    }
    pub fn timeout_secs(mut self, s: u64) -> Self {
        self.timeout = Duration::from_secs(s);
        self
    }
    pub fn mem(mut self, m: &str) -> Self {
        self.mem = m.into();
        self
    }
}

/// One `STEP` line: the exit status of a guest command, `None` if it never reported.
#[derive(Clone, Debug)]
pub struct Step<'a> {
    pub name: String,
    pub rc: Option<i32>,
    out: &'a GuestOutput,
}

impl Step<'_> {
    pub fn ok(&self) -> bool {
        self.rc == Some(0)
    }
    /// Panics, with the console tail, unless the step ran and returned 0.
    pub fn assert_ok(&self) {
        if !self.ok() {
            self.out
                .fail(&format!("step {:?}: rc={:?}, expected 0", self.name, self.rc));
        }
    }
}

#[derive(Debug, Default)]
pub struct GuestOutput {
    /// Steps in the order reported (a name may repeat; `step()` returns the last).
    pub steps: Vec<(String, i32)>,
    pub values: HashMap<String, String>,
    /// Exit status of the guest script, `None` if it did not finish (crash, timeout).
    pub script_rc: Option<i32>,
    pub timed_out: bool,
    /// Everything UML printed (kernel, init, the script's own output).
    pub console: String,
    /// Host wall time from spawning UML to the guest script starting, and to UML exiting.
    pub boot: Option<Duration>,
    pub total: Duration,
}

impl GuestOutput {
    pub fn step(&self, name: &str) -> Step<'_> {
        Step {
            name: name.into(),
            rc: self.steps.iter().rev().find(|(n, _)| n == name).map(|s| s.1),
            out: self,
        }
    }

    pub fn value(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(|s| s.as_str())
    }

    /// The value, or a failure with the console tail.
    pub fn expect_value(&self, key: &str) -> &str {
        match self.value(key) {
            Some(v) => v,
            None => self.fail(&format!("no KV {key:?} reported")),
        }
    }

    /// The guest script ran to its end (no timeout, no kernel crash).
    pub fn assert_finished(&self) {
        if self.timed_out {
            self.fail("guest timed out");
        }
        if self.script_rc.is_none() {
            self.fail("guest script did not finish");
        }
    }

    /// Each named step was reported with rc=0, and the script finished.
    pub fn assert_steps(&self, names: &[&str]) {
        for n in names {
            self.step(n).assert_ok();
        }
        self.assert_finished();
    }

    /// Every reported step succeeded, and the script finished with 0.
    pub fn assert_all_ok(&self) {
        if let Some((n, rc)) = self.steps.iter().find(|s| s.1 != 0) {
            self.fail(&format!("step {n:?} failed: rc={rc}"));
        }
        self.assert_finished();
        if self.script_rc != Some(0) {
            self.fail(&format!("guest script rc={:?}", self.script_rc));
        }
    }

    pub fn console_tail(&self, lines: usize) -> String {
        let all: Vec<&str> = self.console.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn fail(&self, msg: &str) -> ! {
        panic!(
            "{msg}\n--- steps: {:?}\n--- values: {:?}\n--- guest console (last 200 lines) ---\n{}\n--- end console ---",
            self.steps,
            self.values,
            self.console_tail(200)
        )
    }
}

/// Runs in the guest script's shell (bash) before the test's script.
pub const PRELUDE: &str = r#"
# --- s3nfs UML prelude ---
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
_emit() { printf '@@%s@@ %s\n' "$S3NFS_TOKEN" "$*"; }
# step NAME cmd...: run cmd, report "STEP NAME rc=N", return its status.
step() { local n=$1; shift; "$@"; local rc=$?; _emit "STEP $n rc=$rc"; return $rc; }
# kv KEY VALUE...: report a value (one line).
kv() { local k=$1; shift; _emit "KV $k=$*"; }
now_ms() { date +%s%3N; }
# timed NAME cmd...: like step, plus "KV NAME_ms=<elapsed>".
timed() { local n=$1; shift; local t0; t0=$(now_ms); step "$n" "$@"; local rc=$?; kv "${n}_ms" $(( $(now_ms) - t0 )); return $rc; }
# wait_port PORT [SECS]: until 127.0.0.1:PORT accepts a TCP connection.
wait_port() {
  local end=$(( $(date +%s) + ${2:-30} ))
  while [ "$(date +%s)" -le "$end" ]; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "wait_port $1: timed out" >&2; return 1
}
# nfs_mount PORT DIR [EXTRA_OPTS]: the kernel NFSv3 client against 127.0.0.1:PORT.
# Without a mount.nfs helper, mount(2) needs addr= and mountaddr= spelled out.
nfs_mount() {
  local opts="vers=3,proto=tcp,port=$1,mountport=$1,nolock,hard"
  command -v mount.nfs >/dev/null 2>&1 || opts="$opts,addr=127.0.0.1,mountaddr=127.0.0.1"
  [ -n "$3" ] && opts="$opts,$3"
  mkdir -p "$2" && mount -t nfs -o "$opts" 127.0.0.1:/ "$2"
}
# bg NAME cmd...: start cmd in the background, output appended to /run/logs/NAME.log.
bg() { local n=$1; shift; "$@" >>"/run/logs/$n.log" 2>&1 & echo $! >"/run/logs/$n.pid"; }
bg_pid() { cat "/run/logs/$1.pid"; }
# bg_kill NAME [SIG]: signal it (default TERM) and reap it.
bg_kill() { local p; p=$(bg_pid "$1"); kill -"${2:-TERM}" "$p" 2>/dev/null; wait "$p" 2>/dev/null; true; }
# show_log NAME: print a background program's log to the console (for failures).
show_log() { echo "----- log $1 -----"; tail -n "${2:-50}" "/run/logs/$1.log" 2>/dev/null; echo "----- end log $1 -----"; }
mkdir -p /run/logs
# --- end prelude ---
"#;

fn init_script(work: &Path, ver: &str, token: &str, opts: &GuestOpts) -> String {
    let w = work.display();
    let mut env = String::new();
    for (k, v) in &opts.env {
        env.push_str(&format!("export {k}={}\n", sh_quote(v)));
    }
    format!(
        r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs -o mode=755 none /run
# devtmpfs lacks these (bash process substitution uses /dev/fd/N)
ln -sf /proc/self/fd /dev/fd; ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout; ln -sf /proc/self/fd/2 /dev/stderr
# host /tmp and /mnt stay reachable (read-only) under /run/host before tmpfs covers them
mkdir -p /run/host/tmp /run/host/mnt /run/s3nfs-uml
mount --bind /tmp /run/host/tmp
mount --bind /mnt /run/host/mnt
cp {w}/prelude.sh {w}/script.sh /run/s3nfs-uml/
mount -t tmpfs -o size={sz},mode=1777 none /tmp
mount -t tmpfs -o size={sz} none /mnt
mount -t tmpfs none /var/tmp 2>/dev/null
mkdir -p /run/modroot/lib/modules/{ver}
mount --bind /usr/lib/uml/modules/{ver} /run/modroot/lib/modules/{ver}
modprobe -d /run/modroot nfsv3 || echo "@@{token}@@ STEP uml_modprobe rc=1"
ip link set lo up
export S3NFS_TOKEN={token}
{env}echo "@@{token}@@ GUEST_START"
cd /run/s3nfs-uml
bash -c '. ./prelude.sh; . ./script.sh' </dev/null 2>&1
echo "@@{token}@@ GUEST_END rc=$?"
sync
poweroff -f 2>/dev/null || echo o >/proc/sysrq-trigger
"#,
        sz = opts.tmpfs_size,
    )
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

fn parse(console: &str, token: &str, out: &mut GuestOutput) {
    let marker = format!("@@{token}@@ ");
    for line in console.lines() {
        let Some(pos) = line.find(&marker) else {
            continue;
        };
        let rest = line[pos + marker.len()..].trim_end_matches('\r');
        if let Some(s) = rest.strip_prefix("STEP ") {
            if let Some((name, rc)) = s.rsplit_once(" rc=") {
                out.steps.push((name.to_string(), rc.trim().parse().unwrap_or(-1)));
            }
        } else if let Some(s) = rest.strip_prefix("KV ") {
            if let Some((k, v)) = s.split_once('=') {
                out.values.insert(k.to_string(), v.to_string());
            }
        } else if let Some(rc) = rest.strip_prefix("GUEST_END rc=") {
            out.script_rc = rc.trim().parse().ok();
        }
    }
}

/// Boots a guest, runs `script` (bash, after the prelude) as root, and collects the results.
pub fn run_guest(script: &str, opts: &GuestOpts) -> GuestOutput {
    uml_available().unwrap_or_else(|e| panic!("{e}"));
    let ver = uml_modules_version().unwrap();
    let work = tempfile::Builder::new()
        .prefix("uml-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("work dir");
    // UML's guest memory file: memory-backed /dev/shm if it has room, else the work dir.
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
        .unwrap_or_else(|| work.path().to_path_buf());
    let token = format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let wp = work.path();
    let write = |name: &str, text: &str, mode: u32| {
        let p = wp.join(name);
        fs::File::create(&p)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .expect("write work file");
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    };
    write("init", &init_script(wp, &ver, &token, opts), 0o755);
    write("prelude.sh", PRELUDE, 0o644);
    write("script.sh", script, 0o644);
    let log_path = wp.join("console.log");
    let log = fs::File::create(&log_path).unwrap();

    let start = Instant::now();
    let mut child = Command::new(uml_binary().unwrap())
        .arg(format!("mem={}", opts.mem))
        .args(["root=/dev/root", "rootfstype=hostfs", "rootflags=/", "ro"])
        .arg(format!("init={}", wp.join("init").display()))
        .args(["con=null", "con0=fd:0,fd:1"])
        .env("TMPDIR", &tmpdir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("spawn linux.uml");
    let pgid = child.id() as i32;
    let start_marker = format!("@@{token}@@ GUEST_START");
    let mut out = GuestOutput::default();
    loop {
        if out.boot.is_none() && fs::read_to_string(&log_path).is_ok_and(|s| s.contains(&start_marker)) {
            out.boot = Some(start.elapsed());
        }
        if child.try_wait().expect("wait linux.uml").is_some() {
            break;
        }
        if start.elapsed() > opts.timeout {
            out.timed_out = true;
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // UML's helper and guest-process host processes share its process group and may outlive
    // the main process briefly: kill the group and wait (up to 10 s) until it is gone.
    let t = Instant::now();
    while unsafe { libc::kill(-pgid, libc::SIGKILL) } == 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    out.total = start.elapsed();
    let bytes = fs::read(&log_path).unwrap_or_default();
    let console = String::from_utf8_lossy(&bytes).into_owned();
    parse(&console, &token, &mut out);
    out.console = console;
    if opts.verbose {
        eprintln!("--- guest console ---\n{}", out.console_tail(200));
    }
    if std::env::var_os("S3NFS_UML_KEEP").is_some() {
        eprintln!("keeping guest work dir {}", work.keep().display());
    }
    out
}
