//! Real applications on a volume, through the kernel NFS client in the guest test bed, with the
//! gateway killed by SIGKILL in the middle of their work. Each test checks the application's own
//! promise, not a file's bytes: PostgreSQL loses no committed transaction and has no corrupt
//! page; Redis (append-only file, `appendfsync everysec`) keeps every key it acknowledged before
//! the kill; git finds its repository whole.
//!
//! Every scenario ends by reading the application's data back from a gateway with an empty
//! state directory, which knows nothing but what S3 holds: the data reached S3 whole too.
//!
//! Needs a guest backend and Garage (as `kernel_mount.rs`), and Debian's `postgresql`,
//! `redis-server` and `git`, which `.ci/run` installs; a missing program fails the test with
//! its name. `S3NFS_SKIP_GUEST=1` skips instead (CI never sets it).

mod common;

use common::bed::{require_guest, run_guest, GuestOpts, GuestOutput};
use common::guest::script;

/// The gateway's restart with an empty state directory (only S3 behind it), and the mount on it.
const FROM_S3_ONLY: &str = r#"
from_s3_only() {
  step umount umount $M || { echo "holding $M:"; ls -l /proc/[0-9]*/cwd /proc/[0-9]*/fd 2>/dev/null | grep " $M" | head; }
  step server_stop bg_kill server TERM
  rm -rf /tmp/s3nfs/state && mkdir -p /tmp/s3nfs/state
  start_server
  step server_fresh wait_port $PORT 60 || show_log server
  step remount nfs_mount $PORT $M
}
"#;

/// SIGKILL of the gateway, an outage while the application's I/O blocks on the hard mount,
/// then the gateway back on the same port and state.
const CRASH_GATEWAY: &str = r#"
crash_gateway() {
  step kill9 bg_kill server KILL
  sleep 2
  # Started from /: a gateway whose working directory is on its own mount would hold it.
  local here=$PWD
  cd / && start_server && cd "$here"
  step server_restarted wait_port $PORT 60 || show_log server
}
"#;

fn run(body: &str) -> GuestOutput {
    let s = script(&format!("{FROM_S3_ONLY}{CRASH_GATEWAY}{body}"));
    run_guest(&s, &GuestOpts::default().mem("1536M").timeout_secs(900))
}

/// PostgreSQL with data checksums on the volume; pgbench (TPC-B) runs on two connections and
/// the gateway is killed mid-run. pgbench must finish without an error, `pgbench_history` must
/// hold exactly the transactions pgbench reports committed, the balances must agree (every
/// transaction adds the same delta to an account, a teller, a branch and the history), and
/// `pg_checksums` must find no corrupt page: on the volume as the client saw it, and again
/// from S3 alone.
const POSTGRES: &str = r#"
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
step postgresql_installed test -x "$PGBIN/initdb" || { echo "no PostgreSQL: apt-get install postgresql"; exit 1; }
as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups env HOME=/tmp "$@"; }
D=$M/pg
mkdir -p $D && chown postgres:postgres $D && chmod 700 $D
step initdb as_pg $PGBIN/initdb -D $D --data-checksums --locale=C -E UTF8 -U postgres --no-instructions >/run/logs/initdb.log 2>&1 || show_log initdb
as_pg sh -c "cat >>$D/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '/tmp'
shared_buffers = 32MB
max_connections = 10
EOF
touch /run/logs/pg.log && chown postgres /run/logs/pg.log
pg_start() { step "$1" as_pg $PGBIN/pg_ctl -D $D -l /run/logs/pg.log -w -t 600 start >/dev/null || show_log pg; }
pg_stop() { step "$1" as_pg $PGBIN/pg_ctl -D $D -w -t 600 -m fast stop >/dev/null || show_log pg; }
sql() { as_pg $PGBIN/psql -h /tmp -X -q -t -A -v ON_ERROR_STOP=1 -d postgres -c "$1"; }
SUMS="select (select sum(abalance) from pgbench_accounts) || ' ' || (select sum(bbalance) from pgbench_branches) || ' ' || (select sum(tbalance) from pgbench_tellers) || ' ' || (select coalesce(sum(delta), 0) from pgbench_history)"
pg_start pg_start
step pgbench_init as_pg $PGBIN/pgbench -h /tmp -i -q -s 1 postgres >/run/logs/pgbench_init.log 2>&1 || show_log pgbench_init
bg pgbench as_pg $PGBIN/pgbench -h /tmp -c 2 -j 2 -T $((20 * S3NFS_GUEST_SLOWDOWN)) postgres
pb=$(bg_pid pgbench)
end=$(( $(date +%s) + 300 ))
until [ "$(sql 'select count(*) from pgbench_history' 2>/dev/null || echo 0)" -ge 20 ] || [ $(date +%s) -gt $end ]; do sleep 0.2; done
kv committed_at_kill "$(sql 'select count(*) from pgbench_history')"
step pgbench_running kill -0 $pb
crash_gateway
wait $pb; step pgbench_done test $? = 0
show_log pgbench 20
kv committed "$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' /run/logs/pgbench.log)"
kv failed "$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' /run/logs/pgbench.log)"
kv history_rows "$(sql 'select count(*) from pgbench_history')"
kv sums "$(sql "$SUMS")"
pg_stop pg_stop
step checksums as_pg $PGBIN/pg_checksums --check -D $D
from_s3_only
step checksums_from_s3 as_pg $PGBIN/pg_checksums --check -D $D
pg_start pg_start_from_s3
kv history_rows_from_s3 "$(sql 'select count(*) from pgbench_history')"
kv sums_from_s3 "$(sql "$SUMS")"
pg_stop pg_stop_from_s3
show_log pg 20
"#;

#[test]
fn postgres_loses_no_committed_transaction_when_the_gateway_is_killed() {
    if !require_guest("postgres_loses_no_committed_transaction_when_the_gateway_is_killed") {
        return;
    }
    let out = run(POSTGRES);
    out.assert_all_ok();
    let committed: u64 = out.expect_value("committed").parse().unwrap();
    let at_kill: u64 = out.expect_value("committed_at_kill").parse().unwrap();
    if committed <= at_kill {
        out.fail(&format!(
            "pgbench committed {committed}, no more than the {at_kill} before the kill: it did not resume"
        ));
    }
    if out.value("failed").is_some_and(|f| !f.is_empty() && f != "0") {
        out.fail("pgbench reports failed transactions");
    }
    for k in ["history_rows", "history_rows_from_s3"] {
        if out.value(k) != Some(&committed.to_string()) {
            out.fail(&format!("{k} != the {committed} transactions pgbench committed"));
        }
    }
    for k in ["sums", "sums_from_s3"] {
        let sums: Vec<&str> = out.expect_value(k).split(' ').collect();
        if sums.len() != 4 || sums.iter().any(|s| *s != sums[0]) {
            out.fail(&format!("{k}: accounts, branches, tellers and history disagree"));
        }
    }
    eprintln!("pgbench committed {committed} transactions, {at_kill} of them before the gateway's SIGKILL");
}

/// Redis with its append-only file on the volume (`appendfsync everysec`). A writer sets keys
/// k1, k2, ... one at a time over one connection and logs each acknowledgement's time; the
/// gateway is killed mid-stream and restarted; Redis carries on. Then Redis is killed too, and
/// restarted from the append-only file, on the remounted volume and again from S3 alone.
/// Redis replays the file in order, so the keys it holds are a prefix k1..kN; every key
/// acknowledged before the gateway's kill must be in it.
const REDIS: &str = r#"
step redis_installed command -v redis-server redis-cli || { echo "no Redis: apt-get install redis-server"; exit 1; }
R=$M/redis
mkdir -p $R
redis_start() {
  bg redis redis-server --port 6379 --bind 127.0.0.1 --dir $R --appendonly yes --appendfsync everysec --save '' --daemonize no
  step "$1" wait_port 6379 120 || show_log redis
  # Loading the append-only file answers LOADING until done.
  local end=$(( $(date +%s) + 300 ))
  until [ "$(redis-cli ping 2>/dev/null)" = PONG ] || [ $(date +%s) -gt $end ]; do sleep 0.2; done
}
cat >/tmp/writer.sh <<'EOF'
exec 3<>/dev/tcp/127.0.0.1/6379
i=0
while :; do
  i=$((i + 1))
  printf 'SET k%d %d\r\n' $i $i >&3
  IFS= read -r -u 3 reply || exit 1
  [ "${reply%$'\r'}" = "+OK" ] || { echo "reply to SET k$i: $reply" >&2; exit 1; }
  echo "$i $EPOCHREALTIME" >>/tmp/acked
done
EOF
acked() { tail -n 1 /tmp/acked 2>/dev/null | cut -d' ' -f1; }
wait_acked() {
  local end=$(( $(date +%s) + 300 ))
  until [ "$(acked || echo 0)" -ge "$1" ] 2>/dev/null || [ $(date +%s) -gt $end ]; do sleep 0.1; done
  [ "$(acked)" -ge "$1" ]
}
redis_start redis_up
bg writer bash /tmp/writer.sh
step writing wait_acked 2000
kill_at=$EPOCHREALTIME
crash_gateway
n=$(acked)
step writing_after_restart wait_acked $((n + 1000))
bg_kill writer KILL
kv acked_before_kill "$(awk -v t=$kill_at '$2 < t { n = $1 } END { print n + 0 }' /tmp/acked)"
kv acked_before_kill_minus_1s "$(awk -v t=$kill_at '$2 < t - 1 { n = $1 } END { print n + 0 }' /tmp/acked)"
kv acked_total "$(acked)"
step redis_kill9 bg_kill redis KILL
step sync sync
step umount_after umount $M
step remount_after nfs_mount $PORT $M
redis_start redis_restarted
kv keys "$(redis-cli dbsize)"
kv last_key "$(redis-cli get k$(redis-cli dbsize))"
step redis_stop bg_kill redis KILL
from_s3_only
redis_start redis_from_s3
kv keys_from_s3 "$(redis-cli dbsize)"
kv last_key_from_s3 "$(redis-cli get k$(redis-cli dbsize))"
step redis_stop_from_s3 bg_kill redis KILL
show_log redis 20
"#;

#[test]
fn redis_keeps_every_acknowledged_key_when_the_gateway_is_killed() {
    if !require_guest("redis_keeps_every_acknowledged_key_when_the_gateway_is_killed") {
        return;
    }
    let out = run(REDIS);
    out.assert_all_ok();
    let num = |k: &str| -> u64 {
        out.expect_value(k)
            .parse()
            .unwrap_or_else(|_| out.fail(&format!("{k} is not a number")))
    };
    let before_kill = num("acked_before_kill");
    let total = num("acked_total");
    for (keys, last) in [("keys", "last_key"), ("keys_from_s3", "last_key_from_s3")] {
        let n = num(keys);
        // The keys are a prefix k1..kN of what was set: kN holds N.
        if out.value(last) != Some(&n.to_string()) {
            out.fail(&format!(
                "{keys}: {n} keys, but k{n} is not {n}: not a prefix of what was set"
            ));
        }
        if n < before_kill {
            out.fail(&format!(
                "{keys}: {n} keys, but {before_kill} were acknowledged before the gateway's SIGKILL"
            ));
        }
        // The writer is killed between a SET and the log of its reply: one more may be there.
        if n > total + 1 {
            out.fail(&format!("{keys}: {n} keys, more than the {} set", total + 1));
        }
    }
    eprintln!(
        "Redis: {before_kill} keys acknowledged before the gateway's SIGKILL, {total} in all, {} after Redis's own SIGKILL",
        num("keys")
    );
}

/// A developer's loop on the volume: clone a repository (this project's own), change and commit
/// a file, `git gc --aggressive`, with the gateway killed while gc rewrites the packs (or just
/// after it, on a fast machine); `git fsck --full` must find the repository whole, on the volume
/// and from S3 alone.
const GIT: &str = r#"
step git_installed command -v git || { echo "no git: apt-get install git"; exit 1; }
export HOME=/tmp GIT_CONFIG_NOSYSTEM=1 GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@example.invalid GIT_COMMITTER_NAME=t GIT_COMMITTER_EMAIL=t@example.invalid
git config --global --add safe.directory '*'
# No gc or maintenance left running in the background, holding the mount.
git config --global gc.autoDetach false
git config --global maintenance.autoDetach false
step clone git clone -q --no-hardlinks "$REPO" $M/repo
cd $M/repo
step status git status --porcelain
echo change >>README.md
step commit git commit -q -am change
bg gc git gc --aggressive -q
crash_gateway
wait $(bg_pid gc); step gc_done test $? = 0
step fsck git fsck --full --strict
kv head "$(git rev-parse HEAD)"
cd /
from_s3_only
cd $M/repo
step fsck_from_s3 git fsck --full --strict
kv head_from_s3 "$(git rev-parse HEAD)"
kv clean_from_s3 "$(git status --porcelain | wc -l)"
cd /
"#;

#[test]
fn git_repository_stays_whole_when_the_gateway_is_killed() {
    if !require_guest("git_repository_stays_whole_when_the_gateway_is_killed") {
        return;
    }
    let repo = common::bed::guest_path(concat!(env!("CARGO_MANIFEST_DIR"), "/.git"));
    let out = run(&format!("REPO={}\n{GIT}", common::bed::sh_quote(&repo)));
    out.assert_all_ok();
    if out.value("head") != out.value("head_from_s3") || out.value("head").is_none_or(|h| h.len() != 40) {
        out.fail("HEAD differs from S3 alone");
    }
    assert_eq!(
        out.value("clean_from_s3"),
        Some("0"),
        "the work tree from S3 differs from HEAD"
    );
}
