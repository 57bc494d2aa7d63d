//! Exports: what to serve, where from, and on which port. From command-line flags (one export)
//! or a TOML file (several, each on its own port).
//!
//! ```toml
//! [[export]]
//! name = "team-a"
//! listen = "127.0.0.1:20490"
//! endpoint = "http://127.0.0.1:9000"   # omit for the embedded store
//! bucket = "data"
//! prefix = "team-a/"
//! region = "us-east-1"
//! flush_delay = "2s"
//! refresh = "5s"
//! busy_defer = "10s"   # how long due uploads may wait for busy clients to pause (0s: never)
//! ```
//! Credentials are never read from this file: they come from `AWS_ACCESS_KEY_ID` /
//! `AWS_SECRET_ACCESS_KEY` (or the `--access-key` / `--secret-key` flags), so the file can be
//! world-readable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::store::s3::S3Config;

#[derive(Debug, Clone)]
pub enum Backend {
    /// The embedded object store in a local directory.
    Local {
        dir: PathBuf,
    },
    S3(S3Config),
}

#[derive(Debug, Clone)]
pub struct Export {
    pub name: String,
    pub listen: SocketAddr,
    pub backend: Backend,
    pub prefix: String,
    pub state_dir: PathBuf,
    pub flush_delay: Duration,
    pub refresh: Duration,
    /// How long due uploads may wait for clients to pause (see `fs::defer::MAX_DEFER`).
    pub busy_defer: Duration,
    /// The volume's size (`df`, ENOSPC past it); None: unlimited.
    pub capacity: Option<u64>,
    pub defaults: ObjectDefaults,
    /// What COMMIT (fsync, close) waits for: the gateway's disk, or S3.
    pub durability: crate::fs::durable::Durability,
    pub squash: Squash,
}

/// Which callers act as the anonymous user, as exportfs's `root_squash`/`all_squash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Squash {
    pub mode: SquashMode,
    pub anon_uid: u32,
    pub anon_gid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SquashMode {
    /// Everyone is who their credentials say, root included: under the CSI node plugin the
    /// gateway listens on the node's loopback, and a pod's root is the volume's root, as on
    /// its own disk.
    #[default]
    None,
    /// uid 0 acts as the anonymous user (exportfs's default `root_squash`).
    Root,
    /// Everyone acts as the anonymous user.
    All,
}

impl Default for Squash {
    fn default() -> Squash {
        Squash {
            mode: SquashMode::None,
            anon_uid: 65534,
            anon_gid: 65534,
        }
    }
}

impl std::str::FromStr for SquashMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(SquashMode::None),
            "root" => Ok(SquashMode::Root),
            "all" => Ok(SquashMode::All),
            other => Err(format!("squash must be none, root or all, not {other:?}")),
        }
    }
}

/// What is reported for objects that carry no `x-amz-meta-*` attributes (written by other S3
/// tools): geesefs's `--uid`, `--gid`, `--file-mode`, `--dir-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectDefaults {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u32,
    pub dir_mode: u32,
}

impl Default for ObjectDefaults {
    fn default() -> Self {
        ObjectDefaults {
            uid: 0,
            gid: 0,
            file_mode: 0o644,
            dir_mode: 0o755,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileExport {
    name: String,
    listen: SocketAddr,
    endpoint: Option<String>,
    bucket: Option<String>,
    #[serde(default)]
    prefix: String,
    region: Option<String>,
    path_style: Option<bool>,
    data_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    flush_delay: Option<String>,
    refresh: Option<String>,
    busy_defer: Option<String>,
    durability: Option<String>,
    squash: Option<String>,
    anon_uid: Option<u32>,
    anon_gid: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(rename = "export")]
    exports: Vec<FileExport>,
}

/// "2s", "500ms", "1m", "1h", or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected e.g. 2s, 500ms, 1m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s, m or h")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Normalises a key prefix: no leading '/', one trailing '/' unless empty.
/// A size in bytes: `1048576`, `100G`, `1Ti` (K, M, G, T and Ki, Mi, Gi, Ti are all powers of
/// 1024, as `df -h` shows them).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let shift = match unit.trim_end_matches('B').trim_end_matches('i') {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

pub fn normalize_prefix(p: &str) -> String {
    let p = p.trim_matches('/');
    if p.is_empty() {
        String::new()
    } else {
        format!("{p}/")
    }
}

/// A duration from the config file, or `default` when the key is absent.
fn duration_or(v: Option<&str>, default: Duration) -> anyhow::Result<Duration> {
    Ok(v.map(parse_duration)
        .transpose()
        .map_err(anyhow::Error::msg)?
        .unwrap_or(default))
}

pub fn load(path: &Path, base_state: &Path, creds: &S3Config) -> anyhow::Result<Vec<Export>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
    let file: File = toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
    let mut out = Vec::new();
    let mut ports = std::collections::HashSet::new();
    for e in file.exports {
        if !ports.insert(e.listen) {
            anyhow::bail!("config {}: two exports listen on {}", path.display(), e.listen);
        }
        let backend = match (&e.endpoint, &e.bucket) {
            (None, None) => Backend::Local {
                dir: e
                    .data_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("s3nfs-data"))
                    .join("objects"),
            },
            (_, Some(bucket)) => Backend::S3(S3Config {
                endpoint: e.endpoint.clone(),
                bucket: bucket.clone(),
                region: e.region.clone().unwrap_or_else(|| creds.region.clone()),
                path_style: e.path_style.unwrap_or(true),
                ..creds.clone()
            }),
            (Some(_), None) => anyhow::bail!("export {}: an endpoint needs a bucket", e.name),
        };
        let dflt = Squash::default();
        let squash = Squash {
            mode: e
                .squash
                .as_deref()
                .unwrap_or("none")
                .parse()
                .map_err(anyhow::Error::msg)?,
            anon_uid: e.anon_uid.unwrap_or(dflt.anon_uid),
            anon_gid: e.anon_gid.unwrap_or(dflt.anon_gid),
        };
        out.push(Export {
            capacity: None,
            defaults: ObjectDefaults::default(),
            durability: e
                .durability
                .as_deref()
                .unwrap_or("local")
                .parse()
                .map_err(anyhow::Error::msg)?,
            squash,
            listen: e.listen,
            backend,
            prefix: normalize_prefix(&e.prefix),
            state_dir: e.state_dir.clone().unwrap_or_else(|| base_state.join(&e.name)),
            flush_delay: duration_or(e.flush_delay.as_deref(), Duration::from_secs(2))?,
            refresh: duration_or(e.refresh.as_deref(), Duration::from_secs(5))?,
            busy_defer: duration_or(e.busy_defer.as_deref(), crate::fs::defer::MAX_DEFER)?,
            name: e.name,
        });
    }
    if out.is_empty() {
        anyhow::bail!("config {}: no [[export]] sections", path.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_prefixes() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("2d").is_err());
        assert_eq!(normalize_prefix("/team-a"), "team-a/");
        assert_eq!(normalize_prefix(""), "");
    }

    #[test]
    fn config_file_with_two_exports() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[[export]]\nname='a'\nlisten='127.0.0.1:1'\n[[export]]\nname='b'\nlisten='127.0.0.1:2'\nendpoint='http://127.0.0.1:9'\nbucket='x'\nprefix='p'\n",
        )
        .unwrap();
        let e = load(&p, dir.path(), &S3Config::default()).unwrap();
        assert_eq!(e.len(), 2);
        assert!(matches!(e[0].backend, Backend::Local { .. }));
        assert_eq!(e[1].prefix, "p/");
        std::fs::write(&p, "[[export]]\nname='a'\nlisten='127.0.0.1:1'\nsecret_key='x'\n").unwrap();
        assert!(
            load(&p, dir.path(), &S3Config::default()).is_err(),
            "secrets are refused in the file"
        );
    }
}
