//! The guest test bed: boot a throw-away Linux guest with the kernel NFS client from an
//! integration test, run a shell script inside as root, and get back structured results.
//!
//! The host's kernel may lack an NFS client, so the kernel-client tests run in a guest. Two
//! backends give the same guest contract:
//! - **uml** ([`uml`]): Debian's `user-mode-linux`, the host's root over hostfs. Fast to boot,
//!   but Debian 12's UML 6.1 dies at init on some hosts (`ptrace set fp regs failed, errno =
//!   14`: the host kernel takes `PTRACE_SETREGSET NT_X86_XSTATE` only with its full XSAVE
//!   size, UML passes 832 bytes; seen with AVX-512 and AMX, while AVX-512 alone boots).
//! - **qemu** ([`qemu`]): `qemu-system-x86_64` with software emulation (TCG; KVM on these
//!   machines is a nested software hypervisor that cannot run a stock kernel), Debian's 6.1
//!   kernel unpacked into a bed under `target/guest-bed` by `qemu-bed.sh`, the host's root
//!   read-only over virtio-9p.
//!
//! Which one runs: `S3NFS_GUEST=uml` or `S3NFS_GUEST=qemu` forces it; otherwise UML is probed
//! once (a guest that only reports back), and qemu is used where UML does not boot. The probe's
//! answer is kept in `target/guest-bed/uml-probe` for the host's boot, so each test binary does
//! not pay for it again. Every run prints which backend ran.
//!
//! The contract, the same on both:
//! - The guest sees the host's whole filesystem READ-ONLY, so host binaries and files are used
//!   in place by their host paths. It writes only to tmpfs: `/run`, `/tmp`, `/mnt` (and
//!   `/var/tmp`, `/dev/shm`). Host paths under `/tmp` or `/mnt` are hidden by those tmpfs
//!   mounts; the init binds the host's `/tmp` and `/mnt` read-only at `/run/host/tmp` and
//!   `/run/host/mnt` first, and [`guest_path`] translates.
//! - The kernel NFS client is loaded (`nfsv3`); other modules of the guest kernel load with
//!   `modprobe -d "$S3NFS_MODROOT" NAME`. `$S3NFS_GUEST_BACKEND` names the backend.
//! - Results travel on the console: the prelude's `step`/`kv` print lines
//!   `@@<token>@@ STEP <name> rc=<n>` and `@@<token>@@ KV <key>=<value>`, with a per-run random
//!   token; the host keeps only those lines for results (kernel and program noise stays in the
//!   log, which is printed, last 200 lines, when an assertion fails).
//!
//! Guest-side helpers (bash, see `PRELUDE`): `step NAME cmd...`, `kv KEY VALUE`,
//! `wait_port PORT [SECS]`, `nfs_mount PORT DIR [OPTS]`, `bg NAME cmd...` / `bg_kill NAME [SIG]`
//! / `bg_pid NAME` / `show_log NAME`, `now_ms`.
//!
//! By hand: `S3NFS_GUEST=qemu S3NFS_GUEST_VERBOSE=1 cargo test --test kernel_mount
//! guest_harness_mounts_nfs -- --nocapture` runs one guest test and prints its console;
//! `S3NFS_GUEST_KEEP=1` keeps the work directory (init, script, console log).

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod qemu;
mod uml;

/// Which kind of guest runs the tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Uml,
    Qemu,
}

impl Backend {
    /// How much slower a guest of this backend runs the same script, roughly: time limits in
    /// guest scripts (`$S3NFS_GUEST_SLOWDOWN`) and the whole run's limit are scaled by it. They
    /// are bounds for a hang, never a synchronisation. Creating 10,000 files through the kernel
    /// client took 148 s under qemu's emulation and 10 s under UML on the same host; the factor
    /// is lower than that ratio because most of a script is not such a workload.
    pub fn slowdown(self) -> u32 {
        match self {
            Backend::Uml => 1,
            Backend::Qemu => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Uml => "uml",
            Backend::Qemu => "qemu",
        }
    }

    /// Ok when this backend's parts are installed (for qemu: the bed is built, building it
    /// if needed); else what is missing and how to get it.
    pub fn available(self) -> Result<(), String> {
        match self {
            Backend::Uml => uml::available(),
            Backend::Qemu => qemu::available(),
        }
    }
}

/// The backend this run uses: forced by `S3NFS_GUEST`, else UML where it boots, else qemu.
/// Decided once per process. Err says why no guest can run here.
pub fn backend() -> Result<Backend, String> {
    static CHOICE: OnceLock<Result<Backend, String>> = OnceLock::new();
    CHOICE
        .get_or_init(|| {
            let chosen = choose();
            // Straight to stderr, past the test harness's capture: CI's log says which ran.
            let line = match &chosen {
                Ok(b) => format!("guest bed: backend {}\n", b.name()),
                Err(e) => format!("guest bed: no backend: {e}\n"),
            };
            let _ = std::io::stderr().write_all(line.as_bytes());
            chosen
        })
        .clone()
}

fn choose() -> Result<Backend, String> {
    match std::env::var("S3NFS_GUEST").as_deref() {
        Ok("uml") => return Backend::Uml.available().map(|_| Backend::Uml),
        Ok("qemu") => return Backend::Qemu.available().map(|_| Backend::Qemu),
        Ok("") | Err(_) => {}
        Ok(other) => return Err(format!("S3NFS_GUEST={other:?}: expected uml or qemu")),
    }
    let uml_why = match uml::boots() {
        Ok(()) => return Ok(Backend::Uml),
        Err(e) => e,
    };
    Backend::Qemu
        .available()
        .map(|_| Backend::Qemu)
        .map_err(|q| format!("user-mode-linux: {uml_why}; qemu: {q}"))
}

/// For tests that need a guest: true to go on. When no backend can run this panics with the
/// reason, unless `S3NFS_SKIP_GUEST=1`, then it prints a skip notice and returns false.
pub fn require_guest(test: &str) -> bool {
    match backend() {
        Ok(_) => true,
        Err(e) if std::env::var("S3NFS_SKIP_GUEST").as_deref() == Ok("1") => {
            eprintln!("SKIPPED {test}: {e}");
            false
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

/// Where the qemu bed lives: `S3NFS_QEMU_BED`, else `target/guest-bed`.
pub fn bed_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("S3NFS_QEMU_BED") {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR has a parent")
        .join("guest-bed")
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
    /// Guest memory (`768M`, `2G`). Guest tmpfs contents live in it.
    pub mem: String,
    /// Whole run, boot to power-off, on UML (scaled by [`Backend::slowdown`]).
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
            verbose: std::env::var_os("S3NFS_GUEST_VERBOSE").is_some(),
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
    /// The backend that ran the guest.
    pub backend: Option<Backend>,
    /// Steps in the order reported (a name may repeat; `step()` returns the last).
    pub steps: Vec<(String, i32)>,
    pub values: HashMap<String, String>,
    /// Exit status of the guest script, `None` if it did not finish (crash, timeout).
    pub script_rc: Option<i32>,
    pub timed_out: bool,
    /// Everything the guest printed (kernel, init, the script's own output).
    pub console: String,
    /// Host wall time from spawning the guest to its script starting, and to its exit.
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
            "{msg}\n--- backend: {:?}\n--- steps: {:?}\n--- values: {:?}\n--- guest console (last 200 lines) ---\n{}\n--- end console ---",
            self.backend.map(Backend::name),
            self.steps,
            self.values,
            self.console_tail(200)
        )
    }
}

/// Runs in the guest script's shell (bash) before the test's script.
pub const PRELUDE: &str = r#"
# --- s3nfs guest prelude ---
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

/// What a backend adds to the common init: `early` runs first (the kernel file systems),
/// `modules` once `/run` is a tmpfs and must set `S3NFS_MODROOT` and load `nfsv3`.
pub(crate) struct BootLines {
    pub early: String,
    pub modules: String,
}

fn init_script(work: &Path, boot: &BootLines, backend: Backend, token: &str, opts: &GuestOpts) -> String {
    let w = work.display();
    let mut env = String::new();
    for (k, v) in &opts.env {
        env.push_str(&format!("export {k}={}\n", sh_quote(v)));
    }
    format!(
        r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
{early}
mount -t tmpfs -o mode=755 none /run
# devtmpfs lacks these (bash process substitution uses /dev/fd/N)
ln -sf /proc/self/fd /dev/fd; ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout; ln -sf /proc/self/fd/2 /dev/stderr
# host /tmp and /mnt stay reachable (read-only) under /run/host before tmpfs covers them
mkdir -p /run/host/tmp /run/host/mnt /run/s3nfs-guest
mount --bind /tmp /run/host/tmp
mount --bind /mnt /run/host/mnt
cp {w}/prelude.sh {w}/script.sh /run/s3nfs-guest/
mount -t tmpfs -o size={sz},mode=1777 none /tmp
mount -t tmpfs -o size={sz} none /mnt
mount -t tmpfs none /var/tmp 2>/dev/null
{modules}
ip link set lo up
export S3NFS_TOKEN={token} S3NFS_GUEST_BACKEND={name} S3NFS_GUEST_SLOWDOWN={slowdown} S3NFS_MODROOT
{env}echo "@@{token}@@ GUEST_START"
cd /run/s3nfs-guest
bash -c '. ./prelude.sh; . ./script.sh' </dev/null 2>&1
echo "@@{token}@@ GUEST_END rc=$?"
sync
poweroff -f 2>/dev/null || echo o >/proc/sysrq-trigger
"#,
        early = boot.early,
        modules = boot.modules,
        name = backend.name(),
        slowdown = backend.slowdown(),
        sz = opts.tmpfs_size,
    )
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

/// Boots a guest on this run's backend, runs `script` (bash, after the prelude) as root, and
/// collects the results.
pub fn run_guest(script: &str, opts: &GuestOpts) -> GuestOutput {
    let backend = backend().unwrap_or_else(|e| panic!("{e}"));
    run_guest_on(backend, script, opts)
}

/// As [`run_guest`], on the given backend.
pub fn run_guest_on(backend: Backend, script: &str, opts: &GuestOpts) -> GuestOutput {
    backend.available().unwrap_or_else(|e| panic!("{e}"));
    let work = tempfile::Builder::new()
        .prefix("guest-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("work dir");
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
    let boot = match backend {
        Backend::Uml => uml::boot_lines(&token),
        Backend::Qemu => qemu::boot_lines(&token),
    };
    write("init", &init_script(wp, &boot, backend, &token, opts), 0o755);
    write("prelude.sh", PRELUDE, 0o644);
    write("script.sh", script, 0o644);
    let log_path = wp.join("console.log");
    let log = fs::File::create(&log_path).unwrap();
    let init = wp.join("init");
    // Held until the guest is gone: UML keeps guest memory in files there.
    let (mut cmd, _scratch) = match backend {
        Backend::Uml => uml::command(&init, opts, wp),
        Backend::Qemu => (qemu::command(&init, opts), None),
    };

    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn the {} guest: {e}", backend.name()));
    let pgid = child.id() as i32;
    let start_marker = format!("@@{token}@@ GUEST_START");
    let mut out = GuestOutput {
        backend: Some(backend),
        ..GuestOutput::default()
    };
    loop {
        if out.boot.is_none() && fs::read_to_string(&log_path).is_ok_and(|s| s.contains(&start_marker)) {
            out.boot = Some(start.elapsed());
        }
        if child.try_wait().expect("wait for the guest").is_some() {
            break;
        }
        if start.elapsed() > opts.timeout * backend.slowdown() {
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
    eprintln!(
        "guest bed: {} guest, script started after {:?}, whole run {:?}",
        backend.name(),
        out.boot,
        out.total
    );
    if opts.verbose {
        eprintln!("--- guest console ---\n{}", out.console_tail(200));
    }
    if std::env::var_os("S3NFS_GUEST_KEEP").is_some() {
        eprintln!("keeping guest work dir {}", work.keep().display());
    }
    out
}
