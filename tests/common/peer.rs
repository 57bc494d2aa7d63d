//! The key pair node plugins share for ReadWriteMany traffic between nodes, made as an operator
//! makes the chart's Secret: with the `openssl` CLI. Without it the tests fail, never skip.

use std::path::{Path, PathBuf};

/// A self-signed ECDSA P-256 pair in `dir`: (certificate, key), PEM files named after `name`.
pub fn openssl_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (key, cert) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.crt")));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-subj", "/CN=s3nfs-peer", "-days", "2", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap_or_else(|e| {
            panic!("these tests need the openssl CLI to make the peer key pair (apt-get install openssl): {e}")
        });
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}
