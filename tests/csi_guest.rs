//! The whole life of a CSI volume with real kernel NFS mounts, inside the guest test bed (tests/common/bed) against
//! Garage (both in the guest, on 127.0.0.1, as on a node with hostNetwork): the `s3nfs csi`
//! plugin serves gRPC on a Unix socket, and this test drives it as kubelet and the sidecars
//! would, then checks the files through the mounts and the objects in S3.
//!
//! The host side (`csi_volume_life_with_kernel_mounts`) boots the guest and starts Garage in it;
//! the guest side is this same test binary run inside the guest with `--ignored --exact
//! guest_side`, so the scenario is Rust with real assertions, and a failure shows its message
//! and the plugin's log in the console tail.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::bed::{guest_path, require_guest, run_guest, s3nfs_bin, sh_quote, GuestOpts};
use common::csi::{
    connect, mount_cap, publish_req, rwo, stage_req as stage, unpublish_req as unpublish, unstage_req as unstage,
    Clients,
};
use common::guest::{guest_env as env, guest_s3 as s3, guest_secret, prelude, s3_get, statvfs_total};
use s3nfs::csi::pb::{self, volume_capability::access_mode::Mode};
use s3nfs::store::{Body, ObjectStore, StoreError};

#[test]
fn csi_volume_life_with_kernel_mounts() {
    if !require_guest("csi_volume_life_with_kernel_mounts") {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let body = format!(
        r#"
export S3NFS_BIN={bin} S3NFS_IN_GUEST=1 RUST_BACKTRACE=1
step csi_life {exe} --exact guest_side --ignored --nocapture --test-threads=1
"#,
        bin = sh_quote(&guest_path(s3nfs_bin())),
        exe = sh_quote(&guest_path(&exe)),
    );
    let script = format!("{}{body}", prelude());
    let out = run_guest(&script, &GuestOpts::default().mem("1200M").timeout_secs(600));
    if out.step("csi_life").ok() {
        return;
    }
    // The guest side's panic message, wherever it is in the console.
    let console = out.console_tail(usize::MAX);
    let lines: Vec<&str> = console.lines().collect();
    let why: Vec<String> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("thread 'guest_side'"))
        .flat_map(|(i, _)| lines[i..(i + 3).min(lines.len())].iter().map(|l| l.to_string()))
        .collect();
    eprintln!("guest side failed:\n{}", why.join("\n"));
    out.assert_steps(&["garage_up", "garage_layout", "garage_bucket", "csi_life"]);
}

// ------------------------------------------------------------------ inside the guest

const SOCKET: &str = "/tmp/csi/csi.sock";
const STATE: &str = "/tmp/csi/state";

fn secret() -> HashMap<String, String> {
    guest_secret("http://127.0.0.1:3900")
}

/// The `s3nfs csi` plugin, as the node DaemonSet runs it.
struct Plugin(Child);

impl Plugin {
    fn start() -> Plugin {
        std::fs::create_dir_all("/tmp/csi").unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open("/tmp/csi/plugin.log")
            .unwrap();
        let child = Command::new(env("S3NFS_BIN"))
            .args([
                "csi",
                "--mode",
                "all",
                "--endpoint",
                &format!("unix://{SOCKET}"),
                "--node-id",
                "guest",
            ])
            .args(["--state-dir", STATE, "--ports", "20500-20510"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Plugin(child)
    }

    fn kill9(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        // On failure, the console shows what the plugin said (first: a plugin stuck in the
        // kernel may not die at once).
        if std::thread::panicking() {
            let log = std::fs::read_to_string("/tmp/csi/plugin.log").unwrap_or_default();
            let lines: Vec<_> = log.lines().collect();
            eprintln!(
                "----- plugin log -----\n{}\n----- end plugin log -----",
                lines[lines.len().saturating_sub(80)..].join("\n")
            );
            // Where each of its threads waits in the kernel, if it is stuck there.
            if let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.0.id())) {
                for t in tasks.flatten() {
                    let p = t.path();
                    let wchan = std::fs::read_to_string(p.join("wchan")).unwrap_or_default();
                    let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
                    let state = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
                    eprintln!(
                        "plugin thread {} {}: wchan {wchan} stat {state}",
                        t.file_name().to_string_lossy(),
                        comm.trim()
                    );
                }
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for a socket that answers: the plugin restores every gateway before it serves.
async fn clients() -> Clients {
    connect(Path::new(SOCKET)).await
}

fn pattern(i: u64) -> Vec<u8> {
    (0..256 * 1024u64).map(|j| ((i * 7919 + j * 31) % 251) as u8).collect()
}

fn publish(
    id: &str,
    staging: &Path,
    target: &Path,
    ro: bool,
    secrets: HashMap<String, String>,
) -> pb::NodePublishVolumeRequest {
    publish_req(id, staging, target, rwo(), ro, secrets)
}

#[test]
#[ignore = "runs inside the guest (see csi_volume_life_with_kernel_mounts)"]
fn guest_side() {
    assert!(
        std::env::var_os("S3NFS_IN_GUEST").is_some(),
        "run by csi_volume_life_with_kernel_mounts only"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(life());
}

async fn life() {
    let mut plugin = Plugin::start();
    let mut c = clients().await;
    const MIB: i64 = 1 << 20;

    // 1. CreateVolume (a bucket per volume), NodeStage (a kernel NFS mount), two targets.
    let vol = c
        .controller
        .create_volume(pb::CreateVolumeRequest {
            name: "pvc-life".into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![rwo()],
            parameters: [("flushDelay", "300ms"), ("refresh", "1s")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            secrets: secret(),
            ..Default::default()
        })
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .unwrap();
    let id = vol.volume_id.clone();
    let ctx: Vec<(String, String)> = vol.volume_context.clone().into_iter().collect();
    let ctx: Vec<(&str, &str)> = ctx.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let staging = PathBuf::from("/mnt/csi/staging/pvc-life");
    let (ta, tb) = (
        PathBuf::from("/mnt/csi/pods/a/vol"),
        PathBuf::from("/mnt/csi/pods/b/vol"),
    );
    c.node
        .node_stage_volume(stage(&id, &staging, rwo(), secret(), &ctx))
        .await
        .expect("NodeStage");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mountinfo
            .lines()
            .any(|l| l.contains(" /mnt/csi/staging/pvc-life ") && l.contains(" - nfs ")),
        "no NFS mount at the staging path:\n{mountinfo}"
    );
    c.node
        .node_publish_volume(publish(&id, &staging, &ta, false, HashMap::new()))
        .await
        .expect("publish a");
    c.node
        .node_publish_volume(publish(&id, &staging, &tb, true, HashMap::new()))
        .await
        .expect("publish b");
    // Repeated, as kubelet does after its own restart.
    c.node
        .node_publish_volume(publish(&id, &staging, &ta, false, HashMap::new()))
        .await
        .expect("publish a again");

    // 2. Write through one target, read through the other; the read-only one refuses writes.
    std::fs::write(ta.join("hello.txt"), b"hello from pod a\n").unwrap();
    std::fs::create_dir(ta.join("dir")).unwrap();
    std::fs::write(ta.join("dir/nested.txt"), b"nested").unwrap();
    assert_eq!(std::fs::read(tb.join("hello.txt")).unwrap(), b"hello from pod a\n");
    let err = std::fs::write(tb.join("nope.txt"), b"x").unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EROFS),
        "write on the read-only target: {err}"
    );
    let names: Vec<String> = std::fs::read_dir(&ta)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with(".s3nfs")),
        "the volume record shows in the volume: {names:?}"
    );
    let bucket = s3(&id).await;
    assert!(
        bucket.head(".s3nfs-volume.toml").await.unwrap().is_some(),
        "the volume record is in the bucket"
    );
    // Files become plain objects once idle (flushDelay 300ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while s3_get(&bucket, "dir/nested.txt").await.as_deref() != Some(b"nested".as_slice()) {
        assert!(std::time::Instant::now() < deadline, "dir/nested.txt never reached S3");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 3. SIGKILL the plugin while a writer is mid-file; start it again; the writer completes.
    //    The writer is a process of its own, as a pod's would be: a process holding an open
    //    file on the mount must not be the one that starts the plugin (its exec would close,
    //    and so flush, that file, and wait for the very gateway it is about to start).
    let src = PathBuf::from("/tmp/big.src");
    let mut all = Vec::new();
    for i in 0..96u64 {
        all.extend_from_slice(&pattern(i));
    }
    std::fs::write(&src, &all).unwrap();
    let big = ta.join("big.bin");
    // oflag=dsync: each block is acknowledged by the gateway before the next, so the writer is
    // still mid-file when the plugin dies.
    let mut writer = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", big.display()))
        .args(["bs=64k", "oflag=dsync", "conv=fsync", "status=none"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::fs::metadata(&big).map(|m| m.len()).unwrap_or(0) < 4 << 20 {
        assert!(std::time::Instant::now() < deadline, "the writer never got 4 MiB in");
        assert!(
            writer.try_wait().unwrap().is_none(),
            "the writer ended before the plugin was killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing on the mount may be touched from here until the plugin is back: with the
    // gateway gone, a hard mount makes this process wait too.
    assert!(
        writer.try_wait().unwrap().is_none(),
        "the writer ended before the plugin was killed"
    );
    plugin.kill9();
    let plugin = Plugin::start();
    c = clients().await;
    let status = writer.wait().unwrap();
    assert!(
        status.success(),
        "the writer failed across the plugin restart: {status}"
    );
    let back = std::fs::read(ta.join("big.bin")).unwrap();
    assert_eq!(back.len(), all.len());
    assert!(back == all, "big.bin differs after the restart");
    assert_eq!(std::fs::read(tb.join("hello.txt")).unwrap(), b"hello from pod a\n");

    // 4. Capacity: df shows it; expansion shows without a remount; past it, ENOSPC.
    let total = statvfs_total(&ta);
    assert!(total.abs_diff(64 << 20) < 1 << 20, "df shows {total} bytes, not 64 MiB");
    let e = c
        .controller
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            secrets: secret(),
            ..Default::default()
        })
        .await
        .expect("ControllerExpandVolume")
        .into_inner();
    assert!(e.node_expansion_required);
    c.node
        .node_expand_volume(pb::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: ta.to_string_lossy().into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("NodeExpandVolume");
    let total = statvfs_total(&ta);
    assert!(
        total.abs_diff(128 << 20) < 1 << 20,
        "df shows {total} bytes after expansion, not 128 MiB"
    );
    let stats = c
        .node
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: tb.to_string_lossy().into(),
            ..Default::default()
        })
        .await
        .expect("NodeGetVolumeStats")
        .into_inner();
    let bytes = stats
        .usage
        .iter()
        .find(|u| u.unit == pb::volume_usage::Unit::Bytes as i32)
        .unwrap();
    assert_eq!(bytes.total, 128 * MIB);
    assert!(bytes.used >= 24 * MIB, "used {} bytes with 24 MiB written", bytes.used);
    // Past the capacity: ENOSPC at a write or at the sync, and nothing else lost.
    let full = ta.join("too-big.bin");
    let r = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&full)?;
        for i in 0..(200 * 4) {
            f.write_all(&pattern(i))?;
        }
        f.sync_all()
    })();
    let err = r.expect_err("200 MiB fit in a 128 MiB volume");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSPC),
        "writing past the capacity: {err}"
    );
    std::fs::remove_file(&full).unwrap();
    let mut back = Vec::new();
    std::fs::File::open(tb.join("big.bin"))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(
        back.len() == 96 * 256 * 1024 && back[..256 * 1024] == pattern(0)[..],
        "big.bin damaged by the ENOSPC"
    );

    // 5. Unpublish both, unstage: then every byte is in S3. Delete: the bucket goes.
    c.node
        .node_unpublish_volume(unpublish(&id, &ta))
        .await
        .expect("unpublish a");
    c.node
        .node_unpublish_volume(unpublish(&id, &tb))
        .await
        .expect("unpublish b");
    assert!(!ta.exists() && !tb.exists(), "targets removed");
    c.node
        .node_unstage_volume(unstage(&id, &staging))
        .await
        .expect("NodeUnstage");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains("/mnt/csi/"), "mounts left:\n{mountinfo}");
    assert_eq!(
        s3_get(&bucket, "hello.txt").await.as_deref(),
        Some(b"hello from pod a\n".as_slice())
    );
    let big = s3_get(&bucket, "big.bin")
        .await
        .expect("big.bin is not in S3 after unstage");
    assert!(big == back, "big.bin in S3 differs from what was written");
    assert!(bucket.head("too-big.bin").await.unwrap().is_none());
    c.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: secret(),
        })
        .await
        .expect("DeleteVolume");
    assert!(
        matches!(bucket.check().await, Err(StoreError::NoSuchBucket(_))),
        "the bucket outlived DeleteVolume"
    );

    // 6. A static PV written for csi-s3: id bucket/prefix, only a node-publish secret,
    //    geesefs options in the volume attributes; existing objects show, data is kept.
    let legacy = s3("legacy-data").await;
    legacy.create_bucket("garage").await.unwrap();
    legacy
        .put(
            "team/old.txt",
            Body::Bytes("written by csi-s3\n".into()),
            &Default::default(),
        )
        .await
        .unwrap();
    let sid = "legacy-data/team";
    let sstaging = PathBuf::from("/mnt/csi/staging/legacy");
    let st = PathBuf::from("/mnt/csi/pods/c/vol");
    let attrs = [
        ("capacity", "1Gi"),
        ("mounter", "geesefs"),
        (
            "options",
            "--memory-limit 1000 --dir-mode 0777 --file-mode 0666 --uid 1000",
        ),
    ];
    c.node
        .node_stage_volume(stage(
            sid,
            &sstaging,
            mount_cap(Mode::MultiNodeReaderOnly),
            HashMap::new(),
            &attrs,
        ))
        .await
        .expect("NodeStage of a static PV without a stage secret");
    c.node
        // kubelet's readonly flag is false here: the access mode alone makes it read-only.
        .node_publish_volume(publish_req(
            sid,
            &sstaging,
            &st,
            mount_cap(Mode::MultiNodeReaderOnly),
            false,
            secret(),
        ))
        .await
        .expect("NodePublish of a static PV with its publish secret");
    assert_eq!(std::fs::read(st.join("old.txt")).unwrap(), b"written by csi-s3\n");
    let md = std::fs::metadata(st.join("old.txt")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (md.mode() & 0o7777, md.uid()),
        (0o666, 1000),
        "geesefs --file-mode/--uid for objects without attributes"
    );
    let err = std::fs::write(st.join("new.txt"), b"x").unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EROFS),
        "MULTI_NODE_READER_ONLY mounts read-only"
    );
    c.node.node_unpublish_volume(unpublish(sid, &st)).await.unwrap();
    c.node.node_unstage_volume(unstage(sid, &sstaging)).await.unwrap();
    c.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: sid.into(),
            secrets: secret(),
        })
        .await
        .unwrap();
    assert!(
        legacy.head("team/old.txt").await.unwrap().is_some(),
        "a static PV's data was deleted"
    );
    drop(plugin);
}
