//! The Kubernetes deployment in deploy/ (Helm chart and plain manifests) renders, lints,
//! validates against the Kubernetes schemas and has the properties the CSI driver depends on.
//! The checks are in tests/deploy/check.py; this runs it, so `cargo test` covers deploy/ too.
//!
//! The chart's alerts and dashboard must name metrics the code exports: this renders the
//! process's metrics registry (`s3nfs::metrics`, the text `GET /metrics` serves) with one volume
//! registered and one NFS operation and one S3 request recorded, so that every series and label
//! shows, and hands the text to check.py in `S3NFS_METRICS_EXPOSITION`.
//!
//! Needs python3 with helm-python-sdk, kubernetes-validate and promql-parser, and node with the
//! npm package of tests/deploy/package.json, which .ci/run installs. Missing packages fail this
//! test (with that hint) rather than skip it.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use s3nfs::metrics::{global, VolumeSample, VolumeSource};

/// A volume's figures as a volume reports them; only the shape matters here.
struct Sample;

impl VolumeSource for Sample {
    fn sample(&self) -> VolumeSample {
        VolumeSample {
            capacity_bytes: Some(1 << 30),
            ..Default::default()
        }
    }
}

fn exposition() -> String {
    let vol: Arc<dyn VolumeSource> = Arc::new(Sample);
    global().register_volume("pvc-example", &vol);
    global().nfs_op("WRITE", Duration::from_millis(1), true);
    global().s3_request("PutObject", Duration::from_millis(1), true);
    let text = global().render();
    global().unregister_volume("pvc-example");
    text
}

#[test]
fn chart_and_manifests_pass_tests_deploy_check_py() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let metrics = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy-metrics.txt");
    std::fs::write(&metrics, exposition()).unwrap();
    let output = Command::new("python3")
        .arg("tests/deploy/check.py")
        .env("S3NFS_METRICS_EXPOSITION", &metrics)
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 tests/deploy/check.py ({e}): install python3, then run .ci/run")
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    match output.status.code() {
        Some(0) => {}
        Some(2) => panic!(
            "tests/deploy/check.py: Python packages, node or the npm package missing; run .ci/run (it installs helm-python-sdk, kubernetes-validate, promql-parser, nodejs and tests/deploy's npm package)\n{stderr}"
        ),
        _ => panic!("tests/deploy/check.py failed ({}):\n{stdout}{stderr}", output.status),
    }
}
