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
//! `S3NFS_PEERS_APPS=1` (applications instead: PostgreSQL's pgbench, Redis with its
//! append-only file, git and cargo, or a list of some of `pg redis git cargo`, on "local s3nfs s3fs rclone", where local is the guest's own
//! tmpfs; `S3NFS_PEERS_PG_SCALE` (10), `S3NFS_PEERS_PG_SECONDS` (60: `pgbench -c 4 -T 60`),
//! `S3NFS_PEERS_PG_STRACE=1` (the gateway's system calls during pgbench, by kind, under `strace -f -c`),
//! `S3NFS_PEERS_REDIS_N` (100000); `apt-get install postgresql redis-server git`),
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
[ -z "$APPS" ] && head -c $((BIG_MB << 20)) /dev/urandom >/tmp/work/big
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
    with open("/tmp/work/polls", "a") as f:
        f.write("1\n")  # s3count.py takes this LIST out of the workload's requests
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
cat >/tmp/work/s3count.py <<'PY'
# s3count.py mark | s3count.py settle: S3 requests by kind, as Garage counts them (its metrics,
# api_s3_request_counter by api_endpoint). `mark` records the counts; `settle` waits until no
# request has arrived for QUIET seconds (a daemon may still be uploading or deleting in the
# background), prints the requests since the mark by kind, less s3wait.py's own LISTs, and marks.
import http.client, json, os, re, sys, time

QUIET = float(os.environ.get("S3_QUIET", "6"))
state, polls = "/tmp/work/s3count.json", "/tmp/work/polls"
token = open(os.environ["GD"] + "/metrics_token").read().strip()

def counts():
    c = http.client.HTTPConnection("127.0.0.1:3903", timeout=30)
    c.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
    body = c.getresponse().read().decode()
    out = {}
    for m in re.finditer(r'^api_s3_request_counter\{([^}]*)\} (\S+)$', body, re.M):
        kind = re.search(r'api_endpoint="([^"]*)"', m.group(1))
        if kind:
            out[kind.group(1)] = out.get(kind.group(1), 0) + int(float(m.group(2)))
    return out

if sys.argv[1] == "settle":
    now, since = counts(), time.monotonic()
    deadline = since + 300
    while time.monotonic() - since < QUIET and time.monotonic() < deadline:
        time.sleep(0.5)
        c = counts()
        if c != now:
            now, since = c, time.monotonic()
    before = json.load(open(state))
    delta = {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0) > 0}
    if os.path.exists(polls):
        n = sum(int(x) for x in open(polls).read().split())
        os.remove(polls)
        delta["ListObjectsV2"] = delta.get("ListObjectsV2", 0) - n
        if delta["ListObjectsV2"] <= 0:
            del delta["ListObjectsV2"]
    print(" ".join(f"{k}:{v}" for k, v in sorted(delta.items())) or "none")
else:
    now = counts()
    if os.path.exists(polls):
        os.remove(polls)
json.dump(now, open(state, "w"))
PY
# req SYSTEM NAME: the S3 requests of the workload NAME just done (see s3count.py).
req() { [ "$1" = local ] || kv "${1}_req_$2" "$(GD=$GD python3 /tmp/work/s3count.py settle)"; }
s3mark() { GD=$GD python3 /tmp/work/s3count.py mark; }
in_s3() {
  python3 /tmp/work/s3wait.py "$@" && return 0
  echo "in_s3 $*: the bucket holds:"; raw ls "$1" --long | head -5
  return 1
}

mount_sys() { # SYSTEM BUCKET FRESH(1: fresh local state)
  case $1 in
    local)
      # The guest's own disk (its tmpfs), bound on $M so that the workloads see one path.
      mkdir -p /tmp/work/local-$2 && mount --bind /tmp/work/local-$2 $M
      echo >/tmp/work/daemon.pid ;;
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

# cpu_ticks: the daemon's CPU so far, in ticks of 10 ms (0 for local, which has none).
cpu_ticks() { awk '{print $14 + $15}' /proc/$(cat /tmp/work/daemon.pid)/stat 2>/dev/null || echo 0; }
umount_sys() { # SYSTEM BUCKET
  local p; p=$(cat /tmp/work/daemon.pid 2>/dev/null)
  if [ -n "$p" ] && [ -r /proc/$p/status ]; then
    kv ${1}_rss_kib "$(awk '/VmHWM/ {print $2}' /proc/$p/status)"
    kv ${1}_cpu_ticks "$(cpu_ticks)"
  fi
  umount $M 2>/dev/null || umount -l $M
  case $1 in
    s3nfs) bg_kill s3nfs-$2 ;;
    *) [ -n "$p" ] && kill $p 2>/dev/null; for i in $(seq 1 100); do kill -0 $p 2>/dev/null || break; sleep 0.1; done ;;
  esac
}

# run_apps SYSTEM: applications on $M (Debian's postgresql, redis-server, git; rustc from the
# host's toolchain). Each figure is a time: a fixed amount of work, so that lower is better
# throughout the table.
# want APP: whether S3NFS_PEERS_APPS (1, or a list of pg redis git cargo) asks for APP.
want() { [ "$APPS" = 1 ] || case " $APPS " in *" $1 "*) true ;; *) false ;; esac; }
# nfs_calls: the NFSv3 client's calls so far, by procedure (RFC 1813 order, from
# /proc/net/rpc/nfs); nfs_delta BEFORE: the calls since BEFORE that were made, as NAME:COUNT.
nfs_calls() { awk '$1 == "proc3" { for (i = 3; i <= NF; i++) printf "%s ", $i }' /proc/net/rpc/nfs 2>/dev/null; }
nfs_delta() {
  local now; now=$(nfs_calls)
  python3 -c '
import sys
names = "NULL GETATTR SETATTR LOOKUP ACCESS READLINK READ WRITE CREATE MKDIR SYMLINK MKNOD REMOVE RMDIR RENAME LINK READDIR READDIRPLUS FSSTAT FSINFO PATHCONF COMMIT".split()
a, b = [list(map(int, x.split())) for x in sys.argv[1:3]]
print(" ".join(f"{n}:{y - x}" for n, x, y in zip(names, a, b) if y > x) or "none")' "$1" "$now"
}
as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups env HOME=/tmp "$@"; }
run_apps() {
  local s=$1 t0 PGBIN
  PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  if want pg && [ -x "$PGBIN/initdb" ]; then
    mkdir $M/pg && chown postgres:postgres $M/pg && chmod 700 $M/pg
    touch /run/logs/pg-$s.log && chown postgres /run/logs/pg-$s.log
    t0=$(now_ms); c0=$(nfs_calls); k0=$(cpu_ticks)
    if as_pg $PGBIN/initdb -D $M/pg --locale=C -E UTF8 -U postgres --no-instructions >/run/logs/initdb-$s.log 2>&1 &&
       { [ $s != s3nfs ] || kv ${s}_nfs_initdb "$(nfs_delta "$c0"); gateway CPU $(( $(cpu_ticks) - k0 ))0 ms"; } &&
       printf "listen_addresses = ''\nunix_socket_directories = '/tmp'\nshared_buffers = 64MB\n" | as_pg sh -c "cat >>$M/pg/postgresql.conf" &&
       as_pg $PGBIN/pg_ctl -D $M/pg -l /run/logs/pg-$s.log -w -t 3600 start >/dev/null &&
       c0=$(nfs_calls) && k0=$(cpu_ticks) &&
       as_pg $PGBIN/pgbench -h /tmp -i -q -s $PG_SCALE postgres >/run/logs/pgbench-$s.log 2>&1 &&
       { [ $s != s3nfs ] || kv ${s}_nfs_pgbench_init "$(nfs_delta "$c0"); gateway CPU $(( $(cpu_ticks) - k0 ))0 ms"; }; then
      kv ${s}_pg_init $(( $(now_ms) - t0 ))
      req $s pg_init
      t0=$(now_ms); c0=$(nfs_calls); k0=$(cpu_ticks)
      # A fixed time, as users run it; the figure is its TPS as milliseconds per 1,000
      # transactions, so that it compares like the other figures (lower is better).
      # S3NFS_PEERS_PG_STRACE=1: the gateway's system calls during the run, by kind.
      [ -n "$PG_STRACE" ] && [ $s = s3nfs ] &&
        { strace -f -c -p $(cat /tmp/work/daemon.pid) -o /run/logs/strace-$s.txt & echo $! >/tmp/work/strace.pid; sleep 1; }
      as_pg $PGBIN/pgbench -h /tmp -c 4 -j 4 -T $PG_SECONDS postgres >/run/logs/pgbench-run-$s.log 2>&1 &&
        tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' /run/logs/pgbench-run-$s.log | head -1) && [ -n "$tps" ] &&
        kv ${s}_pgbench_tps "$tps" &&
        kv ${s}_pgbench "$(python3 -c "print(round(1e6 / $tps, 1))")"
      cat /run/logs/pgbench-run-$s.log >>/run/logs/pgbench-$s.log
      [ $s = s3nfs ] && kv ${s}_nfs_pgbench "$(nfs_delta "$c0"); gateway CPU $(( $(cpu_ticks) - k0 ))0 ms"
      if [ -n "$PG_STRACE" ] && [ $s = s3nfs ]; then
        kill -INT $(cat /tmp/work/strace.pid); wait $(cat /tmp/work/strace.pid)
        kv ${s}_nfs_pgbench_syscalls "$(awk '$1 ~ /^[0-9.]+$/ && $NF != "total" {print $4, $NF}' /run/logs/strace-$s.txt | sort -rn | head -20 | awk '{printf "%s:%s ", $2, $1}')"
      fi
      req $s pgbench
      as_pg $PGBIN/pg_ctl -D $M/pg -w -t 3600 -m fast stop >/dev/null
    else
      kv ${s}_pg_error "$(tail -n 3 /run/logs/initdb-$s.log /run/logs/pg-$s.log /run/logs/pgbench-$s.log 2>/dev/null | tr '\n' ' ' | cut -c1-300)"
      as_pg $PGBIN/pg_ctl -D $M/pg -w -m immediate stop >/dev/null 2>&1
    fi
  fi
  if want redis && command -v redis-server >/dev/null; then
    mkdir $M/redis
    bg redis-$s redis-server --port 6379 --bind 127.0.0.1 --dir $M/redis --appendonly yes --appendfsync everysec --save '' --daemonize no
    if wait_port 6379 120; then
      t0=$(now_ms)
      redis-benchmark -q -t set -n $REDIS_N -r 100000 >/dev/null 2>&1 && kv ${s}_redis_set $(( $(now_ms) - t0 ))
      req $s redis_set
      redis-cli shutdown >/dev/null 2>&1
    else
      kv ${s}_redis_error "$(tail -n 3 /run/logs/redis-$s.log | tr '\n' ' ')"
    fi
    bg_kill redis-$s
  fi
  if want git && command -v git >/dev/null; then
    export HOME=/tmp GIT_CONFIG_NOSYSTEM=1
    git config --global --add safe.directory '*'
    t0=$(now_ms); git clone -q --no-hardlinks "$REPO" $M/repo && kv ${s}_git_clone $(( $(now_ms) - t0 ))
    req $s git_clone
    drop; t0=$(now_ms); git -C $M/repo status --porcelain >/dev/null && kv ${s}_git_status $(( $(now_ms) - t0 ))
    req $s git_status
    t0=$(now_ms); git -C $M/repo gc -q --aggressive && kv ${s}_git_gc $(( $(now_ms) - t0 ))
    req $s git_gc
  fi
  if want cargo && [ -x "$CARGO" ]; then
    # A crate of one file, built from nothing: rustc and the linker write into target/ on $M.
    mkdir -p $M/hello/src && printf '[package]\nname = "hello"\nversion = "0.1.0"\nedition = "2021"\n' >$M/hello/Cargo.toml
    printf 'fn main() {\n    let v: Vec<u64> = (1..=10).collect();\n    println!("{}", v.iter().sum::<u64>());\n}\n' >$M/hello/src/main.rs
    t0=$(now_ms)
    RUSTC=${CARGO%/cargo}/rustc CARGO_HOME=/tmp/work/cargo-home $CARGO build -q --offline --manifest-path $M/hello/Cargo.toml >/run/logs/cargo-$s.log 2>&1 &&
      kv ${s}_cargo_build $(( $(now_ms) - t0 ))
    req $s cargo_build
  fi
}

run_sys() { # SYSTEM RUN
  local s=$1 b=b-$1-$2
  $GARAGE -c $GD/config.toml bucket create $b >/dev/null &&
    $GARAGE -c $GD/config.toml bucket allow --read --write --owner $b --key vol-key >/dev/null || return 1
  mount_sys $s $b 1 || { kv ${s}_mount failed; return 1; }
  s3mark
  local t0 t
  if [ -n "$APPS" ]; then
    run_apps $s
    umount_sys $s $b
    return 0
  fi
  if [ -z "$ONLY_SMALL" ]; then
  t0=$(now_ms); dd if=/tmp/work/big of=$M/big bs=1M conv=fsync status=none; t=$(now_ms)
  kv ${s}_write_big_acked $(( t - t0 ))
  in_s3 $b big 1 $((BIG_MB << 20)) && kv ${s}_write_big_in_s3 $(( $(now_ms) - t0 ))
  req $s write_big_in_s3
  fi
  mkdir $M/small
  t0=$(now_ms)
  for i in $(seq 1 $SMALL); do printf '%s' "$DATA" >$M/small/f$i; done
  kv ${s}_small_written $(( $(now_ms) - t0 ))
  in_s3 $b small/ $SMALL && kv ${s}_small_in_s3 $(( $(now_ms) - t0 ))
  req $s small_in_s3
  if [ -n "$ONLY_SMALL" ]; then
    t0=$(now_ms); rm -r $M/small; kv ${s}_rm_r $(( $(now_ms) - t0 ))
    req $s rm_r
    mkdir $M/untar
    t0=$(now_ms); tar -C $M/untar -xf /tmp/work/tree.tar; kv ${s}_untar $(( $(now_ms) - t0 ))
    req $s untar
    umount_sys $s $b
    return 0
  fi
  umount_sys $s $b
  # Cold: a fresh daemon and no client cache.
  drop; mount_sys $s $b 1 || return 1
  s3mark
  t0=$(now_ms); cat $M/big >/dev/null; kv ${s}_read_big $(( $(now_ms) - t0 ))
  req $s read_big
  drop; t0=$(now_ms); ls -l $M/small >/dev/null; kv ${s}_ls_l $(( $(now_ms) - t0 ))
  req $s ls_l
  drop; t0=$(now_ms); stat $M/small/* >/dev/null; kv ${s}_stat_all $(( $(now_ms) - t0 ))
  req $s stat_all
  drop; t0=$(now_ms); cat $M/small/* >/dev/null; kv ${s}_read_small $(( $(now_ms) - t0 ))
  req $s read_small
  t0=$(now_ms); mv $M/small $M/small2; kv ${s}_mv_dir $(( $(now_ms) - t0 ))
  req $s mv_dir
  t0=$(now_ms); rm -r $M/small2; kv ${s}_rm_r $(( $(now_ms) - t0 ))
  req $s rm_r
  mkdir $M/untar
  t0=$(now_ms); tar -C $M/untar -xf /tmp/work/tree.tar; kv ${s}_untar $(( $(now_ms) - t0 ))
  req $s untar
  if command -v fio >/dev/null; then
    t0=$(now_ms)
    fio --name=fsynced --directory=$M --nrfiles=$FSYNC --filesize=4k --bs=4k --rw=write --fsync=1 \
        --ioengine=psync --numjobs=1 --create_on_open=1 >/dev/null 2>&1 && kv ${s}_fsync_small $(( $(now_ms) - t0 ))
    req $s fsync_small
    t0=$(now_ms)
    fio --name=rand --filename=$M/big --rw=randrw --bs=4k --size=$((BIG_MB))M --io_size=4M \
        --ioengine=psync --randrepeat=1 --fsync_on_close=1 >/dev/null 2>&1 && kv ${s}_rand_4k $(( $(now_ms) - t0 ))
    req $s rand_4k
  fi
  umount_sys $s $b
}

# Raw S3: the same bytes with one PUT, read back with sequential 8 MiB GETs.
$GARAGE -c $GD/config.toml bucket create b-raw >/dev/null
$GARAGE -c $GD/config.toml bucket allow --read --write --owner b-raw --key vol-key >/dev/null
for r in $(seq 1 $RUNS); do
  if [ -z "$APPS" ]; then
  t0=$(now_ms); raw put b-raw big$r /tmp/work/big && kv raw_write_big $(( $(now_ms) - t0 ))
  drop; t0=$(now_ms); raw cat b-raw big$r >/dev/null && kv raw_read_big $(( $(now_ms) - t0 ))
  fi
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
    ("pg_init", "PostgreSQL: initdb, start, `pgbench -i -s PG_SCALE`"),
    (
        "pgbench",
        "`pgbench -c 4 -T PG_SECONDS` (TPC-B): time per 1,000 transactions (1,000 / TPS)",
    ),
    (
        "redis_set",
        "Redis, AOF fsync'd every second: `redis-benchmark -t set -n REDIS_N`",
    ),
    ("git_clone", "`git clone` of this repository"),
    ("git_status", "`git status` (caches dropped)"),
    ("git_gc", "`git gc --aggressive`"),
    ("cargo_build", "`cargo build` of a one-file crate"),
];

/// Every `KV key=value` line of the guest's console, in order (a key once per run).
fn kvs(console: &str) -> impl Iterator<Item = (&str, &str)> {
    console
        .lines()
        .filter_map(|line| line.split("KV ").nth(1))
        .filter_map(|rest| rest.split_once('='))
}

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
    let apps = env("S3NFS_PEERS_APPS", "");
    let systems = if apps.is_empty() {
        systems
    } else {
        env("S3NFS_PEERS_SYSTEMS", "local s3nfs s3fs rclone")
    };
    let pg_scale: u64 = env("S3NFS_PEERS_PG_SCALE", "10").parse().unwrap();
    let pg_seconds: u64 = env("S3NFS_PEERS_PG_SECONDS", "60").parse().unwrap();
    let pg_strace = env("S3NFS_PEERS_PG_STRACE", "");
    let redis_n: u64 = env("S3NFS_PEERS_REDIS_N", "100000").parse().unwrap();
    // The crate under test's repository, and the real cargo behind rustup's proxy (the guest
    // cannot write rustup's home).
    let repo = bed::guest_path(concat!(env!("CARGO_MANIFEST_DIR"), "/.git"));
    let cargo = std::process::Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| format!("{}/bin/cargo", String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_default();
    let script = format!(
        "RUNS={runs}\nBIG_MB={big_mb}\nSMALL={small}\nFSYNC={fsync}\nSYSTEMS='{systems}'\n\
         ONLY_SMALL='{only_small}'\nS3NFS_ARGS='{s3nfs_args}'\nGARAGE_DB='{garage_db}'\n\
         APPS='{apps}'\nPG_SCALE={pg_scale}\nPG_SECONDS={pg_seconds}\nPG_STRACE='{pg_strace}'\nREDIS_N={redis_n}\nREPO={}\nCARGO={}\n{}{BODY}",
        bed::sh_quote(&repo),
        bed::sh_quote(&bed::guest_path(&cargo)),
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
    for (k, v) in kvs(&out.console) {
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
        "| workload | raw S3 | {} | s3nfs / raw | s3nfs / local | s3nfs / best peer |\n|---|---|{}---|---|---|\n",
        sys.join(" | "),
        "---|".repeat(sys.len())
    );
    let secs = |ms: Option<f64>| ms.map_or("—".to_string(), |v| format!("{:.2} s", v / 1000.0));
    let label = |what: &str| {
        what.replace("BIG", &format!("{big_mb} MiB"))
            .replace("SMALL", &small.to_string())
            .replace("FSYNC", &fsync.to_string())
            .replace("TREE", &tree.to_string())
            .replace("PG_SCALE", &pg_scale.to_string())
            .replace("PG_SECONDS", &pg_seconds.to_string())
            .replace("REDIS_N", &redis_n.to_string())
    };
    for (key, what) in FIGURES {
        let what = label(what);
        let raw = match *key {
            "write_big_in_s3" => med("raw_write_big"),
            "read_big" => med("raw_read_big"),
            _ => None,
        };
        let per: Vec<Option<f64>> = sys.iter().map(|s| med(&format!("{s}_{key}"))).collect();
        if raw.is_none() && per.iter().all(Option::is_none) {
            continue; // a workload of the other set (S3NFS_PEERS_APPS)
        }
        let ours = sys.iter().position(|s| *s == "s3nfs").and_then(|i| per[i]);
        let local = sys.iter().position(|s| *s == "local").and_then(|i| per[i]);
        let best_peer = sys
            .iter()
            .zip(&per)
            .filter(|(s, _)| **s != "s3nfs" && **s != "local")
            .filter_map(|(_, v)| *v)
            .fold(None, |b: Option<f64>, v| Some(b.map_or(v, |b| b.min(v))));
        // Times: a ratio above 1 means s3nfs is faster.
        let ratio = |base: Option<f64>| match (ours, base) {
            (Some(o), Some(b)) if o > 0.0 => format!("{:.2}x", b / o),
            _ => "—".into(),
        };
        table.push_str(&format!(
            "| {what} | {} | {} | {} | {} | {} |\n",
            secs(raw),
            per.iter().map(|v| secs(*v)).collect::<Vec<_>>().join(" | "),
            ratio(raw),
            ratio(local),
            ratio(best_peer)
        ));
        let mut row = vec![format!("\"raw_ms\": {}", num(raw))];
        for (s, v) in sys.iter().zip(&per) {
            row.push(format!("\"{s}_ms\": {}", num(*v)));
        }
        json.push(format!("  \"{key}\": {{{}}}", row.join(", ")));
    }
    // S3 requests by kind per workload (Garage's count, see s3count.py): what a user pays for.
    let mut reqs: BTreeMap<String, Vec<BTreeMap<String, u64>>> = BTreeMap::new();
    for (k, v) in kvs(&out.console) {
        if !k.contains("_req_") {
            continue;
        }
        let kinds = v
            .split_whitespace()
            .filter_map(|kv| kv.split_once(':'))
            .filter_map(|(kind, n)| Some((kind.to_string(), n.parse().ok()?)))
            .collect();
        reqs.entry(k.to_string()).or_default().push(kinds);
    }
    // The run with the median total, by kind.
    let median_req = |k: &str| -> Option<BTreeMap<String, u64>> {
        let mut runs = reqs.get(k)?.clone();
        runs.sort_by_key(|r| r.values().sum::<u64>());
        Some(runs[runs.len() / 2].clone())
    };
    let peers: Vec<&str> = sys.iter().copied().filter(|s| *s != "local").collect();
    let mut req_table = format!(
        "| S3 requests | {} | s3nfs / fewest of the peers |\n|---|{}---|\n",
        peers.join(" | "),
        "---|".repeat(peers.len())
    );
    for (key, what) in FIGURES {
        let per: Vec<Option<BTreeMap<String, u64>>> =
            peers.iter().map(|s| median_req(&format!("{s}_req_{key}"))).collect();
        if per.iter().all(Option::is_none) {
            continue;
        }
        let total = |r: &Option<BTreeMap<String, u64>>| r.as_ref().map(|r| r.values().sum::<u64>());
        let cell = |r: &Option<BTreeMap<String, u64>>| match r {
            None => "—".to_string(),
            Some(r) if r.is_empty() => "0".to_string(),
            Some(r) => format!(
                "{} ({})",
                r.values().sum::<u64>(),
                r.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
            ),
        };
        let ours = peers.iter().position(|s| *s == "s3nfs").and_then(|i| total(&per[i]));
        let fewest = peers
            .iter()
            .zip(&per)
            .filter(|(s, _)| **s != "s3nfs")
            .filter_map(|(_, r)| total(r))
            .min();
        let ratio = match (ours, fewest) {
            (Some(o), Some(f)) if f > 0 => format!("{:.2}x", o as f64 / f as f64),
            (Some(0), Some(0)) => "1.00x".into(),
            _ => "—".into(),
        };
        let what = label(what);
        req_table.push_str(&format!(
            "| {what} | {} | {ratio} |\n",
            per.iter().map(cell).collect::<Vec<_>>().join(" | ")
        ));
        for (s, r) in peers.iter().zip(&per) {
            json.push(format!("  \"{s}_requests_{key}\": {}", num(total(r).map(|t| t as f64))));
        }
    }
    table.push_str(&format!("\n{req_table}"));
    // pgbench's own figure, beside the time per 1,000 transactions derived from it.
    for s in &sys {
        if let Some(tps) = med(&format!("{s}_pgbench_tps")) {
            table.push_str(&format!("\npgbench TPS, {s}: {tps:.1}"));
        }
    }
    // An application that could not run on a system says why (the first lines of its error).
    for (k, v) in kvs(&out.console).filter(|(k, _)| k.ends_with("_error")) {
        table.push_str(&format!("\n{k}: {}", v.trim()));
    }
    // The NFS calls the kernel client made for a workload (from its own counters), per run.
    for (k, v) in kvs(&out.console).filter(|(k, _)| k.contains("_nfs_")) {
        table.push_str(&format!("\nNFS calls, {k}: {}", v.trim()));
    }
    for s in &sys {
        if *s == "local" {
            continue;
        }
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
