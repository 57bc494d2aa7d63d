//! The Kubernetes deployment in deploy/ (Helm chart and plain manifests) renders, lints,
//! validates against the Kubernetes schemas and has the properties the CSI driver depends on.
//! The checks are in tests/deploy/check.py; this runs it, so `cargo test` covers deploy/ too.
//!
//! Needs python3 with helm-python-sdk and kubernetes-validate, which .ci/run installs. Missing
//! packages fail this test (with that hint) rather than skip it.

use std::path::Path;
use std::process::Command;

#[test]
fn chart_and_manifests_pass_tests_deploy_check_py() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("python3")
        .arg("tests/deploy/check.py")
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
            "tests/deploy/check.py: Python packages missing; run .ci/run (it installs helm-python-sdk and kubernetes-validate)\n{stderr}"
        ),
        _ => panic!("tests/deploy/check.py failed ({}):\n{stdout}{stderr}", output.status),
    }
}
