//! The CSI services over gRPC on a Unix socket, against Garage, outside the kernel-client guest
//! (the node's mounts go through the fake mounter; the gateways it starts are real). Every
//! invalid request must get the status the CSI spec names, every call repeated must give the
//! same answer, and volumes must come and go without leaking. The whole life of a volume with
//! real kernel mounts is in `tests/csi_guest.rs`.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::csi::{connect, mount_cap, run, rwo, Clients, InProcPlugin};
use common::garage;
use s3nfs::csi::mount::Mounter;
use s3nfs::csi::pb::{self, volume_capability::access_mode::Mode};
use s3nfs::store::ObjectStore;
use tonic::Code;

fn secret() -> HashMap<String, String> {
    garage::shared().csi_secret()
}

fn with(mut m: HashMap<String, String>, k: &str, v: &str) -> HashMap<String, String> {
    m.insert(k.into(), v.into());
    m
}

fn create_req(name: &str, params: &[(&str, &str)], bytes: i64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![rwo()],
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        secrets: secret(),
        ..Default::default()
    }
}

fn stage_req(id: &str, staging: &Path, cap: pb::VolumeCapability) -> pb::NodeStageVolumeRequest {
    common::csi::stage_req(id, staging, cap, secret(), &[("flushDelay", "100ms")])
}

fn publish_req(
    id: &str,
    staging: &Path,
    target: &Path,
    cap: pb::VolumeCapability,
    ro: bool,
) -> pb::NodePublishVolumeRequest {
    common::csi::publish_req(id, staging, target, cap, ro, HashMap::new())
}

/// Calls twice and checks both answers have `want` (idempotency of errors and successes).
macro_rules! expect {
    ($what:expr, $call:expr, $want:expr) => {{
        let mut answers = Vec::new();
        for _ in 0..2 {
            let r = $call;
            let code = match &r {
                Ok(_) => Code::Ok,
                Err(s) => s.code(),
            };
            if let Err(s) = &r {
                assert!(!s.message().is_empty(), "{}: empty error message", $what);
            }
            assert_eq!(code, $want, "{}: {:?}", $what, r.as_ref().err());
            answers.push(r.ok().map(|x| x.into_inner()));
        }
        answers.pop().unwrap()
    }};
}

#[test]
fn every_rpc_answers_invalid_requests_with_the_spec_status_and_repeats_the_same_answer() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let plugin = InProcPlugin::start(dir.path(), 21100..21140).await;
        let Clients {
            mut identity,
            mut controller,
            mut node,
        } = connect(&plugin.socket).await;
        let g = garage::shared();
        let name = format!("pvc-errors-{}", std::process::id());

        // Identity
        let info = identity
            .get_plugin_info(pb::GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, "csi.s3nfs.io");
        let probe = identity.probe(pb::ProbeRequest {}).await.unwrap().into_inner();
        assert_eq!(probe.ready, Some(true));

        // CreateVolume: invalid requests, one case a row.
        type Mutate = fn(&mut pb::CreateVolumeRequest);
        let cases: &[(&str, Mutate, Code)] = &[
            ("without a name", |r| r.name.clear(), Code::InvalidArgument),
            (
                "without capabilities",
                |r| r.volume_capabilities.clear(),
                Code::InvalidArgument,
            ),
            (
                "of a block volume",
                |r| {
                    r.volume_capabilities[0].access_type =
                        Some(pb::volume_capability::AccessType::Block(Default::default()))
                },
                Code::InvalidArgument,
            ),
            ("without a secret", |r| r.secrets.clear(), Code::InvalidArgument),
            (
                "with an unknown parameter",
                |r| drop(r.parameters.insert("bukcet".into(), "x".into())),
                Code::InvalidArgument,
            ),
            (
                "with a bad onDelete",
                |r| drop(r.parameters.insert("onDelete".into(), "keep".into())),
                Code::InvalidArgument,
            ),
            (
                "with its limit under its required size",
                |r| {
                    r.capacity_range = Some(pb::CapacityRange {
                        required_bytes: 2 << 20,
                        limit_bytes: 1 << 20,
                    })
                },
                Code::OutOfRange,
            ),
            (
                "from a source",
                |r| r.volume_content_source = Some(Default::default()),
                Code::InvalidArgument,
            ),
            (
                "with an ftp endpoint",
                |r| r.secrets = with(secret(), "endpoint", "ftp://127.0.0.1:1"),
                Code::InvalidArgument,
            ),
            (
                "with a wrong secret key",
                |r| r.secrets = with(secret(), "secretAccessKey", "wrong"),
                Code::PermissionDenied,
            ),
            (
                "with S3 unreachable",
                |r| r.secrets = with(secret(), "endpoint", "http://127.0.0.1:1"),
                Code::Unavailable,
            ),
        ];
        for (what, mutate, code) in cases {
            let mut r = create_req(&name, &[], 1 << 20);
            mutate(&mut r);
            expect!(
                format!("create {what}"),
                controller.create_volume(r.clone()).await,
                *code
            );
        }

        // CreateVolume: a bucket per volume, idempotent by name, AlreadyExists on another size
        let created = expect!(
            "create",
            controller.create_volume(create_req(&name, &[], 8 << 20)).await,
            Code::Ok
        )
        .unwrap()
        .volume
        .unwrap();
        assert_eq!(created.volume_id, name, "a bucket per volume: the id is the bucket");
        assert_eq!(created.capacity_bytes, 8 << 20);
        expect!(
            "create again with a larger size",
            controller.create_volume(create_req(&name, &[], 16 << 20)).await,
            Code::AlreadyExists
        );
        let id = created.volume_id.clone();

        // A long name gets a valid, stable bucket.
        let long = format!("pvc-{}-{}", "x".repeat(70), std::process::id());
        let a = controller
            .create_volume(create_req(&long, &[], 1 << 20))
            .await
            .unwrap()
            .into_inner();
        let b = controller
            .create_volume(create_req(&long, &[], 1 << 20))
            .await
            .unwrap()
            .into_inner();
        let long_id = a.volume.unwrap().volume_id;
        assert!(long_id.len() <= 63, "{long_id}");
        assert_eq!(long_id, b.volume.unwrap().volume_id);

        // ValidateVolumeCapabilities
        let validate = |id: &str, caps: Vec<pb::VolumeCapability>| pb::ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            secrets: secret(),
            ..Default::default()
        };
        expect!(
            "validate without an id",
            controller.validate_volume_capabilities(validate("", vec![rwo()])).await,
            Code::InvalidArgument
        );
        expect!(
            "validate without caps",
            controller.validate_volume_capabilities(validate(&id, vec![])).await,
            Code::InvalidArgument
        );
        expect!(
            "validate an unknown volume",
            controller
                .validate_volume_capabilities(validate("no-such-bucket-s3nfs", vec![rwo()]))
                .await,
            Code::NotFound
        );
        let ok = expect!(
            "validate",
            controller
                .validate_volume_capabilities(validate(&id, vec![rwo()]))
                .await,
            Code::Ok
        )
        .unwrap();
        assert!(ok.confirmed.is_some());
        // ReadWriteMany: one owner gateway, the other nodes relay to it (tests/rwx.rs).
        for mode in [Mode::MultiNodeMultiWriter, Mode::MultiNodeSingleWriter] {
            let yes = expect!(
                format!("validate {mode:?}"),
                controller
                    .validate_volume_capabilities(validate(&id, vec![mount_cap(mode)]))
                    .await,
                Code::Ok
            )
            .unwrap();
            assert!(yes.confirmed.is_some(), "{mode:?}: {}", yes.message);
        }

        // ControllerPublishVolume attaches nothing: it lets Kubernetes keep a ReadWriteOnce
        // volume on one node. Checked as the spec says; idempotent (every call is made twice).
        let publish = |id: &str, node: &str, cap: Option<pb::VolumeCapability>| pb::ControllerPublishVolumeRequest {
            volume_id: id.into(),
            node_id: node.into(),
            volume_capability: cap,
            secrets: secret(),
            ..Default::default()
        };
        expect!(
            "publish without an id",
            controller
                .controller_publish_volume(publish("", "n", Some(rwo())))
                .await,
            Code::InvalidArgument
        );
        expect!(
            "publish without a node",
            controller
                .controller_publish_volume(publish(&id, "", Some(rwo())))
                .await,
            Code::InvalidArgument
        );
        expect!(
            "publish without a capability",
            controller.controller_publish_volume(publish(&id, "n", None)).await,
            Code::InvalidArgument
        );
        expect!(
            "publish an unknown volume",
            controller
                .controller_publish_volume(publish("no-such-bucket-s3nfs", "n", Some(rwo())))
                .await,
            Code::NotFound
        );
        let published = expect!(
            "publish",
            controller
                .controller_publish_volume(publish(&id, "n", Some(rwo())))
                .await,
            Code::Ok
        )
        .unwrap();
        assert!(published.publish_context.is_empty());
        let unpublish = |id: &str| pb::ControllerUnpublishVolumeRequest {
            volume_id: id.into(),
            node_id: "n".into(),
            secrets: secret(),
        };
        expect!(
            "unpublish without an id",
            controller.controller_unpublish_volume(unpublish("")).await,
            Code::InvalidArgument
        );
        expect!(
            "unpublish",
            controller.controller_unpublish_volume(unpublish(&id)).await,
            Code::Ok
        );
        let caps = controller
            .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        let publish_rpc = pb::controller_service_capability::rpc::Type::PublishUnpublishVolume as i32;
        assert!(
            caps.capabilities.iter().any(|c| matches!(
                &c.r#type,
                Some(pb::controller_service_capability::Type::Rpc(r)) if r.r#type == publish_rpc
            )),
            "PUBLISH_UNPUBLISH_VOLUME is not advertised: Kubernetes would not attach, nor keep a ReadWriteOnce volume on one node"
        );

        // ControllerExpandVolume
        let expand = |id: &str, bytes: Option<i64>| pb::ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: bytes.map(|b| pb::CapacityRange {
                required_bytes: b,
                limit_bytes: 0,
            }),
            secrets: secret(),
            ..Default::default()
        };
        expect!(
            "expand without an id",
            controller.controller_expand_volume(expand("", Some(1))).await,
            Code::InvalidArgument
        );
        expect!(
            "expand without a range",
            controller.controller_expand_volume(expand(&id, None)).await,
            Code::InvalidArgument
        );
        expect!(
            "expand an unknown volume",
            controller
                .controller_expand_volume(expand("no-such-bucket-s3nfs", Some(1 << 30)))
                .await,
            Code::NotFound
        );

        // NodeStage
        let staging = dir.path().join("staging");
        let mut r = stage_req(&id, &staging, rwo());
        r.volume_id.clear();
        expect!(
            "stage without an id",
            node.node_stage_volume(r.clone()).await,
            Code::InvalidArgument
        );
        let mut r = stage_req(&id, &staging, rwo());
        r.staging_target_path.clear();
        expect!(
            "stage without a path",
            node.node_stage_volume(r.clone()).await,
            Code::InvalidArgument
        );
        let mut r = stage_req(&id, &staging, rwo());
        r.volume_capability = None;
        expect!(
            "stage without a capability",
            node.node_stage_volume(r.clone()).await,
            Code::InvalidArgument
        );
        // This plugin has no --lease-api: it cannot take part in a ReadWriteMany volume.
        expect!(
            "stage for multi-node writing on a node without a lease store",
            node.node_stage_volume(stage_req(&id, &staging, mount_cap(Mode::MultiNodeMultiWriter)))
                .await,
            Code::FailedPrecondition
        );
        let refused = node
            .node_stage_volume(stage_req(&id, &staging, mount_cap(Mode::MultiNodeSingleWriter)))
            .await
            .unwrap_err();
        assert!(refused.message().contains("--lease-api"), "{}", refused.message());
        let mut r = stage_req(&id, &staging, rwo());
        r.secrets = with(secret(), "secretAccessKey", "wrong");
        expect!(
            "stage with a wrong key",
            node.node_stage_volume(r.clone()).await,
            Code::PermissionDenied
        );
        let mut r = stage_req(&id, &staging, rwo());
        r.secrets = with(secret(), "endpoint", "http://127.0.0.1:1");
        expect!(
            "stage with S3 unreachable",
            node.node_stage_volume(r.clone()).await,
            Code::Unavailable
        );
        // ... and nothing was left behind.
        assert!(plugin.mounter.mounted(&staging).unwrap().is_none());
        let left = plugin.supervisor.send(s3nfs::actors::StatusAll).await.unwrap();
        assert!(left.is_empty(), "gateways left behind: {left:?}");
        assert_eq!(std::fs::read_dir(plugin.state.join("volumes")).unwrap().count(), 0);

        expect!(
            "stage",
            node.node_stage_volume(stage_req(&id, &staging, rwo())).await,
            Code::Ok
        );
        let other = dir.path().join("staging-other");
        expect!(
            "stage the same volume elsewhere",
            node.node_stage_volume(stage_req(&id, &other, rwo())).await,
            Code::AlreadyExists
        );
        for mode in [Mode::SingleNodeReaderOnly, Mode::SingleNodeSingleWriter] {
            expect!(
                &format!("stage again in {mode:?}"),
                node.node_stage_volume(stage_req(&id, &staging, mount_cap(mode))).await,
                Code::AlreadyExists
            );
        }
        expect!(
            "stage again as before",
            node.node_stage_volume(stage_req(&id, &staging, rwo())).await,
            Code::Ok
        );

        // NodePublish
        let t1 = dir.path().join("pods/1/mount");
        let t2 = dir.path().join("pods/2/mount");
        let mut r = publish_req(&id, &staging, &t1, rwo(), false);
        r.target_path.clear();
        expect!(
            "publish without a target",
            node.node_publish_volume(r.clone()).await,
            Code::InvalidArgument
        );
        let mut r = publish_req(&id, &staging, &t1, rwo(), false);
        r.volume_capability = None;
        expect!(
            "publish without a capability",
            node.node_publish_volume(r.clone()).await,
            Code::InvalidArgument
        );
        expect!(
            "publish from a path that is not staged",
            node.node_publish_volume(publish_req(&id, &other, &t1, rwo(), false))
                .await,
            Code::FailedPrecondition
        );
        expect!(
            "publish",
            node.node_publish_volume(publish_req(&id, &staging, &t1, rwo(), false))
                .await,
            Code::Ok
        );
        expect!(
            "publish the same target read-only",
            node.node_publish_volume(publish_req(&id, &staging, &t1, rwo(), true))
                .await,
            Code::AlreadyExists
        );
        expect!(
            "publish read-only",
            node.node_publish_volume(publish_req(&id, &staging, &t2, rwo(), true))
                .await,
            Code::Ok
        );
        assert!(plugin.mounter.mounted(&t2).unwrap().unwrap().read_only);
        // A bind of this volume that a publish made and did not record (its plugin killed
        // between the two): the retry answers OK and records it, for the unpublish.
        let t3 = dir.path().join("pods/3/mount");
        plugin.mounter.bind(&staging, &t3, false).unwrap();
        expect!(
            "publish over this volume's unrecorded bind",
            node.node_publish_volume(publish_req(&id, &staging, &t3, rwo(), false))
                .await,
            Code::Ok
        );

        // NodeGetVolumeStats
        let stats = |path: &Path| pb::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: path.to_string_lossy().into(),
            ..Default::default()
        };
        let mut r = stats(&t1);
        r.volume_path.clear();
        expect!(
            "stats without a path",
            node.node_get_volume_stats(r.clone()).await,
            Code::InvalidArgument
        );
        expect!(
            "stats of another path",
            node.node_get_volume_stats(stats(&other)).await,
            Code::NotFound
        );
        let s = expect!("stats", node.node_get_volume_stats(stats(&t1)).await, Code::Ok).unwrap();
        let bytes = s
            .usage
            .iter()
            .find(|u| u.unit == pb::volume_usage::Unit::Bytes as i32)
            .unwrap();
        assert_eq!(bytes.total, 8 << 20, "the capacity is the CreateVolume size");

        // Expansion: controller then node; the stats show it.
        let e = expect!(
            "expand",
            controller.controller_expand_volume(expand(&id, Some(32 << 20))).await,
            Code::Ok
        )
        .unwrap();
        assert_eq!(e.capacity_bytes, 32 << 20);
        assert!(e.node_expansion_required);
        let nexp = |id: &str| pb::NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: t1.to_string_lossy().into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: 32 << 20,
                limit_bytes: 0,
            }),
            ..Default::default()
        };
        expect!(
            "node expand of an unknown volume",
            node.node_expand_volume(nexp("unknown-vol")).await,
            Code::NotFound
        );
        expect!("node expand", node.node_expand_volume(nexp(&id)).await, Code::Ok);
        let s = node.node_get_volume_stats(stats(&t1)).await.unwrap().into_inner();
        let bytes = s
            .usage
            .iter()
            .find(|u| u.unit == pb::volume_usage::Unit::Bytes as i32)
            .unwrap();
        assert_eq!(bytes.total, 32 << 20);

        // SINGLE_NODE_SINGLE_WRITER: one target only.
        let sname = format!("pvc-single-{}", std::process::id());
        let sid = controller
            .create_volume(create_req(&sname, &[], 1 << 20))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        let single = mount_cap(Mode::SingleNodeSingleWriter);
        let sst = dir.path().join("staging-single");
        node.node_stage_volume(stage_req(&sid, &sst, single.clone()))
            .await
            .unwrap();
        expect!(
            "publish single writer",
            node.node_publish_volume(publish_req(&sid, &sst, &dir.path().join("s1"), single.clone(), false))
                .await,
            Code::Ok
        );
        expect!(
            "publish single writer at a second target",
            node.node_publish_volume(publish_req(&sid, &sst, &dir.path().join("s2"), single.clone(), false))
                .await,
            Code::FailedPrecondition
        );

        // NodeUnpublish
        let unpublish = common::csi::unpublish_req;
        expect!(
            "unpublish without a target",
            node.node_unpublish_volume(unpublish(&id, Path::new(""))).await,
            Code::InvalidArgument
        );
        expect!(
            "unpublish",
            node.node_unpublish_volume(unpublish(&id, &t1)).await,
            Code::Ok
        );
        assert!(!t1.exists(), "unpublish removes the target directory");
        expect!(
            "unpublish",
            node.node_unpublish_volume(unpublish(&id, &t2)).await,
            Code::Ok
        );
        expect!(
            "unpublish of the recorded bind",
            node.node_unpublish_volume(unpublish(&id, &t3)).await,
            Code::Ok
        );
        assert!(plugin.mounter.mounted(&t3).unwrap().is_none());
        expect!(
            "unpublish of a target that never was",
            node.node_unpublish_volume(unpublish(&id, &dir.path().join("never")))
                .await,
            Code::Ok
        );
        node.node_unpublish_volume(unpublish(&sid, &dir.path().join("s1")))
            .await
            .unwrap();

        // NodeUnstage
        let unstage = common::csi::unstage_req;
        expect!(
            "unstage without a path",
            node.node_unstage_volume(unstage(&id, Path::new(""))).await,
            Code::InvalidArgument
        );
        expect!(
            "unstage",
            node.node_unstage_volume(unstage(&id, &staging)).await,
            Code::Ok
        );
        // Staged again later (after a plugin restart, or on another node): the capacity is the
        // expanded one, read from the volume's record in the bucket.
        let again = dir.path().join("staging-again");
        node.node_stage_volume(stage_req(&id, &again, rwo())).await.unwrap();
        let s = node.node_get_volume_stats(stats(&again)).await.unwrap().into_inner();
        let bytes = s
            .usage
            .iter()
            .find(|u| u.unit == pb::volume_usage::Unit::Bytes as i32)
            .unwrap();
        assert_eq!(bytes.total, 32 << 20, "the expansion did not outlive the staging");
        node.node_unstage_volume(unstage(&id, &again)).await.unwrap();
        expect!("unstage", node.node_unstage_volume(unstage(&sid, &sst)).await, Code::Ok);
        assert!(plugin
            .supervisor
            .send(s3nfs::actors::StatusAll)
            .await
            .unwrap()
            .is_empty());

        // DeleteVolume: the bucket goes; deleting again, or what never was, is OK.
        let delete = |id: &str| pb::DeleteVolumeRequest {
            volume_id: id.into(),
            secrets: secret(),
        };
        expect!(
            "delete without an id",
            controller.delete_volume(delete("")).await,
            Code::InvalidArgument
        );
        expect!("delete", controller.delete_volume(delete(&id)).await, Code::Ok);
        expect!(
            "delete what never was",
            controller.delete_volume(delete("never-was-s3nfs/x")).await,
            Code::Ok
        );
        let store = s3nfs::store::s3::S3Store::connect(g.s3_config(&id)).await.unwrap();
        assert!(
            matches!(store.check().await, Err(s3nfs::store::StoreError::NoSuchBucket(_))),
            "the volume's bucket is gone"
        );
        controller.delete_volume(delete(&sid)).await.unwrap();
        controller.delete_volume(delete(&long_id)).await.unwrap();
        plugin.stop().await;
    });
}

#[test]
fn a_prefix_per_volume_in_a_shared_bucket_is_deleted_or_retained_as_the_class_says() {
    run(async {
        let g = garage::shared();
        let bucket = g.unique_bucket();
        let dir = tempfile::tempdir().unwrap();
        let plugin = InProcPlugin::start(dir.path(), 21140..21150).await;
        let mut c = connect(&plugin.socket).await;
        let store = s3nfs::store::s3::S3Store::connect(g.s3_config(&bucket)).await.unwrap();
        for (name, on_delete, kept) in [("pvc-del", "delete", false), ("pvc-keep", "retain", true)] {
            let v = c
                .controller
                .create_volume(create_req(
                    name,
                    &[("bucket", &bucket), ("onDelete", on_delete)],
                    1 << 20,
                ))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap();
            assert_eq!(v.volume_id, format!("{bucket}/{name}"), "csi-s3's id grammar");
            // A file in the volume, as a pod would have written it.
            store
                .put(
                    &format!("{name}/data.txt"),
                    s3nfs::store::Body::Bytes("x".into()),
                    &Default::default(),
                )
                .await
                .unwrap();
            c.controller
                .delete_volume(pb::DeleteVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    secrets: secret(),
                })
                .await
                .unwrap();
            let left = store.head(&format!("{name}/data.txt")).await.unwrap().is_some();
            assert_eq!(left, kept, "{name}: onDelete={on_delete}");
        }
        // The shared bucket itself stays.
        assert!(store.check().await.is_ok());
        plugin.stop().await;
    });
}
