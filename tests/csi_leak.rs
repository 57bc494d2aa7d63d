//! Volumes staged and unstaged hundreds of times in one node plugin process (as it does all
//! day) leave its descriptors and memory flat. A test binary of its own, so that nothing else
//! runs in the process while its memory is measured.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::csi::{connect, fds_and_rss, run, rwo, Clients, InProcPlugin};
use common::garage;
use s3nfs::csi::pb;

fn secret() -> HashMap<String, String> {
    garage::shared().csi_secret()
}

fn create_req(name: &str) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 1 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![rwo()],
        secrets: secret(),
        ..Default::default()
    }
}

fn stage_req(id: &str, staging: &Path) -> pb::NodeStageVolumeRequest {
    common::csi::stage_req(id, staging, rwo(), secret(), &[("flushDelay", "100ms")])
}

#[test]
fn staging_and_unstaging_hundreds_of_times_leaves_descriptors_and_memory_flat() {
    // As `s3nfs` itself runs (see main.rs): with glibc's default of an arena per thread, freed
    // memory strands in many arenas and RSS says more about the allocator than about us.
    // SAFETY: mallopt only tunes the allocator.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let plugin = InProcPlugin::start(dir.path(), 21150..21160).await;
        let mut c = connect(&plugin.socket).await;
        let name = format!("pvc-cycle-{}", std::process::id());
        let id = c
            .controller
            .create_volume(create_req(&name))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        let staging = dir.path().join("staging");
        let cycle = |mut c: Clients| {
            let (id, staging) = (id.clone(), staging.clone());
            async move {
                c.node.node_stage_volume(stage_req(&id, &staging)).await.unwrap();
                c.node
                    .node_unstage_volume(common::csi::unstage_req(&id, &staging))
                    .await
                    .unwrap();
                c
            }
        };
        // Warm up: allocator free lists, connection pools, lazily built statics. RSS rises over
        // the first hundred cycles or so, then stays (measured: +13 MiB after 100, +16 after
        // 400, +17 after 1,200): what is measured is what comes after.
        for _ in 0..100 {
            c = cycle(c).await;
        }
        let (fds0, rss0) = fds_and_rss();
        for _ in 0..200 {
            c = cycle(c).await;
        }
        let (fds1, rss1) = fds_and_rss();
        assert!(
            plugin
                .supervisor
                .send(s3nfs::actors::StatusAll)
                .await
                .unwrap()
                .is_empty(),
            "no gateway left running"
        );
        assert!(
            fds1 <= fds0 + 2,
            "descriptors grew from {fds0} to {fds1} over 200 stage/unstage cycles"
        );
        let grown = rss1.saturating_sub(rss0);
        eprintln!(
            "200 stage/unstage cycles after 100 to warm up: fds {fds0} -> {fds1}, RSS {} -> {} MiB",
            rss0 >> 20,
            rss1 >> 20
        );
        assert!(
            grown < 16 << 20,
            "RSS grew by {} MiB over 200 stage/unstage cycles",
            grown >> 20
        );
        c.controller
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: id,
                secrets: secret(),
            })
            .await
            .unwrap();
        plugin.stop().await;
    });
}
