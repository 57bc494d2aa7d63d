//! The CSI services on injected stores: embedded buckets (`LocalBuckets`) under one switch of
//! faults (`FaultyStore`), so that S3 outages and lost replies reach the controller and the
//! node exactly where a test wants them, with no S3 server. The gRPC services, the supervisor
//! and the gateways are the real ones; only the kernel mount is the fake mounter's.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::csi::{connect, publish_req, run, rwo, stage_req, unpublish_req, unstage_req, Clients, InProcPlugin};
use common::nfs::Client;
use s3nfs::csi::mount::Mounter;
use s3nfs::csi::pb;
use s3nfs::store::connect::{Connector, LocalBuckets};
use s3nfs::store::faulty::{Faults, FaultyStore, Op};
use s3nfs::store::{ObjectStore, StoreError};
use tonic::Code;

/// Any well-formed secret: embedded buckets ignore endpoints and keys.
fn secret() -> HashMap<String, String> {
    [
        ("accessKeyID", "local"),
        ("secretAccessKey", "local-secret"),
        ("endpoint", "http://127.0.0.1:1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn create_req(name: &str, params: &[(&str, &str)]) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![rwo()],
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        secrets: secret(),
        ..Default::default()
    }
}

fn delete_req(id: &str) -> pb::DeleteVolumeRequest {
    pb::DeleteVolumeRequest {
        volume_id: id.into(),
        secrets: secret(),
    }
}

/// A plugin in a fresh directory on embedded buckets under one switch of faults, connected,
/// with volume `name` created (ports 21340-21360). Its `dir` holds the buckets: keep it bound.
struct Bed {
    dir: tempfile::TempDir,
    stores: Arc<dyn Connector>,
    faults: Faults,
    plugin: InProcPlugin,
    clients: Clients,
    vol: pb::Volume,
}

impl Bed {
    async fn new(name: &str) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let (stores, faults) = faulty_buckets(&dir.path().join("buckets"));
        let plugin = Self::plugin_in(&dir, &stores).await;
        let mut clients = connect(&plugin.socket).await;
        let vol = clients
            .controller
            .create_volume(create_req(name, &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        Bed {
            dir,
            stores,
            faults,
            plugin,
            clients,
            vol,
        }
    }

    /// The plugin of `dir`, started (again) on `stores`.
    async fn plugin_in(dir: &tempfile::TempDir, stores: &Arc<dyn Connector>) -> InProcPlugin {
        InProcPlugin::start_on(&dir.path().join("plugin"), 21340..21360, stores.clone()).await
    }
}

/// Embedded buckets in `root`, every one under the same faults.
fn faulty_buckets(root: &std::path::Path) -> (Arc<dyn Connector>, Faults) {
    let faults = Faults::default();
    let f = faults.clone();
    let stores = LocalBuckets::new(root).wrapped(move |s| Arc::new(FaultyStore::sharing(s, f.clone())));
    (Arc::new(stores), faults)
}

/// A view of one bucket from the test, beside the plugin's (the same embedded store).
async fn bucket(stores: &dyn Connector, name: &str) -> Arc<dyn ObjectStore> {
    let secret = s3nfs::csi::params::S3Secret::parse(&secret(), "test").unwrap();
    stores.connect(&secret.s3_config(name)).await.unwrap()
}

/// A volume's whole life on embedded buckets: created, staged (a real gateway on the bucket,
/// written through NFS), unstaged (uploaded), deleted with its bucket.
#[test]
fn a_volume_lives_and_dies_on_embedded_buckets() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let (stores, faults) = faulty_buckets(&dir.path().join("buckets"));
        let plugin = InProcPlugin::start_on(&dir.path().join("plugin"), 21300..21320, stores.clone()).await;
        let Clients {
            mut controller,
            mut node,
            ..
        } = connect(&plugin.socket).await;

        let vol = controller
            .create_volume(create_req("pvc-local", &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let b = bucket(&*stores, &vol.volume_id).await;
        assert!(
            b.list("", None, None, 10).await.unwrap().objects.len() == 1,
            "the bucket holds the volume's record"
        );
        // Created again: the same volume, no second bucket.
        let again = controller
            .create_volume(create_req("pvc-local", &[]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again.volume.unwrap().volume_id, vol.volume_id);

        let staging = dir.path().join("staging");
        node.node_stage_volume(stage_req(
            &vol.volume_id,
            &staging,
            rwo(),
            secret(),
            &[("flushDelay", "50ms")],
        ))
        .await
        .unwrap();
        let port = plugin.mounter.mounted(&staging).unwrap().unwrap().port.unwrap();
        let mut c = Client::connect(([127, 0, 0, 1], port).into()).await;
        let root = c.root.clone();
        let fh = c.create(&root, "hello.txt", 0o644).await.unwrap();
        c.write(&fh, 0, b"from NFS to an embedded bucket").await.unwrap();
        c.commit(&fh).await.unwrap();
        drop(c);
        node.node_unstage_volume(unstage_req(&vol.volume_id, &staging))
            .await
            .unwrap();
        let got = b.get_range("hello.txt", 0..100).await.unwrap();
        assert_eq!(&got[..], b"from NFS to an embedded bucket");

        faults.reset_counts();
        controller.delete_volume(delete_req(&vol.volume_id)).await.unwrap();
        assert_eq!(
            b.head("hello.txt").await,
            Err(StoreError::NoSuchBucket(vol.volume_id.clone())),
            "the bucket is gone"
        );
        assert_eq!(faults.calls(Op::DeleteBucket), 1);
        plugin.stop().await;
    });
}

/// S3 down: CreateVolume and NodeStage answer UNAVAILABLE (the CO retries) and leave nothing
/// behind; back up, the same calls succeed.
#[test]
fn an_outage_is_unavailable_and_leaves_nothing_behind() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let (stores, faults) = faulty_buckets(&dir.path().join("buckets"));
        let plugin = InProcPlugin::start_on(&dir.path().join("plugin"), 21320..21340, stores.clone()).await;
        let Clients {
            mut controller,
            mut node,
            ..
        } = connect(&plugin.socket).await;

        faults.set_outage(true);
        let e = controller
            .create_volume(create_req("pvc-outage", &[]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        faults.set_outage(false);
        let vol = controller
            .create_volume(create_req("pvc-outage", &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();

        let staging = dir.path().join("staging");
        faults.set_outage(true);
        let req = stage_req(&vol.volume_id, &staging, rwo(), secret(), &[]);
        let e = node.node_stage_volume(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(plugin.mounter.mounted(&staging).unwrap().is_none(), "a mount was left");
        let statuses = plugin.supervisor.send(s3nfs::actors::StatusAll).await.unwrap();
        assert!(statuses.is_empty(), "a gateway was left running: {statuses:?}");
        faults.set_outage(false);
        node.node_stage_volume(req).await.unwrap();
        assert!(plugin.mounter.mounted(&staging).unwrap().is_some());
        node.node_unstage_volume(unstage_req(&vol.volume_id, &staging))
            .await
            .unwrap();
        plugin.stop().await;
    });
}

/// A staged volume whose gateway is not running (it could not be brought back after a restart;
/// here it is ended without an upload, as a node that lost it would) holds what is not in S3
/// yet: NodeUnstage runs its gateway once more to upload it before the state goes, and, while
/// S3 is down, answers UNAVAILABLE and keeps the state. The state was removed, and the file
/// with it.
#[test]
fn unstaging_a_volume_whose_gateway_is_not_running_uploads_what_it_holds() {
    run(async {
        let Bed {
            dir,
            stores,
            faults,
            plugin,
            clients: Clients { mut node, .. },
            vol,
        } = Bed::new("pvc-not-running").await;
        let staging = dir.path().join("staging");
        let req = stage_req(&vol.volume_id, &staging, rwo(), secret(), &[("flushDelay", "1h")]);
        node.node_stage_volume(req).await.unwrap();
        let port = plugin.mounter.mounted(&staging).unwrap().unwrap().port.unwrap();
        let mut c = Client::connect(([127, 0, 0, 1], port).into()).await;
        let root = c.root.clone();
        let fh = c.create(&root, "kept.txt", 0o644).await.unwrap();
        c.write(&fh, 0, b"acknowledged, not in S3").await.unwrap();
        c.commit(&fh).await.unwrap();
        drop(c);
        let b = bucket(&*stores, &vol.volume_id).await;
        assert!(
            b.head("kept.txt").await.unwrap().is_none(),
            "uploaded already: nothing checked"
        );
        plugin
            .supervisor
            .send(s3nfs::actors::AbandonVolume(vol.volume_id.clone()))
            .await
            .unwrap();

        faults.set_outage(true);
        let e = node
            .node_unstage_volume(unstage_req(&vol.volume_id, &staging))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        faults.set_outage(false);
        node.node_unstage_volume(unstage_req(&vol.volume_id, &staging))
            .await
            .unwrap();
        let got = b.get_range("kept.txt", 0..100).await.unwrap();
        assert_eq!(&got[..], b"acknowledged, not in S3");
        plugin.stop().await;
    });
}

/// A NodeStage without a secret (a static PV written for csi-s3 carries only a node-publish
/// secret) is done at the first publish, which brings one. Kubelet does not repeat a NodeStage
/// that succeeded, so a plugin restarted in between still knows it: that publish stages the
/// volume. It answered FailedPrecondition ("not staged") for as long as the pod lived.
#[test]
fn a_stage_deferred_to_the_first_publish_is_done_after_a_plugin_restart() {
    run(async {
        let Bed {
            dir,
            stores,
            plugin,
            clients: Clients { mut node, .. },
            vol,
            ..
        } = Bed::new("pvc-deferred").await;
        let staging = dir.path().join("staging");
        node.node_stage_volume(stage_req(&vol.volume_id, &staging, rwo(), HashMap::new(), &[]))
            .await
            .unwrap();
        assert!(
            plugin.mounter.mounted(&staging).unwrap().is_none(),
            "staged without a secret"
        );
        drop(node);
        plugin.stop().await;

        let plugin = Bed::plugin_in(&dir, &stores).await;
        let Clients { mut node, .. } = connect(&plugin.socket).await;
        let target = dir.path().join("pod");
        node.node_publish_volume(publish_req(&vol.volume_id, &staging, &target, rwo(), false, secret()))
            .await
            .expect("the first publish after the restart stages the volume");
        assert!(plugin.mounter.mounted(&staging).unwrap().is_some());
        assert!(plugin.mounter.mounted(&target).unwrap().is_some());
        let deferred: Vec<_> = std::fs::read_dir(plugin.state.join("volumes"))
            .unwrap()
            .map(|e| e.unwrap().path().join("deferred.toml"))
            .filter(|p| p.exists())
            .collect();
        assert!(
            deferred.is_empty(),
            "the deferred stage is still recorded: {deferred:?}"
        );
        node.node_unpublish_volume(unpublish_req(&vol.volume_id, &target))
            .await
            .unwrap();
        node.node_unstage_volume(unstage_req(&vol.volume_id, &staging))
            .await
            .unwrap();
        let left: Vec<_> = std::fs::read_dir(plugin.state.join("volumes")).unwrap().collect();
        assert!(left.is_empty(), "state left after the unstage: {left:?}");
        plugin.stop().await;
    });
}

/// A NodeStage whose caller gives up (kubelet's deadline passed while S3 was slow to answer)
/// still runs to its end, holding the volume: the volume comes up staged with no further call,
/// and the retry finds it so. The dropped call was abandoned where it stood.
#[test]
fn a_stage_whose_caller_gives_up_runs_to_its_end() {
    run(async {
        let Bed {
            dir,
            faults,
            plugin,
            clients: Clients { mut node, .. },
            vol,
            ..
        } = Bed::new("pvc-given-up").await;
        let staging = dir.path().join("staging");
        let req = stage_req(&vol.volume_id, &staging, rwo(), secret(), &[]);
        // The stage's first S3 request: the volume's record.
        let mut hold = faults.hold_reply(Op::Head, s3nfs::fs::names::VOLUME_RECORD);
        {
            let call = node.node_stage_volume(req.clone());
            tokio::pin!(call);
            tokio::select! {
                r = &mut call => panic!("the stage returned with S3's reply held: {r:?}"),
                reached = hold.reached(std::time::Duration::from_secs(30)) => assert!(reached, "the stage never read the record"),
            }
            // The caller gives up: the call's stream is reset.
        }
        hold.release();
        common::gateway::wait_for(
            std::time::Duration::from_secs(30),
            "the given-up stage to mount the volume",
            || {
                let m = plugin.mounter.mounted(&staging).unwrap();
                async move { m.map(|_| ()) }
            },
        )
        .await;
        node.node_stage_volume(req).await.expect("the retry");
        let running = plugin.supervisor.send(s3nfs::actors::StatusAll).await.unwrap();
        assert_eq!(running.len(), 1, "{running:?}");
        node.node_unstage_volume(unstage_req(&vol.volume_id, &staging))
            .await
            .unwrap();
        plugin.stop().await;
    });
}

/// DeleteVolume of a volume with thousands of objects deletes them in batches (one request per
/// thousand keys, not one per object); a batch that fails leaves the record, so the CO's retry
/// finishes the job.
#[test]
fn delete_volume_deletes_in_batches_and_a_failed_batch_is_retried_to_the_same_end() {
    run(async {
        let Bed {
            dir: _dir,
            stores,
            faults,
            plugin,
            clients: Clients { mut controller, .. },
            vol,
        } = Bed::new("pvc-many").await;
        let b = bucket(&*stores, &vol.volume_id).await;
        for i in 0..2500 {
            b.put(
                &format!("d/{i:05}"),
                s3nfs::store::Body::Bytes(bytes::Bytes::from_static(b"x")),
                &Default::default(),
            )
            .await
            .unwrap();
        }

        faults.reset_counts();
        faults.fail_next(Op::DeleteMany, 1, StoreError::Unavailable("injected".into()));
        let e = controller.delete_volume(delete_req(&vol.volume_id)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert_eq!(
            b.list("d/", None, None, 1).await.unwrap().objects.len(),
            1,
            "objects went with a failed batch"
        );

        faults.reset_counts();
        controller.delete_volume(delete_req(&vol.volume_id)).await.unwrap();
        // 2,500 objects: three pages of at most 1,000 (the record is left to the end).
        assert_eq!(faults.calls(Op::DeleteMany), 3);
        assert_eq!(faults.calls(Op::Delete), 1, "only the record is deleted on its own");
        assert!(matches!(b.head("d/00000").await, Err(StoreError::NoSuchBucket(_))));
        // Deleted already: the same answer.
        controller.delete_volume(delete_req(&vol.volume_id)).await.unwrap();
        plugin.stop().await;
    });
}
