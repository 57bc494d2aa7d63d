//! POSIX conformance of the mounted share: pjdfstest (the Rust rewrite, crates.io `pjdfstest`)
//! run as root by the Linux kernel NFSv3 client inside the guest test bed, on an s3nfs export of a
//! Garage bucket (the same guest set-up as `kernel_mount.rs`, see `tests/common/guest.rs`).
//!
//! Every case that passes today is listed in `tests/posix-baseline.txt`; the test fails when
//! one of them fails twice (a regression): the cases that fail on the mount are run once more
//! after the others, and one that passes then counts as passing and is printed
//! as `FLAKY` (a timing-sensitive case on a slow guest; a feature that is missing fails both
//! times). It lists the cases that newly pass (then rerun with
//! `S3NFS_UPDATE_POSIX_BASELINE=1` to rewrite the baseline). It prints pass/fail counts per
//! syscall group and sorts the failures by cause:
//! - suite: the case fails on the guest's tmpfs as well (pjdfstest is first run there, which
//!   also gives the list of cases);
//! - ours: everything else, the gateway's own departures from POSIX, each printed with its
//!   known reason (S3's 1024-byte key limit, NFSv3's 32-bit seconds, the client's silly rename)
//!   or with none, which makes it a bug to look into.
//!
//! The config enables the Linux features (utimensat, UTIME_NOW, posix_fallocate,
//! rename_ctime), remounts (the EROFS cases remount the mount read-only and back) and a second
//! file system (the guest's /tmp, for EXDEV); each syscall group runs in its own pjdfstest
//! process, killed after `GROUP_TIMEOUT_SECS` (the case it was in then fails as STOPPED).
//!
//! Needs pjdfstest (`cargo install pjdfstest --locked`, which needs `libacl1-dev`; `.ci/run`
//! installs it), found as `$PJDFSTEST_BIN`, else `~/.cargo/bin/pjdfstest`, else on PATH; and
//! the guest test bed like `kernel_mount.rs`. `S3NFS_SKIP_GUEST=1` skips instead of failing.
//! pjdfstest switches to the users `nobody` and `tests`: the guest adds `tests` to its own
//! copies of /etc/passwd and /etc/group (bind-mounted over the host's, which it sees read-only),
//! so nothing changes on the host.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::bed::{guest_path, require_guest, run_guest, sh_quote, GuestOpts};
use common::guest::script;

const INSTALL_HINT: &str = "pjdfstest is needed for the POSIX conformance test: \
     `apt-get install libacl1-dev && cargo install pjdfstest --locked` (or set PJDFSTEST_BIN), \
     or set S3NFS_SKIP_GUEST=1 to skip the kernel-client tests";

const BASELINE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/posix-baseline.txt");

/// Seconds one pjdfstest process may take for one syscall group before it is killed (the case
/// it was running is then counted as failed and the group goes on after it).
const GROUP_TIMEOUT_SECS: u64 = 300;

fn pjdfstest_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PJDFSTEST_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = Path::new(&home).join(".cargo/bin/pjdfstest");
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("pjdfstest"))
        .find(|p| p.is_file())
}

/// The guest script body: users, config, a reference run on tmpfs (which also lists the cases),
/// then one pjdfstest process per syscall group on the mount, each bounded in time. The raw
/// output of both runs goes to the console as `PJDOUT tmpfs|<line>` / `PJDOUT nfs|<line>`.
const BODY: &str = r#"
export NO_COLOR=1 RUST_BACKTRACE=0
CONF=/tmp/pjdfstest.toml
# pjdfstest switches to `nobody` and `tests`: give the guest its own /etc/passwd and /etc/group
cp /etc/passwd /etc/group /run/
if ! grep -q '^tests:' /run/passwd; then
  gid=$(awk -F: '$1 == "tests" {print $3}' /run/group)
  if [ -z "$gid" ]; then
    gid=$(awk -F: '$3 >= 1000 && $3 < 60000 && $3 > m {m = $3} END {print (m ? m : 1000) + 1}' /run/passwd /run/group)
    echo "tests:x:$gid:" >>/run/group
  fi
  echo "tests:x:$gid:$gid:pjdfstest:/:/usr/sbin/nologin" >>/run/passwd
fi
mount --bind /run/passwd /etc/passwd && mount --bind /run/group /etc/group
nobody_group=$(id -gn nobody)
step users sh -c "id nobody && id tests"
cat >$CONF <<EOF
[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}
rename_ctime = {}
[settings]
naptime = $NAPTIME
# the EROFS cases remount the file system under test read-only and back (mount -o remount)
allow_remount = true
[dummy_auth]
entries = [["nobody", "$nobody_group"], ["tests", "tests"]]
EOF
RESULT='^[^[:space:]]+ +(ok|FAILED|skipped|PASSED UNEXPECTEDLY|failed as expected)$'
clean() { sed 's/\x1b\[[0-9;]*m//g'; }

# the reference run has a tmpfs of its own (its EROFS cases remount it read-only), and /tmp
# as the second file system (EXDEV cases); the run on the mount has /tmp as its second.
mkdir -p /run/pjd-ref && mount -t tmpfs -o mode=755 none /run/pjd-ref
mkdir -p /tmp/pjd-second
pjd_ref() { timeout -k 10 900 $PJD -c $CONF -s /tmp/pjd-second -p /run/pjd-ref >/tmp/ref.raw 2>&1; }
timed pjd_tmpfs pjd_ref
clean </tmp/ref.raw >/tmp/ref.out
grep -E "$RESULT" /tmp/ref.out | cut -d' ' -f1 >/tmp/names
kv cases "$(wc -l </tmp/names)"

# pjd_group G: the cases of group G on the mount (-e: exact names, which pjdfstest matches
# before stripping the "pjdfstest::tests::" prefix from them); if pjdfstest stops early (timeout, crash),
# the case it was in is reported as STOPPED and the rest of the group runs in a new process.
pjd_group() {
  local n total rc stopped
  grep "^$1::" /tmp/names >/tmp/todo
  while [ -s /tmp/todo ]; do
    timeout -k 10 $GROUP_TIMEOUT $PJD -c $CONF -s /tmp/pjd-second -e -p $M/pjd $(sed "s/^/pjdfstest::tests::/" /tmp/todo) >/tmp/part.raw 2>&1
    rc=$?
    clean </tmp/part.raw >/tmp/part.out
    cat /tmp/part.out >>/tmp/nfs.out
    n=$(grep -cE "$RESULT" /tmp/part.out)
    total=$(wc -l </tmp/todo)
    [ "$n" -ge "$total" ] && return 0
    stopped=$(sed -n "$((n + 1))p" /tmp/todo)
    echo "$stopped STOPPED" >>/tmp/nfs.out
    echo "	pjdfstest exited with rc=$rc in this case (124: killed after ${GROUP_TIMEOUT}s)" >>/tmp/nfs.out
    tail -n +$((n + 2)) /tmp/todo >/tmp/todo.next
    mv /tmp/todo.next /tmp/todo
  done
}
mkdir -p $M/pjd
: >/tmp/nfs.out
t0=$(now_ms)
for g in $(cut -d: -f1 /tmp/names | sort -u); do
  timed "group_$g" pjd_group $g
done
kv pjd_nfs_ms $(( $(now_ms) - t0 ))
# The cases that failed on the mount, once more, in one process: a case that fails again is a
# failure; one that passes was timing on a slow guest, and the test says so.
awk '$NF == "FAILED" || $NF == "STOPPED" || $NF == "expected" {print $1}' /tmp/nfs.out | sort -u >/tmp/retry
: >/tmp/retry.out
if [ -s /tmp/retry ]; then
  timeout -k 10 $GROUP_TIMEOUT $PJD -c $CONF -s /tmp/pjd-second -e -p $M/pjd $(sed "s/^/pjdfstest::tests::/" /tmp/retry) >/tmp/retry.raw 2>&1
  clean </tmp/retry.raw >/tmp/retry.out
fi
kv retried "$(wc -l </tmp/retry)"
sed 's/^/PJDOUT tmpfs|/' /tmp/ref.out
sed 's/^/PJDOUT nfs|/' /tmp/nfs.out
sed 's/^/PJDOUT retry|/' /tmp/retry.out
step server_alive kill -0 $(bg_pid server)
step umount umount $M
"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Pass,
    Fail,
    Skip,
    /// pjdfstest was killed (timeout) or crashed in this case.
    Stopped,
}

#[derive(Debug, Default)]
struct Run {
    /// Case name -> outcome, and the failure message (the lines after a failed case).
    results: BTreeMap<String, Outcome>,
    messages: BTreeMap<String, String>,
}

impl Run {
    fn passing(&self) -> BTreeSet<String> {
        self.results
            .iter()
            .filter(|(_, o)| **o == Outcome::Pass)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// A result line: `<name> <spaces> <status>`.
fn result_line(line: &str) -> Option<(String, Outcome)> {
    if line.starts_with(char::is_whitespace) {
        return None;
    }
    for (status, outcome) in [
        ("PASSED UNEXPECTEDLY", Outcome::Pass),
        ("failed as expected", Outcome::Fail),
        ("FAILED", Outcome::Fail),
        ("skipped", Outcome::Skip),
        ("STOPPED", Outcome::Stopped),
        ("ok", Outcome::Pass),
    ] {
        if let Some(name) = line.strip_suffix(status) {
            let name = name.trim_end();
            if name.len() < line.len() - status.len() && !name.is_empty() && !name.contains(char::is_whitespace) {
                return Some((name.to_string(), outcome));
            }
        }
    }
    None
}

fn parse_run(console: &str, tag: &str) -> Run {
    let marker = format!("PJDOUT {tag}|");
    let mut run = Run::default();
    let mut current: Option<String> = None;
    for line in console.lines() {
        let Some(pos) = line.find(&marker) else {
            continue;
        };
        let line = line[pos + marker.len()..].trim_end_matches('\r');
        if let Some((name, outcome)) = result_line(line) {
            current = matches!(outcome, Outcome::Fail | Outcome::Stopped).then(|| name.clone());
            run.results.insert(name, outcome);
        } else if let Some(name) = &current {
            if line.starts_with("Summary:") {
                current = None;
                continue;
            }
            let m = run.messages.entry(name.clone()).or_default();
            if !m.is_empty() {
                m.push(' ');
            }
            m.push_str(line.trim());
        }
    }
    run
}

/// The syscall group of a case: `chmod::...` -> `chmod`.
fn group(name: &str) -> &str {
    name.split("::").next().unwrap_or(name)
}

/// What is known about one of our failures (printed beside it; it does not change the count).
fn known_reason(name: &str, message: &str) -> Option<&'static str> {
    let last = name.rsplit("::").next().unwrap_or(name);
    if name.ends_with("enametoolong_path") && message.contains("code: 36") {
        return Some("S3 keys are at most 1024 bytes (src/fs/names.rs KEY_MAX): a PATH_MAX-long path cannot be made");
    }
    let base = if matches!(last, "regular" | "dir" | "symlink") {
        name.rsplit_once("::").map_or(name, |(b, _)| b)
    } else {
        name
    };
    match base {
        "unlink::open_file_not_freed" => {
            Some("the kernel NFS client silly-renames an open file instead of removing it (any NFS server)")
        }
        "utimensat::y2038" => Some("NFSv3 times have 32-bit seconds: the kernel client clamps 2^32 to 2^32-1"),
        _ => None,
    }
}

fn read_baseline() -> BTreeSet<String> {
    std::fs::read_to_string(BASELINE)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

fn write_baseline(passing: &BTreeSet<String>) {
    let mut text = String::from(
        "# pjdfstest cases that pass on an s3nfs mount (tests/posix.rs): one per line, sorted.\n\
         # A case listed here that fails is a regression. Rewrite with S3NFS_UPDATE_POSIX_BASELINE=1.\n",
    );
    for n in passing {
        text.push_str(n);
        text.push('\n');
    }
    std::fs::write(BASELINE, text).expect("write tests/posix-baseline.txt");
}

#[test]
fn pjdfstest_on_mount() {
    if !require_guest("pjdfstest_on_mount") {
        return;
    }
    let Some(pjd) = pjdfstest_bin() else {
        if std::env::var("S3NFS_SKIP_GUEST").as_deref() == Ok("1") {
            eprintln!("SKIPPED pjdfstest_on_mount: pjdfstest not found; {INSTALL_HINT}");
            return;
        }
        panic!("pjdfstest not found (PJDFSTEST_BIN, ~/.cargo/bin, PATH); {INSTALL_HINT}");
    };
    let naptime = std::env::var("S3NFS_POSIX_NAPTIME").unwrap_or_else(|_| "0.01".into());
    let body = format!(
        "PJD={}\nNAPTIME={naptime}\nGROUP_TIMEOUT={GROUP_TIMEOUT_SECS}\n{BODY}",
        sh_quote(&guest_path(&pjd))
    );
    let out = run_guest(&script(&body), &GuestOpts::default().mem("1G").timeout_secs(3600));
    out.assert_finished();
    out.step("users").assert_ok();
    let tmpfs = parse_run(&out.console, "tmpfs");
    let nfs = parse_run(&out.console, "nfs");
    let cases: usize = out.expect_value("cases").parse().unwrap();
    if cases == 0 || tmpfs.results.len() != cases {
        out.fail(&format!(
            "reference run on tmpfs listed {cases} cases, parsed {}",
            tmpfs.results.len()
        ));
    }
    if nfs.results.len() != cases {
        let missing: Vec<_> = tmpfs.results.keys().filter(|n| !nfs.results.contains_key(*n)).collect();
        out.fail(&format!("no result on the mount for {missing:?}"));
    }

    // Per group: cases, passed, failed (suite / ours), skipped.
    #[derive(Default)]
    struct Row {
        cases: usize,
        pass: usize,
        fail: usize,
        suite: usize,
        ours: usize,
        skip: usize,
    }
    let mut rows: BTreeMap<&str, Row> = BTreeMap::new();
    let mut ours = Vec::new();
    for (name, outcome) in &nfs.results {
        let row = rows.entry(group(name)).or_default();
        row.cases += 1;
        match outcome {
            Outcome::Pass => row.pass += 1,
            Outcome::Skip => row.skip += 1,
            Outcome::Fail | Outcome::Stopped => {
                row.fail += 1;
                let msg = nfs.messages.get(name).map(String::as_str).unwrap_or("");
                if tmpfs.results.get(name) != Some(&Outcome::Pass) {
                    row.suite += 1;
                } else {
                    row.ours += 1;
                    ours.push((name.clone(), *outcome, msg));
                }
            }
        }
    }
    let mut table = format!(
        "{:<18} {:>5} {:>5} {:>5} {:>6} {:>5} {:>5}\n",
        "group", "cases", "pass", "fail", "suite", "ours", "skip"
    );
    let mut total = Row::default();
    for (g, r) in &rows {
        table.push_str(&format!(
            "{g:<18} {:>5} {:>5} {:>5} {:>6} {:>5} {:>5}\n",
            r.cases, r.pass, r.fail, r.suite, r.ours, r.skip
        ));
        total.cases += r.cases;
        total.pass += r.pass;
        total.fail += r.fail;
        total.suite += r.suite;
        total.ours += r.ours;
        total.skip += r.skip;
    }
    table.push_str(&format!(
        "{:<18} {:>5} {:>5} {:>5} {:>6} {:>5} {:>5}\n",
        "TOTAL", total.cases, total.pass, total.fail, total.suite, total.ours, total.skip
    ));
    eprintln!("pjdfstest on the s3nfs mount (suite: fails on tmpfs too; ours: the gateway's)\n{table}");
    eprintln!("our failures ({}):", ours.len());
    for (name, outcome, msg) in &ours {
        eprintln!("  {name} [{outcome:?}]: {msg}");
        if let Some(why) = known_reason(name, msg) {
            eprintln!("      known: {why}");
        }
    }
    let suite: Vec<_> = nfs
        .results
        .iter()
        .filter(|(n, o)| matches!(o, Outcome::Fail | Outcome::Stopped) && tmpfs.results.get(*n) != Some(&Outcome::Pass))
        .map(|(n, _)| n.as_str())
        .collect();
    eprintln!("failing on tmpfs too ({}): {suite:?}", suite.len());
    eprintln!(
        "wall time: tmpfs run {} ms, mount run {} ms, whole guest {:?}",
        out.expect_value("pjd_tmpfs_ms"),
        out.expect_value("pjd_nfs_ms"),
        out.total
    );
    out.step("server_alive").assert_ok();

    // A failure that passed when run again (see BODY): counted as passing, and named.
    let retry = parse_run(&out.console, "retry");
    let failed: Vec<_> = nfs
        .results
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Fail | Outcome::Stopped))
        .collect();
    let retried: usize = out.expect_value("retried").parse().unwrap();
    if retried != failed.len() {
        out.fail(&format!(
            "{} cases failed on the mount, {retried} run again",
            failed.len()
        ));
    }
    let mut passing = nfs.passing();
    for (name, outcome) in failed {
        if retry.results.get(name) == Some(&Outcome::Pass) {
            let msg = nfs.messages.get(name).map(String::as_str).unwrap_or("");
            eprintln!("FLAKY: {name} failed [{outcome:?}: {msg}] and passed when run again");
            passing.insert(name.clone());
        }
    }
    if passing.is_empty() {
        out.fail("no case passed on the mount: the run itself is broken");
    }
    if std::env::var("S3NFS_UPDATE_POSIX_BASELINE").as_deref() == Ok("1") {
        write_baseline(&passing);
        eprintln!("wrote {} passing cases to {BASELINE}", passing.len());
        return;
    }
    let baseline = read_baseline();
    let newly: Vec<_> = passing.difference(&baseline).collect();
    if !newly.is_empty() {
        eprintln!(
            "{} cases pass that are not in the baseline (rerun with S3NFS_UPDATE_POSIX_BASELINE=1 to add them): {newly:?}",
            newly.len()
        );
    }
    let regressed: Vec<_> = baseline
        .difference(&passing)
        .map(|n| {
            format!(
                "{n} [{:?}]: {}",
                nfs.results.get(n),
                nfs.messages.get(n).map(String::as_str).unwrap_or("")
            )
        })
        .collect();
    assert!(
        regressed.is_empty(),
        "{} cases of tests/posix-baseline.txt no longer pass:\n{}",
        regressed.len(),
        regressed.join("\n")
    );
}
