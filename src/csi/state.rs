//! What the node plugin records of each staged volume, so that a plugin restarted after a crash
//! or an upgrade brings every gateway back, on the same port with the same local state, before
//! it answers any call: the kernel's hard mounts then resume where they paused.
//!
//! Layout under `--state-dir` (a hostPath, so it outlives the plugin's pod):
//! ```text
//! volumes/<volume id, '/' and '%' escaped>/
//!     volume.toml   the volume, its port, staging path, publish targets (no secrets)
//!     deferred.toml a NodeStage without a secret, to be done at the first publish (no secrets)
//!     secret.toml   the S3 credentials, mode 0600 (readable by root alone)
//!     gateway/      the gateway's own state: sled database, journal, staged files
//! ```
//! Files are replaced atomically (write, fsync, rename), so a crash leaves the old or the new.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::params::{S3Secret, VolumeId};
use crate::store::s3::Secret;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagedVolume {
    pub volume_id: String,
    pub port: u16,
    pub staging_path: PathBuf,
    pub capacity: Option<u64>,
    /// The volume context it was staged with (flushDelay, refresh, options).
    pub context: BTreeMap<String, String>,
    /// SINGLE_NODE_SINGLE_WRITER: at most one target.
    pub single_target: bool,
    /// Staged in a read-only access mode: every target is read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Publish targets and whether each is read-only.
    pub targets: BTreeMap<PathBuf, bool>,
    /// Staged in a MULTI_NODE writer mode: served by a member of the volume's cluster.
    #[serde(default)]
    pub multi_node: bool,
}

/// What a NodeStage without a secret asked for: the gateway starts at the first publish,
/// which brings one. Recorded, because kubelet does not repeat a NodeStage that succeeded: a
/// plugin restarted in between must still stage the volume at that publish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeferredStage {
    pub staging_path: PathBuf,
    pub context: BTreeMap<String, String>,
    pub single_target: bool,
    pub read_only: bool,
    pub multi_node: bool,
}

#[derive(Serialize, Deserialize)]
struct SecretFile {
    access_key_id: String,
    secret_access_key: String,
    endpoint: Option<String>,
    region: String,
}

pub struct NodeState {
    root: PathBuf,
}

const VOLUME: &str = "volume.toml";
const DEFERRED: &str = "deferred.toml";

fn escape(id: &str) -> String {
    id.replace('%', "%25").replace('/', "%2F")
}

fn unescape(s: &str) -> String {
    s.replace("%2F", "/").replace("%25", "%")
}

/// Writes `path` atomically with `mode`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl NodeState {
    pub fn open(root: &Path) -> std::io::Result<NodeState> {
        let vols = root.join("volumes");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&vols)?;
        Ok(NodeState {
            root: root.to_path_buf(),
        })
    }

    pub fn volume_dir(&self, id: &VolumeId) -> PathBuf {
        self.root.join("volumes").join(escape(&id.to_id()))
    }

    pub fn gateway_dir(&self, id: &VolumeId) -> PathBuf {
        self.volume_dir(id).join("gateway")
    }

    pub fn save(&self, v: &StagedVolume, secret: Option<&S3Secret>) -> std::io::Result<()> {
        let id = VolumeId::parse(&v.volume_id).map_err(|s| std::io::Error::other(s.message().to_string()))?;
        let dir = self.volume_dir(&id);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        if let Some(s) = secret {
            let f = SecretFile {
                access_key_id: s.access_key.clone(),
                secret_access_key: s.secret_key.0.clone(),
                endpoint: s.endpoint.clone(),
                region: s.region.clone(),
            };
            write_atomic(
                &dir.join("secret.toml"),
                toml::to_string(&f).map_err(std::io::Error::other)?.as_bytes(),
                0o600,
            )?;
        }
        write_atomic(
            &dir.join(VOLUME),
            toml::to_string(v).map_err(std::io::Error::other)?.as_bytes(),
            0o600,
        )
    }

    /// Records a stage deferred to the first publish.
    pub fn save_deferred(&self, id: &VolumeId, d: &DeferredStage) -> std::io::Result<()> {
        let dir = self.volume_dir(id);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        write_atomic(
            &dir.join(DEFERRED),
            toml::to_string(d).map_err(std::io::Error::other)?.as_bytes(),
            0o600,
        )
    }

    /// Forgets a deferred stage (done, or unstaged); its volume's other records stay.
    pub fn remove_deferred(&self, id: &VolumeId) -> std::io::Result<()> {
        let dir = self.volume_dir(id);
        match std::fs::remove_file(dir.join(DEFERRED)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        // A directory that held the deferred stage alone goes with it.
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::DirectoryNotEmpty
                ) => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Every recorded deferred stage, by volume id. Unreadable records are reported.
    pub fn load_deferred(&self) -> Vec<Result<(String, DeferredStage), String>> {
        self.volume_dirs()
            .into_iter()
            .filter(|(dir, _)| dir.join(DEFERRED).exists())
            .map(|(dir, name)| {
                let text = std::fs::read_to_string(dir.join(DEFERRED))
                    .map_err(|e| format!("volume {name}: {DEFERRED}: {e}"))?;
                let d = toml::from_str(&text).map_err(|e| format!("volume {name}: {DEFERRED}: {e}"))?;
                Ok((name, d))
            })
            .collect()
    }

    /// Each volume's directory, with its volume id.
    fn volume_dirs(&self) -> Vec<(PathBuf, String)> {
        let Ok(rd) = std::fs::read_dir(self.root.join("volumes")) else {
            return Vec::new();
        };
        rd.flatten()
            .map(|e| (e.path(), unescape(&e.file_name().to_string_lossy())))
            .collect()
    }

    /// Forgets a volume and its local state (after a clean unstage: everything is in S3).
    pub fn remove(&self, id: &VolumeId) -> std::io::Result<()> {
        match std::fs::remove_dir_all(self.volume_dir(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The recorded volume `id` with its secret.
    pub fn load(&self, id: &VolumeId) -> Result<(StagedVolume, S3Secret), String> {
        Self::load_dir(&self.volume_dir(id), &id.to_id())
    }

    /// Every recorded staged volume with its secret (a volume whose stage is deferred and
    /// never was done has none). Unreadable records are reported, not fatal.
    pub fn load_all(&self) -> Vec<Result<(StagedVolume, S3Secret), String>> {
        self.volume_dirs()
            .into_iter()
            .filter(|(dir, _)| !(dir.join(DEFERRED).exists() && !dir.join(VOLUME).exists()))
            .map(|(dir, name)| Self::load_dir(&dir, &name))
            .collect()
    }

    fn load_dir(dir: &Path, name: &str) -> Result<(StagedVolume, S3Secret), String> {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).map_err(|e| format!("volume {name}: {f}: {e}"));
        let v: StagedVolume = toml::from_str(&read(VOLUME)?).map_err(|e| format!("volume {name}: {e}"))?;
        let s: SecretFile = toml::from_str(&read("secret.toml")?).map_err(|e| format!("volume {name}: {e}"))?;
        Ok((
            v,
            S3Secret {
                access_key: s.access_key_id,
                secret_key: Secret(s.secret_access_key),
                endpoint: s.endpoint,
                region: s.region,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn records_round_trip_and_secrets_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let st = NodeState::open(dir.path()).unwrap();
        let v = StagedVolume {
            volume_id: "data/pvc-1".into(),
            port: 20500,
            staging_path: "/var/lib/kubelet/staging/x".into(),
            capacity: Some(1 << 30),
            context: BTreeMap::new(),
            single_target: false,
            read_only: false,
            targets: [(PathBuf::from("/t/1"), true)].into_iter().collect(),
            multi_node: true,
        };
        let secret = S3Secret {
            access_key: "AK".into(),
            secret_key: Secret("SK".into()),
            endpoint: Some("http://127.0.0.1:9000".into()),
            region: "garage".into(),
        };
        st.save(&v, Some(&secret)).unwrap();
        let id = VolumeId::parse("data/pvc-1").unwrap();
        let mode = std::fs::metadata(st.volume_dir(&id).join("secret.toml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "secret readable by others: {mode:o}");
        let dmode = std::fs::metadata(dir.path().join("volumes"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dmode & 0o077, 0);
        let all = st.load_all();
        assert_eq!(all.len(), 1);
        let (v2, s2) = all.into_iter().next().unwrap().unwrap();
        assert_eq!(v2, v);
        assert_eq!(s2.secret_key.0, "SK");
        assert_eq!(st.load(&id).unwrap().0, v);
        st.remove(&id).unwrap();
        assert!(st.load_all().is_empty());
        st.remove(&id).unwrap();
    }

    #[test]
    fn a_deferred_stage_is_recorded_apart_from_staged_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let st = NodeState::open(dir.path()).unwrap();
        let id = VolumeId::parse("data/static").unwrap();
        let d = DeferredStage {
            staging_path: "/var/lib/kubelet/staging/s".into(),
            context: [("options".to_string(), "--uid 1000".to_string())]
                .into_iter()
                .collect(),
            single_target: false,
            read_only: true,
            multi_node: false,
        };
        st.save_deferred(&id, &d).unwrap();
        assert!(st.load_all().is_empty(), "a deferred stage is no staged volume");
        let got: Vec<_> = st.load_deferred().into_iter().map(Result::unwrap).collect();
        assert_eq!(got, vec![("data/static".to_string(), d)]);
        let mode = std::fs::metadata(st.volume_dir(&id).join(DEFERRED))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        st.remove_deferred(&id).unwrap();
        assert!(st.load_deferred().is_empty());
        assert!(!st.volume_dir(&id).exists(), "an empty directory was left");
        st.remove_deferred(&id).unwrap();
    }
}
