//! Gateway binaries side by side in one test-bed guest: for a change whose effect is smaller
//! than what separates two runs on a shared machine (the host's load moves a user-mode-linux
//! guest's system calls from 60 to 130 µs), each round runs every binary and the guest's own
//! tmpfs one after the other, and the figures compare within the round.
//!
//! Workloads (`S3NFS_AB_WORKLOAD`):
//! - `dsync` (the default): `dd` of 8 KiB blocks with `oflag=dsync` into a 16 MiB file, as
//!   PostgreSQL writes its log (each block one FILE_SYNC WRITE); `S3NFS_AB_N` blocks (3000);
//! - `pg`: `initdb`, `pgbench -i -s 10`, then `pgbench -c 4 -j 4 -T S3NFS_AB_PG_SECONDS` (30).
//!
//! Each gateway serves the embedded store (no S3: what is measured is the NFS path), with
//! uploads held off for `dsync`. `S3NFS_AB_BINS`: the binaries, as paths the guest sees (the
//! host's root, with its own /tmp: e.g. copies under `target/ab/`); by default this build's
//! `s3nfs` alone. `S3NFS_AB_ROUNDS` (3). Prints every round and the medians: time (dsync) or
//! TPS (pg), the gateway's CPU per operation or per transaction, and the ratio to tmpfs.
//!
//! Run: `mkdir -p target/ab && cp <old build> target/ab/s3nfs-a && cargo build --release &&
//! cp target/release/s3nfs target/ab/s3nfs-b && S3NFS_AB_BINS="$PWD/target/ab/s3nfs-a
//! $PWD/target/ab/s3nfs-b" cargo bench --bench ab` (`S3NFS_AB_WORKLOAD=pg` needs
//! `apt-get install postgresql`).

#[allow(dead_code)]
#[path = "../tests/common/bed/mod.rs"]
mod bed;

use std::collections::BTreeMap;

fn main() {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let workload = env("S3NFS_AB_WORKLOAD", "dsync");
    let bins = env("S3NFS_AB_BINS", &bed::s3nfs_bin().display().to_string());
    let rounds: usize = env("S3NFS_AB_ROUNDS", "3").parse().expect("S3NFS_AB_ROUNDS");
    let n: u64 = env("S3NFS_AB_N", "3000").parse().expect("S3NFS_AB_N");
    let secs: u64 = env("S3NFS_AB_PG_SECONDS", "30").parse().expect("S3NFS_AB_PG_SECONDS");
    let (run, args) = match workload.as_str() {
        "dsync" => (dsync(n), "--flush-delay 600s --busy-defer 600s"),
        "pg" => (pg(secs), ""),
        w => panic!("S3NFS_AB_WORKLOAD is dsync or pg, not {w}"),
    };
    if !bed::require_guest("ab") {
        return;
    }
    let script = format!(
        r#"
M=/mnt/m; mkdir -p $M
cpu() {{ [ -n "$P" ] && awk '{{print $14 + $15}}' /proc/$P/stat || echo 0; }}
{run}
for r in $(seq {rounds}); do
  mkdir -p /tmp/local && mount --bind /tmp/local $M; P=; run local; umount $M; rm -rf /tmp/local
  i=0
  for B in {bins}; do
    i=$((i+1)); rm -rf /tmp/st; mkdir -p /tmp/st
    bg gw$i-$r $B serve --listen 127.0.0.1:2049 --data-dir /tmp/st {args}
    wait_port 2049 60 || {{ show_log gw$i-$r; exit 1; }}
    nfs_mount 2049 $M || exit 1
    P=$(bg_pid gw$i-$r)
    run bin$i
    umount $M; bg_kill gw$i-$r
  done
done
"#
    );
    let out = bed::run_guest(&script, &bed::GuestOpts::default().mem("2G").timeout_secs(4 * 3600));
    out.assert_finished();
    // "KV name=figure cpu_ms" per run of a system.
    let mut runs: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for line in out.console.lines() {
        let Some((_, kv)) = line.split_once(" KV ") else {
            continue;
        };
        let Some((name, v)) = kv.split_once('=') else { continue };
        let v: Vec<f64> = v.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        if let [figure, cpu_ms] = v[..] {
            println!("{name}: {figure} {}", if workload == "pg" { "TPS" } else { "ms" });
            runs.entry(name.to_string()).or_default().push((figure, cpu_ms));
        } else {
            println!("{name}: {kv}");
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let local = median(runs.get("local").map_or(vec![], |v| v.iter().map(|r| r.0).collect()));
    let backend = out.backend.map_or("unknown", |b| b.name());
    println!("\nmedians of {rounds} rounds ({backend} guest, one virtual CPU), workload {workload}:");
    for (i, bin) in bins.split_whitespace().enumerate() {
        let Some(r) = runs.get(&format!("bin{}", i + 1)) else {
            println!("{bin}: no figures");
            continue;
        };
        let figure = median(r.iter().map(|x| x.0).collect());
        if workload == "pg" {
            let per_txn = median(r.iter().map(|(tps, cpu)| cpu / (tps * secs as f64)).collect());
            println!(
                "{bin}: {figure:.1} TPS ({:.2}x tmpfs's {local:.1}), gateway CPU {per_txn:.3} ms per transaction",
                figure / local
            );
        } else {
            let per_op = median(r.iter().map(|x| x.1 / n as f64).collect());
            println!(
                "{bin}: {figure:.0} ms ({:.2}x tmpfs's {local:.0} ms), gateway CPU {per_op:.3} ms per write",
                local / figure
            );
        }
    }
}

/// `run NAME`: the dsync writes on $M, as "KV NAME=ms cpu_ms".
fn dsync(n: u64) -> String {
    format!(
        r#"
run() {{
  dd if=/dev/zero of=$M/wal bs=1M count=16 conv=fsync 2>/dev/null
  c0=$(cpu); t0=$(now_ms)
  dd if=/dev/zero of=$M/wal bs=8k count={n} oflag=dsync conv=notrunc 2>/dev/null || {{ kv $1 failed; return; }}
  kv $1 "$(( $(now_ms) - t0 )) $(( ($(cpu) - c0) * 10 ))"
}}
"#
    )
}

/// `run NAME`: PostgreSQL on $M, as "KV NAME=tps cpu_ms".
fn pg(secs: u64) -> String {
    format!(
        r#"
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$PGBIN/initdb" ] || {{ echo "PostgreSQL is needed (apt-get install postgresql)"; exit 1; }}
as_pg() {{ setpriv --reuid=postgres --regid=postgres --init-groups env HOME=/tmp "$@"; }}
run() {{
  mkdir $M/pg && chown postgres:postgres $M/pg && chmod 700 $M/pg
  as_pg $PGBIN/initdb -D $M/pg --locale=C -E UTF8 -U postgres --no-instructions >/dev/null 2>&1 || {{ kv $1 initdb failed; return; }}
  printf "listen_addresses = ''\nunix_socket_directories = '/tmp'\nshared_buffers = 64MB\n" | as_pg sh -c "cat >>$M/pg/postgresql.conf"
  touch /tmp/pg.log && chown postgres /tmp/pg.log
  as_pg $PGBIN/pg_ctl -D $M/pg -l /tmp/pg.log -w -t 3600 start >/dev/null || {{ kv $1 start failed; return; }}
  as_pg $PGBIN/pgbench -h /tmp -i -q -s 10 postgres >/dev/null 2>&1
  c0=$(cpu)
  tps=$(as_pg $PGBIN/pgbench -h /tmp -c 4 -j 4 -T {secs} postgres 2>/dev/null | sed -n 's/^tps = \([0-9.]*\) .*/\1/p')
  kv $1 "${{tps:-0}} $(( ($(cpu) - c0) * 10 ))"
  as_pg $PGBIN/pg_ctl -D $M/pg -w -t 3600 -m fast stop >/dev/null
}}
"#
    )
}
