//! s3nfs side by side with the FUSE peers users compare it with: s3fs-fuse and rclone mount
//! (`--vfs-cache-mode writes`), each on its own bucket of one Garage server, all inside one
//! test-bed guest, user-mode-linux or qemu (tests/common/bed) (the kernel's NFS and FUSE clients, the daemons and Garage on the
//! guest's one CPU), with raw S3 (`s3nfs put` / `s3nfs cat`: one PUT, sequential 8 MiB GETs)
//! as the baseline. A peer that is not installed is skipped, and said so.
//!
//! Run: `cargo bench --bench peers` (needs the guest bed and Garage like the kernel-client
//! tests; `apt-get install s3fs rclone fio` for the peers and the random-I/O workloads).
//! Knobs: `S3NFS_PEERS_RUNS` (3: each figure is the median), `S3NFS_PEERS_BIG_MB` (256),
//! `S3NFS_PEERS_SMALL` (1000 files), `S3NFS_PEERS_FSYNC` (200 files),
//! `S3NFS_PEERS_SYSTEMS` ("s3nfs s3fs rclone"), `S3NFS_PEERS_ONLY_SMALL=1` (only the small
//! files, `rm -r` and untar: the metadata-heavy workloads, in a few minutes),
//! `S3NFS_PEERS_S3NFS_ARGS` (extra `s3nfs serve` flags, to try settings),
//! `S3NFS_PEERS_GARAGE_DB` (`lmdb`, Garage's default metadata engine; `sqlite`, which the tests
//! use, costs Garage about 2.5x the CPU per small PUT in this guest). Prints a table and writes
//! `target/peers.json`. Natively (not in a guest) the same script runs as root on any Linux host
//! with the NFS client and FUSE: `S3NFS_PEERS_PRINT_SCRIPT=1` prints it.

// The kernel-client tests' guest harness (their `super::` is this crate's root here).
#[allow(dead_code)]
#[path = "../tests/common/bed/mod.rs"]
mod bed;
#[allow(dead_code)]
#[path = "../tests/common/garage.rs"]
mod garage;
#[allow(dead_code)]
#[path = "../tests/common/guest.rs"]
mod guest;

use std::collections::BTreeMap;

use bed::{require_guest, run_guest, GuestOpts};
use guest::prelude;

/// The workloads, each run on $MNT of one system. Figures are reported as `KV <sys>_<name>=`
/// milliseconds (or MiB / seconds for rss and cpu).
const BODY: &str = r#"
M=/mnt/peer
mkdir -p $M /tmp/work
modprobe -d "$S3NFS_MODROOT" fuse 2>/dev/null
[ -e /dev/fuse ] || mknod /dev/fuse c 10 229
head -c $((BIG_MB << 20)) /dev/urandom >/tmp/work/big
DATA=$(head -c 4096 /dev/zero | tr '\0' x)
tar -C /usr/share/perl -cf /tmp/work/tree.tar 5.36.0 2>/dev/null
kv tree_files "$(tar -tf /tmp/work/tree.tar | grep -vc '/$')"
cat >/tmp/work/rclone.conf <<EOF
[g]
type = s3
provider = Other
endpoint = http://127.0.0.1:3900
region = garage
access_key_id = $AWS_ACCESS_KEY_ID
secret_access_key = $AWS_SECRET_ACCESS_KEY
EOF
printf '%s:%s\n' "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >/tmp/work/s3fs.passwd
chmod 600 /tmp/work/s3fs.passwd
raw() { $S3NFS "$1" --endpoint http://127.0.0.1:3900 --bucket "$2" --region garage "${@:3}"; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# in_s3 BUCKET PREFIX COUNT [SIZE]: until the bucket holds COUNT objects under PREFIX (or the
# object PREFIX of SIZE bytes). One polling process for the whole wait: in this guest a process
# start costs ~250 ms of the one CPU, and an `s3nfs ls` every 0.1 s took most of the CPU that the
# uploads being waited for needed.
cat >/tmp/work/s3wait.py <<'PY'
# s3wait.py BUCKET PREFIX COUNT [SIZE]: polls S3 (ListObjectsV2, SigV4 by hand: no boto3) every
# 0.1 s from one process, until BUCKET holds COUNT objects under PREFIX (the directory's own
# marker, PREFIX itself, not counted), or with SIZE the object PREFIX with SIZE bytes. One process for the whole wait: a process start per poll costs the guest's one CPU
# more than the uploads being waited for.
import datetime, hashlib, hmac, http.client, os, re, sys, time, urllib.parse

bucket, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
size = sys.argv[4] if len(sys.argv) > 4 else None
host, region = "127.0.0.1:3900", "garage"
akid, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
conn = http.client.HTTPConnection(host, timeout=30)

def hm(k, m):
    return hmac.new(k, m.encode(), hashlib.sha256).digest()

def get(query):
    now = datetime.datetime.now(datetime.timezone.utc)
    amz, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    q = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}" for k, v in sorted(query.items()))
    empty = hashlib.sha256(b"").hexdigest()
    creq = f"GET\n/{bucket}\n{q}\nhost:{host}\nx-amz-content-sha256:{empty}\nx-amz-date:{amz}\n\nhost;x-amz-content-sha256;x-amz-date\n{empty}"
    scope = f"{day}/{region}/s3/aws4_request"
    sts = f"AWS4-HMAC-SHA256\n{amz}\n{scope}\n{hashlib.sha256(creq.encode()).hexdigest()}"
    key = hm(hm(hm(hm(("AWS4" + secret).encode(), day), region), "s3"), "aws4_request")
    sig = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
    auth = f"AWS4-HMAC-SHA256 Credential={akid}/{scope}, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={sig}"
    conn.request("GET", f"/{bucket}?{q}", headers={"x-amz-date": amz, "x-amz-content-sha256": empty, "Authorization": auth})
    r = conn.getresponse()
    body = r.read().decode()
    if r.status != 200:
        raise RuntimeError(f"LIST {bucket}: {r.status} {body[:200]}")
    return body

def present():
    n, token = 0, None
    while True:
        query = {"list-type": "2", "prefix": prefix}
        if token:
            query["continuation-token"] = token
        body = get(query)
        for c in re.findall(r"<Contents>(.*?)</Contents>", body, re.S):
            key = re.search(r"<Key>(.*?)</Key>", c, re.S).group(1)
            if size is None:
                n += key != prefix
            else:
                n += key == prefix and re.search(r"<Size>(\d+)</Size>", c).group(1) == size
        m = re.search(r"<NextContinuationToken>(.*?)</NextContinuationToken>", body)
        if not m:
            return n
        token = m.group(1)

deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        if present() >= count:
            sys.exit(0)
    except (OSError, http.client.HTTPException):
        conn.close()
        conn = http.client.HTTPConnection(host, timeout=30)
    time.sleep(0.1)
print(f"s3wait {' '.join(sys.argv[1:])}: gave up after 300 s", file=sys.stderr)
sys.exit(1)
PY
in_s3() {
  python3 /tmp/work/s3wait.py "$@" && return 0
  echo "in_s3 $*: the bucket holds:"; raw ls "$1" --long | head -5
  return 1
}

mount_sys() { # SYSTEM BUCKET FRESH(1: fresh local state)
  case $1 in
    s3nfs)
      [ "$3" = 1 ] && rm -rf /tmp/work/s3nfs-state
      bg s3nfs-$2 $S3NFS serve --listen 127.0.0.1:2049 --endpoint http://127.0.0.1:3900 --bucket $2 --region garage --state-dir /tmp/work/s3nfs-state --flush-delay 2s $S3NFS_ARGS
      wait_port 2049 60 && nfs_mount 2049 $M
      echo $(bg_pid s3nfs-$2) >/tmp/work/daemon.pid ;;
    s3fs)
      s3fs $2 $M -o passwd_file=/tmp/work/s3fs.passwd,url=http://127.0.0.1:3900,endpoint=garage,use_path_request_style,f2 2>/dev/null
      for i in $(seq 1 100); do mountpoint -q $M && break; sleep 0.1; done
      pgrep -n s3fs >/tmp/work/daemon.pid ;;
    rclone)
      [ "$3" = 1 ] && rm -rf /tmp/work/rclone-cache
      env -u AWS_CA_BUNDLE rclone --config /tmp/work/rclone.conf mount g:$2 $M --vfs-cache-mode writes --cache-dir /tmp/work/rclone-cache --daemon
      for i in $(seq 1 100); do mountpoint -q $M && break; sleep 0.1; done
      pgrep -n rclone >/tmp/work/daemon.pid ;;
  esac
  mountpoint -q $M
}

umount_sys() { # SYSTEM BUCKET
  local p; p=$(cat /tmp/work/daemon.pid 2>/dev/null)
  if [ -n "$p" ] && [ -r /proc/$p/status ]; then
    kv ${1}_rss_kib "$(awk '/VmHWM/ {print $2}' /proc/$p/status)"
    kv ${1}_cpu_ticks "$(awk '{print $14 + $15}' /proc/$p/stat)"
  fi
  umount $M 2>/dev/null || umount -l $M
  case $1 in
    s3nfs) bg_kill s3nfs-$2 ;;
    *) [ -n "$p" ] && kill $p 2>/dev/null; for i in $(seq 1 100); do kill -0 $p 2>/dev/null || break; sleep 0.1; done ;;
  esac
}

run_sys() { # SYSTEM RUN
  local s=$1 b=b-$1-$2
  $GARAGE -c $GD/config.toml bucket create $b >/dev/null &&
    $GARAGE -c $GD/config.toml bucket allow --read --write --owner $b --key vol-key >/dev/null || return 1
  mount_sys $s $b 1 || { kv ${s}_mount failed; return 1; }
  local t0 t
  if [ -z "$ONLY_SMALL" ]; then
  t0=$(now_ms); dd if=/tmp/work/big of=$M/big bs=1M conv=fsync status=none; t=$(now_ms)
  kv ${s}_write_big_acked $(( t - t0 ))
  in_s3 $b big 1 $((BIG_MB << 20)) && kv ${s}_write_big_in_s3 $(( $(now_ms) - t0 ))
  fi
  mkdir $M/small
  t0=$(now_ms)
  for i in $(seq 1 $SMALL); do printf '%s' "$DATA" >$M/small/f$i; done
  kv ${s}_small_written $(( $(now_ms) - t0 ))
  in_s3 $b small/ $SMALL && kv ${s}_small_in_s3 $(( $(now_ms) - t0 ))
  if [ -n "$ONLY_SMALL" ]; then
    t0=$(now_ms); rm -r $M/small; kv ${s}_rm_r $(( $(now_ms) - t0 ))
    mkdir $M/untar
    t0=$(now_ms); tar -C $M/untar -xf /tmp/work/tree.tar; kv ${s}_untar $(( $(now_ms) - t0 ))
    umount_sys $s $b
    return 0
  fi
  umount_sys $s $b
  # Cold: a fresh daemon and no client cache.
  drop; mount_sys $s $b 1 || return 1
  t0=$(now_ms); cat $M/big >/dev/null; kv ${s}_read_big $(( $(now_ms) - t0 ))
  drop; t0=$(now_ms); ls -l $M/small >/dev/null; kv ${s}_ls_l $(( $(now_ms) - t0 ))
  drop; t0=$(now_ms); stat $M/small/* >/dev/null; kv ${s}_stat_all $(( $(now_ms) - t0 ))
  drop; t0=$(now_ms); cat $M/small/* >/dev/null; kv ${s}_read_small $(( $(now_ms) - t0 ))
  t0=$(now_ms); mv $M/small $M/small2; kv ${s}_mv_dir $(( $(now_ms) - t0 ))
  t0=$(now_ms); rm -r $M/small2; kv ${s}_rm_r $(( $(now_ms) - t0 ))
  mkdir $M/untar
  t0=$(now_ms); tar -C $M/untar -xf /tmp/work/tree.tar; kv ${s}_untar $(( $(now_ms) - t0 ))
  if command -v fio >/dev/null; then
    t0=$(now_ms)
    fio --name=fsynced --directory=$M --nrfiles=$FSYNC --filesize=4k --bs=4k --rw=write --fsync=1 \
        --ioengine=psync --numjobs=1 --create_on_open=1 >/dev/null 2>&1 && kv ${s}_fsync_small $(( $(now_ms) - t0 ))
    t0=$(now_ms)
    fio --name=rand --filename=$M/big --rw=randrw --bs=4k --size=$((BIG_MB))M --io_size=4M \
        --ioengine=psync --randrepeat=1 --fsync_on_close=1 >/dev/null 2>&1 && kv ${s}_rand_4k $(( $(now_ms) - t0 ))
  fi
  umount_sys $s $b
}

# Raw S3: the same bytes with one PUT, read back with sequential 8 MiB GETs.
$GARAGE -c $GD/config.toml bucket create b-raw >/dev/null
$GARAGE -c $GD/config.toml bucket allow --read --write --owner b-raw --key vol-key >/dev/null
for r in $(seq 1 $RUNS); do
  t0=$(now_ms); raw put b-raw big$r /tmp/work/big && kv raw_write_big $(( $(now_ms) - t0 ))
  drop; t0=$(now_ms); raw cat b-raw big$r >/dev/null && kv raw_read_big $(( $(now_ms) - t0 ))
  for s in $SYSTEMS; do
    case $s in
      s3fs|rclone) command -v $s >/dev/null || { kv ${s}_missing 1; continue; } ;;
    esac
    run_sys $s $r
  done
done
"#;

/// (figure key, what it is, lower is better).
const FIGURES: &[(&str, &str)] = &[
    ("write_big_in_s3", "write BIG, until the object is in S3"),
    ("write_big_acked", "write BIG, acknowledged (fsync)"),
    ("read_big", "cold read of BIG"),
    ("small_written", "SMALL files of 4 KiB, written and closed"),
    ("small_in_s3", "... until all are in S3"),
    ("ls_l", "`ls -l` of them (caches dropped)"),
    ("stat_all", "`stat` of each (caches dropped)"),
    ("read_small", "read them all back (caches dropped)"),
    ("mv_dir", "`mv` of the directory"),
    ("rm_r", "`rm -r` of it"),
    ("untar", "untar of TREE files (a Perl library, 21 MB)"),
    ("fsync_small", "FSYNC files of 4 KiB, each fsync'd"),
    ("rand_4k", "random 4 KiB reads and writes, 4 MiB in BIG"),
];

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Some(v[v.len() / 2])
}

fn main() {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let runs: usize = env("S3NFS_PEERS_RUNS", "3").parse().unwrap();
    let big_mb: u64 = env("S3NFS_PEERS_BIG_MB", "256").parse().unwrap();
    let small: u64 = env("S3NFS_PEERS_SMALL", "1000").parse().unwrap();
    let fsync: u64 = env("S3NFS_PEERS_FSYNC", "200").parse().unwrap();
    let systems = env("S3NFS_PEERS_SYSTEMS", "s3nfs s3fs rclone");
    let only_small = env("S3NFS_PEERS_ONLY_SMALL", "");
    let s3nfs_args = env("S3NFS_PEERS_S3NFS_ARGS", "");
    let garage_db = env("S3NFS_PEERS_GARAGE_DB", "lmdb");
    let script = format!(
        "RUNS={runs}\nBIG_MB={big_mb}\nSMALL={small}\nFSYNC={fsync}\nSYSTEMS='{systems}'\n\
         ONLY_SMALL='{only_small}'\nS3NFS_ARGS='{s3nfs_args}'\nGARAGE_DB='{garage_db}'\n{}{BODY}",
        prelude()
    );
    if std::env::var_os("S3NFS_PEERS_PRINT_SCRIPT").is_some() {
        println!("{script}");
        return;
    }
    if !require_guest("peers") {
        return;
    }
    let out = run_guest(
        &script,
        &GuestOpts::default()
            .mem("2G")
            .timeout_secs(6 * 3600)
            .env("S3NFS_PEERS", "1"),
    );
    out.assert_finished();
    // Every value, per key, across runs.
    let mut values: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for line in out.console.lines() {
        let Some(rest) = line.split("KV ").nth(1) else { continue };
        let Some((k, v)) = rest.split_once('=') else { continue };
        if let Ok(v) = v.trim().parse::<f64>() {
            values.entry(k.to_string()).or_default().push(v);
        }
    }
    let med = |k: &str| values.get(k).cloned().and_then(|mut v| median(&mut v));
    let sys: Vec<&str> = systems.split_whitespace().collect();
    let tree = med("tree_files").unwrap_or(0.0) as u64;
    // JSON by hand: numbers and nulls only.
    let num = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v}"));
    let mut json: Vec<String> = Vec::new();
    let mut table = format!(
        "| workload | raw S3 | {} | s3nfs / raw | s3nfs / best peer |\n|---|---|{}---|---|\n",
        sys.join(" | "),
        "---|".repeat(sys.len())
    );
    let secs = |ms: Option<f64>| ms.map_or("—".to_string(), |v| format!("{:.2} s", v / 1000.0));
    for (key, what) in FIGURES {
        let what = what
            .replace("BIG", &format!("{big_mb} MiB"))
            .replace("SMALL", &small.to_string())
            .replace("FSYNC", &fsync.to_string())
            .replace("TREE", &tree.to_string());
        let raw = match *key {
            "write_big_in_s3" => med("raw_write_big"),
            "read_big" => med("raw_read_big"),
            _ => None,
        };
        let per: Vec<Option<f64>> = sys.iter().map(|s| med(&format!("{s}_{key}"))).collect();
        let ours = sys.iter().position(|s| *s == "s3nfs").and_then(|i| per[i]);
        let best_peer = sys
            .iter()
            .zip(&per)
            .filter(|(s, _)| **s != "s3nfs")
            .filter_map(|(_, v)| *v)
            .fold(None, |b: Option<f64>, v| Some(b.map_or(v, |b| b.min(v))));
        // Times: a ratio above 1 means s3nfs is faster.
        let ratio = |base: Option<f64>| match (ours, base) {
            (Some(o), Some(b)) if o > 0.0 => format!("{:.2}x", b / o),
            _ => "—".into(),
        };
        table.push_str(&format!(
            "| {what} | {} | {} | {} | {} |\n",
            secs(raw),
            per.iter().map(|v| secs(*v)).collect::<Vec<_>>().join(" | "),
            ratio(raw),
            ratio(best_peer)
        ));
        let mut row = vec![format!("\"raw_ms\": {}", num(raw))];
        for (s, v) in sys.iter().zip(&per) {
            row.push(format!("\"{s}_ms\": {}", num(*v)));
        }
        json.push(format!("  \"{key}\": {{{}}}", row.join(", ")));
    }
    for s in &sys {
        if values.contains_key(&format!("{s}_missing")) {
            table.push_str(&format!("\n{s}: not installed, skipped\n"));
            continue;
        }
        let rss = values
            .get(&format!("{s}_rss_kib"))
            .map(|v| v.iter().cloned().fold(0.0, f64::max) / 1024.0);
        let cpu = values
            .get(&format!("{s}_cpu_ticks"))
            .map(|v| v.iter().sum::<f64>() / 100.0 / runs as f64);
        table.push_str(&format!(
            "\n{s}: peak RSS {} MiB, daemon CPU {} s per run",
            rss.map_or("—".into(), |v| format!("{v:.1}")),
            cpu.map_or("—".into(), |v| format!("{v:.1}"))
        ));
        json.push(format!("  \"{s}_peak_rss_mib\": {}", num(rss)));
        json.push(format!("  \"{s}_cpu_s_per_run\": {}", num(cpu)));
    }
    // Figures from different backends are not comparable (TCG emulates every instruction).
    let backend = out.backend.map_or("?", |b| b.name());
    json.push(format!("  \"backend\": \"{backend}\""));
    println!(
        "\n{table}\n\n(median of {runs} runs; one {backend} guest, one virtual CPU for everything; \
         Garage on {garage_db}; compare only with figures from a {backend} guest)"
    );
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/target/peers.json");
    std::fs::write(path, format!("{{\n{}\n}}\n", json.join(",\n"))).unwrap();
    println!("figures: {path}");
}
