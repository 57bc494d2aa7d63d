//! The Linux kernel's own NFSv3 client (inside the guest test bed, user-mode-linux or qemu) against the s3nfs gateway and
//! a Garage S3 server, both running in the same guest on 127.0.0.1, as on a real node. Every
//! scenario checks its results on the mount and on the objects in S3 (read with `s3nfs ls` and
//! `s3nfs cat`, which read the bucket, not the gateway). See `tests/common/bed/mod.rs`.
//!
//! Needs a guest backend (`user-mode-linux`, or qemu with its bed) and Garage; `.ci/run` installs
//! them. `S3NFS_SKIP_GUEST=1` skips instead of failing (for machines without them; CI never
//! sets it).

mod common;

use common::bed::{backend, guest_path, require_guest, run_guest, run_guest_on, Backend, GuestOpts};
use common::guest::script;

#[test]
fn guest_harness_mounts_nfs() {
    if !require_guest("guest_harness_mounts_nfs") {
        return;
    }
    let body = r#"
kv guest_uptime_at_mount "$(cut -d' ' -f1 /proc/uptime)"
step write dd if=/dev/urandom of=/tmp/src bs=1M count=4 status=none
step copy_in dd if=/tmp/src of=$M/file.bin bs=64k conv=fsync status=none
kv src_md5 "$(md5sum </tmp/src | cut -d' ' -f1)"
step drop_caches sh -c 'sync; echo 3 >/proc/sys/vm/drop_caches'
kv nfs_md5 "$(md5sum <$M/file.bin | cut -d' ' -f1)"
step mkdir mkdir $M/dir
step touch touch $M/dir/a $M/dir/b $M/dir/c
kv listing "$(ls $M/dir | tr '\n' ' ')"
kv size "$(stat -c %s $M/file.bin)"
kv fstype "$(stat -f -c %T $M)"
step umount umount $M
step server_stop bg_kill server TERM
kv s3_md5 "$(s3cat file.bin | md5sum | cut -d' ' -f1)"
kv s3_keys "$(s3ls | cut -f2 | tr '\n' ' ')"
"#;
    let out = run_guest(&script(body), &GuestOpts::default());
    out.assert_steps(&[
        "server_up",
        "mount",
        "write",
        "copy_in",
        "drop_caches",
        "mkdir",
        "touch",
        "umount",
        "server_stop",
    ]);
    let src = out.expect_value("src_md5");
    assert_eq!(src.len(), 32, "md5 of the source: {src:?}");
    if out.value("nfs_md5") != Some(src) {
        out.fail("checksum read back over NFS differs");
    }
    if out.value("s3_md5") != Some(src) {
        out.fail("the object in S3 differs from what was written");
    }
    assert_eq!(out.value("listing"), Some("a b c "));
    // One file, one object; a marker for the directory.
    assert_eq!(out.value("s3_keys"), Some("dir/ dir/a dir/b dir/c file.bin "));
    assert_eq!(out.value("size"), Some("4194304"));
    assert_eq!(out.value("fstype"), Some("nfs"));
    eprintln!(
        "{}: host boot-to-script {:?}, server start + mount {} ms, guest uptime at mount {} s, whole run {:?}",
        out.backend.unwrap().name(),
        out.boot.unwrap(),
        out.expect_value("mount_ms"),
        out.expect_value("guest_uptime_at_mount"),
        out.total
    );
}

/// Everyday use of a mounted share; the gateway is then restarted (SIGTERM) and the share
/// remounted, and everything must still be there.
const EVERYDAY: &str = r#"
cd /tmp
# write, read, append, overwrite, truncate
step write sh -c "printf 'hello\n' >$M/a.txt"
step read test "$(cat $M/a.txt)" = hello
step append sh -c "printf 'world\n' >>$M/a.txt"
step read_append test "$(cat $M/a.txt)" = "$(printf 'hello\nworld')"
step overwrite sh -c "printf X >$M/a.txt"
step read_overwrite test "$(cat $M/a.txt)" = X
dd if=/dev/urandom of=/tmp/big bs=1M count=8 status=none
step write_big cp /tmp/big $M/big
step read_big cmp /tmp/big $M/big
step overwrite_middle dd if=/dev/zero of=$M/big bs=4k seek=100 count=3 conv=notrunc status=none
dd if=/dev/zero of=/tmp/big bs=4k seek=100 count=3 conv=notrunc status=none
step read_middle cmp /tmp/big $M/big
step truncate_shrink truncate -s 1000000 $M/big
step shrink_size test "$(stat -c %s $M/big)" = 1000000
step shrink_content cmp -n 1000000 /tmp/big $M/big
step truncate_grow truncate -s 2000000 $M/big
step grow_zeroes cmp <(head -c 1000000 /dev/zero) <(tail -c 1000000 $M/big)
step truncate_zero sh -c ": >$M/big"
step zero_size test "$(stat -c %s $M/big)" = 0

# a tree of a few hundred files: cp -r, compare, mv, rm -r
mkdir -p /tmp/tree
for d in $(seq 0 9); do
  mkdir -p /tmp/tree/d$d/sub
  for f in $(seq 0 29); do echo "file $d/$f $RANDOM" >/tmp/tree/d$d/f$f; done
  head -c 100000 /dev/urandom >/tmp/tree/d$d/sub/blob
done
kv tree_files_src "$(find /tmp/tree -type f | wc -l)"
timed cp_tree cp -r /tmp/tree $M/tree
step tree_same diff -r /tmp/tree $M/tree
kv tree_files "$(find $M/tree -type f | wc -l)"
step mv_file mv $M/a.txt $M/b.txt
step mv_file_gone test ! -e $M/a.txt
step mv_file_content test "$(cat $M/b.txt)" = X
step mv_dir mv $M/tree $M/tree2
step mv_dir_same diff -r /tmp/tree $M/tree2
step mv_dir_into sh -c "mkdir $M/other && mv $M/tree2/d0 $M/other/ && test -f $M/other/d0/sub/blob"
step mv_over_file sh -c "echo new >$M/n1 && echo old >$M/n2 && mv $M/n1 $M/n2 && test \"\$(cat $M/n2)\" = new && test ! -e $M/n1"
timed rm_tree rm -r $M/tree2 $M/other
step rm_tree_gone test ! -e $M/tree2 -a ! -e $M/other

# symlinks
step symlink ln -s b.txt $M/link
step readlink test "$(readlink $M/link)" = b.txt
step read_via_link test "$(cat $M/link)" = X
step symlink_dangling ln -s /nonexistent/x $M/dangling
step lstat_dangling test -L $M/dangling -a ! -e $M/dangling

# attributes
step chmod chmod 640 $M/b.txt
step chmod_seen test "$(stat -c %a $M/b.txt)" = 640
step chown chown 1234:5678 $M/b.txt
step chown_seen test "$(stat -c %u:%g $M/b.txt)" = 1234:5678
step touch_d touch -d '2001-02-03 04:05:06 UTC' $M/b.txt
step touch_seen test "$(stat -c %Y $M/b.txt)" = 981173106
step mkdir_mode sh -c "mkdir -m 700 $M/private && test \"\$(stat -c %a $M/private)\" = 700"

# hard links (LINK) and fifos (MKNOD) through the kernel client, and real git (which links its
# objects into place)
step cp_al sh -c "mkdir $M/orig && echo one >$M/orig/f && cp -al $M/orig $M/clone && test \"\$(stat -c %h $M/orig/f)\" = 2"
step link_write sh -c "echo two >>$M/clone/f && test \"\$(cat $M/orig/f)\" = \"\$(printf 'one\ntwo')\""
step link_unlink sh -c "rm $M/orig/f && test \"\$(stat -c %h $M/clone/f)\" = 1 && test \"\$(cat $M/clone/f)\" = \"\$(printf 'one\ntwo')\""
step fifo sh -c "mkfifo $M/pipe && test -p $M/pipe && { echo through >$M/pipe & } && test \"\$(cat $M/pipe)\" = through"
step git_real sh -c "cd $M && git init -q realgit && cd realgit && echo x >x && git add x && git -c user.name=t -c user.email=t@t commit -qm m && git fsck --no-progress && test \"\$(git log --format=%s)\" = m"

# a $BIGDIR-entry directory (10,000 for s3nfs): exact count, no duplicates, ls -l works.
# timeout: a server that loses its place in a listing makes `ls` loop forever. 120 s, scaled by
# the backend's slowdown (qemu emulates every instruction).
LIST_LIMIT=$((120 * S3NFS_GUEST_SLOWDOWN))
mkdir $M/many
timed create_many sh -c "cd $M/many && seq -f 'entry-%05g' 1 $BIGDIR | xargs touch"
step drop_caches sh -c 'sync; echo 3 >/proc/sys/vm/drop_caches'
kv many_count "$(timeout $LIST_LIMIT ls -f $M/many | grep -vxE '\.|\.\.' | wc -l)"
kv many_dups "$(timeout $LIST_LIMIT ls -f $M/many | sort | uniq -d | wc -l)"
timed ls_l sh -c "timeout $LIST_LIMIT ls -l $M/many >/tmp/ls_l"
kv many_ls_l "$(grep -c ' entry-' /tmp/ls_l)"
step many_names cmp <(timeout $LIST_LIMIT ls $M/many) <(seq -f 'entry-%05g' 1 $BIGDIR)

# a git-like workload: many small files in fan-out dirs, write-to-temp + rename (objects),
# lock file + rename over the existing ref, fsync. Built-ins where possible: every process
# spawned in the guest costs ~70 ms under UML, more under qemu.
G=$M/repo
gitlike() {
  local i h d last=
  mkdir -p $G/refs/heads $(for i in $(seq 0 15); do printf "$G/objects/%02x " $i; done) || return 1
  printf 'initial\n' >$G/refs/heads/main || return 1
  for i in $(seq 1 300); do
    printf -v h '%02x%08x' $((i % 16)) $(( (i * 2654435761) % 4294967296 ))
    d=$G/objects/${h:0:2}
    if (( i % 2 )); then
      printf 'blob %s\n' "$i" >$d/${h:2} || return 1
    else
      printf 'blob %s\n' "$i" >$d/${h:2}.tmp && mv $d/${h:2}.tmp $d/${h:2} || return 1
    fi
    if (( i % 5 == 0 )); then
      printf '%s\n' "$h" >$G/refs/heads/main.lock && mv -f $G/refs/heads/main.lock $G/refs/heads/main || return 1
      last=$h
    fi
  done
  echo "$last" >/tmp/git_last_ref
  dd if=/dev/urandom of=$G/index.lock bs=4k count=16 conv=fsync status=none || return 1
  mv -f $G/index.lock $G/index && sync
}
timed gitlike gitlike
kv git_objects "$(find $G/objects -type f | wc -l)"
kv git_tmp_left "$(find $G -name '*.tmp' -o -name '*.lock' | wc -l)"
step git_ref test "$(cat $G/refs/heads/main)" = "$(cat /tmp/git_last_ref)"
step fsync_dd dd if=/dev/urandom of=$M/fsynced bs=1M count=2 conv=fsync status=none

# remount (and, for a persistent server, restart it) and check everything is still there
(cd $M && find . -path ./many -prune -o -type f -print0 | sort -z | xargs -0 md5sum) >/tmp/sums
kv sums_lines "$(wc -l </tmp/sums)"
step umount umount $M
step server_stop bg_kill server TERM
# What S3 holds once the gateway has stopped (a clean stop uploads everything first).
s3ls --long >/tmp/s3ls
kv s3_many "$(grep -c "	many/entry-" /tmp/s3ls)"
kv s3_b_txt "$(s3cat b.txt)"
kv s3_b_meta "$(grep "	b.txt	" /tmp/s3ls | cut -f3)"
kv s3_link "$(s3cat link)"
kv s3_tree_left "$(grep -c "	tree2/" /tmp/s3ls)"
kv s3_tree_keys "$(grep "	tree2/" /tmp/s3ls | cut -f2 | tr "\n" " ")"
kv s3_private_mode "$(grep "	private/	" /tmp/s3ls | cut -f3 | tr ',' '\n' | sed -n 's/^mode=//p')"
kv s3_repo_objects "$(grep -c "	repo/objects/../[^	]" /tmp/s3ls)"
start_server
step server_up_again wait_port $PORT 60 || show_log server
step remount nfs_mount $PORT $M
step sums_after_remount sh -c "cd $M && md5sum --quiet -c /tmp/sums"
t0=$(now_ms)
kv many_count_after "$(timeout $LIST_LIMIT ls -f $M/many | grep -vxE '\.|\.\.' | wc -l)"
kv relist_many_ms $(( $(now_ms) - t0 ))
step final_umount umount $M
"#;

fn everyday() {
    let bigdir = "10000".to_string();
    let out = run_guest(&script(EVERYDAY), &GuestOpts::default().timeout_secs(900));
    out.assert_all_ok();
    for (k, v) in [
        ("tree_files_src", "310"),
        ("tree_files", "310"),
        ("many_count", &bigdir),
        ("many_dups", "0"),
        ("many_ls_l", &bigdir),
        ("git_objects", "300"),
        ("git_tmp_left", "0"),
        ("many_count_after", &bigdir),
        ("s3_many", &bigdir),
        ("s3_b_txt", "X"),
        // chmod 640, chown 1234:5678, touch -d 2001-02-03 04:05:06 UTC, as s3fs writes them
        ("s3_b_meta", "gid=5678,mode=33184,mtime=981173106,uid=1234"),
        ("s3_link", "b.txt"),
        ("s3_tree_left", "0"),
        ("s3_private_mode", "16832"),
        ("s3_repo_objects", "300"),
    ] {
        if out.value(k) != Some(v) {
            out.fail(&format!("{k}: expected {v}, got {:?}", out.value(k)));
        }
    }
    eprintln!(
        "timings (ms): mount {} cp_tree {} rm_tree {} create_many {} ls_l {} gitlike {} relist_many {}",
        out.expect_value("mount_ms"),
        out.expect_value("cp_tree_ms"),
        out.expect_value("rm_tree_ms"),
        out.expect_value("create_many_ms"),
        out.expect_value("ls_l_ms"),
        out.expect_value("gitlike_ms"),
        out.expect_value("relist_many_ms"),
    );
}

#[test]
fn everyday_use_s3nfs() {
    if !require_guest("everyday_use_s3nfs") {
        return;
    }
    everyday();
}

/// A writer dd-ing a 160 MiB pattern on a hard mount; the gateway is killed with SIGKILL
/// mid-write and restarted on the same port with the same state dir; the writer must finish
/// and the file must read back exactly as written (after dropping caches and remounting).
const CRASH: &str = r#"
head -c 160M /dev/urandom >/tmp/pattern
kv expected_md5 "$(md5sum </tmp/pattern | cut -d' ' -f1)"
# oflag=sync: each 256 KiB write goes to the server before the next, so the kill lands mid-write
bg writer dd if=/tmp/pattern of=$M/crash.bin bs=256k oflag=sync
wp=$(bg_pid writer)
end=$(( $(date +%s) + 120 ))
until [ "$(stat -c %s $M/crash.bin 2>/dev/null || echo 0)" -ge $((8 << 20)) ] || [ $(date +%s) -gt $end ]; do sleep 0.05; done
kv size_at_kill "$(stat -c %s $M/crash.bin)"
step writer_running kill -0 $wp
step kill9 bg_kill server KILL
sleep 2
step writer_blocked kill -0 $wp
start_server
step server_restarted wait_port $PORT 60 || show_log server
t0=$(now_ms)
wait $wp; step writer_done test $? = 0
kv writer_resume_ms $(( $(now_ms) - t0 ))
show_log writer 5
step sync sync
step drop_caches sh -c 'echo 3 >/proc/sys/vm/drop_caches'
kv size "$(stat -c %s $M/crash.bin)"
kv md5_cached_client "$(md5sum <$M/crash.bin | cut -d' ' -f1)"
step umount umount $M
step remount nfs_mount $PORT $M
kv md5_after_remount "$(md5sum <$M/crash.bin | cut -d' ' -f1)"
step final_umount umount $M
step server_stop bg_kill server TERM
kv md5_in_s3 "$(s3cat crash.bin | md5sum | cut -d' ' -f1)"
kv s3_keys "$(s3ls | cut -f2 | tr '\n' ' ')"
"#;

#[test]
fn gateway_crash_mid_write() {
    if !require_guest("gateway_crash_mid_write") {
        return;
    }
    let out = run_guest(&script(CRASH), &GuestOpts::default().mem("1G").timeout_secs(900));
    out.assert_all_ok();
    let expected = out.expect_value("expected_md5");
    assert_eq!(out.value("size"), Some("167772160"));
    // No other object: no half-written leftovers beside the file.
    assert_eq!(out.value("s3_keys"), Some("crash.bin "));
    for k in ["md5_cached_client", "md5_after_remount", "md5_in_s3"] {
        if out.value(k) != Some(expected) {
            out.fail(&format!("{k} != expected {expected}"));
        }
    }
    eprintln!(
        "killed at {} bytes, writer resumed in {} ms",
        out.expect_value("size_at_kill"),
        out.expect_value("writer_resume_ms")
    );
}

/// The bed's backends keep one contract: the qemu backend boots on every machine (it is the
/// fallback, so it is checked even where UML is chosen), UML where the probe says it does, and
/// each loads the kernel NFS client, sees the host read-only and writes to its own tmpfs.
#[test]
fn guest_backends_keep_one_contract() {
    if !require_guest("guest_backends_keep_one_contract") {
        return;
    }
    let chosen = backend().unwrap();
    if let Ok(forced) = std::env::var("S3NFS_GUEST") {
        assert_eq!(chosen.name(), forced, "S3NFS_GUEST forces the backend");
    }
    // The host's tree as the guest sees it (a clone under /tmp is at /run/host/tmp).
    let probe = guest_path(env!("CARGO_MANIFEST_DIR"));
    let body = format!(
        r#"
kv backend "$S3NFS_GUEST_BACKEND"
step nfs_client grep -qw nfs /proc/filesystems
step host_visible test -f {probe}/Cargo.toml
step host_read_only sh -c '! touch {probe}/.guest-write 2>/dev/null'
step tmpfs_writable sh -c 'echo x >/tmp/x && echo y >/mnt/y && test "$(cat /tmp/x /mnt/y)" = "$(printf "x\ny")"'
step modroot test -d "$S3NFS_MODROOT/lib/modules/$(uname -r)"
"#
    );
    let mut backends = vec![Backend::Qemu];
    if chosen == Backend::Uml {
        backends.push(Backend::Uml);
    } else {
        eprintln!("uml not checked: this run uses {}", chosen.name());
    }
    for b in backends {
        let out = run_guest_on(b, &body, &GuestOpts::default().timeout_secs(180));
        out.assert_all_ok();
        assert_eq!(out.value("backend"), Some(b.name()));
        assert_eq!(out.backend, Some(b));
    }
}
