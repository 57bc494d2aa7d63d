//! What the binary writes for the people and programs that read it: logs to a file or a pipe
//! carry no terminal escape codes, `--log-format json` gives one JSON object per line, and an
//! error that stops the program is one line with no backtrace.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Runs `serve` on the embedded store until it has printed its mount line, stops it with
/// SIGTERM, and returns what it wrote to stderr (a pipe).
fn serve_stderr(extra_env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_s3nfs"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .env_remove("S3NFS_LOG_FORMAT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut ready = false;
    for line in stdout.lines() {
        if line.unwrap().contains("mount -t nfs") {
            ready = true;
            break;
        }
    }
    assert!(ready, "serve ended before printing its mount command");
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "serve exited with {:?}", out.status);
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn logs_to_a_pipe_hold_no_escape_codes() {
    let err = serve_stderr(&[]);
    assert!(err.contains("INFO"), "no log lines: {err}");
    assert!(!err.contains('\x1b'), "escape codes in logs to a pipe: {err:?}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let err = serve_stderr(&[("S3NFS_LOG_FORMAT", "json")]);
    let mut lines = 0;
    for line in err.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
        assert!(v["fields"]["message"].is_string(), "{line}");
        lines += 1;
    }
    assert!(lines >= 2, "too few log lines: {err}");
    assert!(!err.contains('\x1b'));
    assert!(
        err.lines().any(|l| l.contains("\"shutting down")),
        "the shutdown line is missing: {err}"
    );
}

#[test]
fn an_error_that_stops_the_program_is_one_line_without_a_backtrace() {
    let out = Command::new(env!("CARGO_BIN_EXE_s3nfs"))
        .args(["serve", "--endpoint", "http://127.0.0.1:1", "--bucket", "b"])
        .env("RUST_BACKTRACE", "1")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "more than one line: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains("credentials"), "the cause is not named: {err}");
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
}
