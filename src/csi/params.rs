//! What arrives in CSI requests, parsed once: volume ids, the S3 Secret, StorageClass
//! parameters and volume context. csi-s3's names throughout, so that its users move over by
//! changing the driver name:
//! - volume id `bucket[/prefix]` (a bucket per volume, or a prefix per volume in a bucket);
//! - Secret keys `accessKeyID`, `secretAccessKey`, `endpoint`, `region`, `insecure`;
//! - parameters `bucket`, `mounter`, `options` (geesefs options; `--uid`, `--gid`,
//!   `--file-mode`, `--dir-mode` mean here what they mean there), plus s3nfs's own `onDelete`,
//!   `flushDelay` and `refresh`.

use std::collections::HashMap;
use std::time::Duration;

use tonic::Status;

use crate::config::{parse_duration, ObjectDefaults};
use crate::store::s3::{S3Config, Secret};

/// A volume: a bucket, and a key prefix inside it (empty, or ending in '/').
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VolumeId {
    pub bucket: String,
    pub prefix: String,
}

impl VolumeId {
    pub fn parse(id: &str) -> Result<VolumeId, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("volume_id is missing"));
        }
        let (bucket, prefix) = match id.split_once('/') {
            Some((b, p)) => (b, p.trim_end_matches('/')),
            None => (id, ""),
        };
        check_bucket(bucket).map_err(|m| Status::invalid_argument(format!("volume_id {id:?}: {m}")))?;
        if prefix.starts_with('/') || prefix.split('/').any(|c| c == "." || c == "..") || prefix.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "volume_id {id:?}: the prefix must be a relative key path"
            )));
        }
        Ok(VolumeId {
            bucket: bucket.to_string(),
            prefix: crate::config::normalize_prefix(prefix),
        })
    }

    /// `bucket` or `bucket/prefix`, as csi-s3 writes them.
    pub fn to_id(&self) -> String {
        if self.prefix.is_empty() {
            self.bucket.clone()
        } else {
            format!("{}/{}", self.bucket, self.prefix.trim_end_matches('/'))
        }
    }

    /// The key of the volume's record (see [`super::record`]).
    pub fn record_key(&self) -> String {
        format!("{}{}", self.prefix, crate::fs::names::VOLUME_RECORD)
    }
}

/// S3's bucket naming rules, as far as a wrong name would only fail later and less clearly.
fn check_bucket(b: &str) -> Result<(), String> {
    if b.len() < 3 || b.len() > 63 {
        return Err(format!("bucket name {b:?} must be 3 to 63 characters"));
    }
    if !b
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_')
    {
        return Err(format!("bucket name {b:?} has characters S3 does not allow"));
    }
    Ok(())
}

/// A bucket name for a volume named `name` (a PV name such as `pvc-<uuid>`): lower case, only
/// the characters S3 allows, at most 63. A longer name is cut and given 8 hex digits of a hash
/// of the whole name, so two long names that share their start still get different buckets and
/// the same name always gets the same bucket (CreateVolume is retried with the same name).
pub fn bucket_for_name(name: &str) -> String {
    const MAX: usize = 63;
    let clean: String = name
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-') => c,
            _ => '-',
        })
        .collect();
    let clean = clean.trim_matches('-');
    if clean == name && (3..=MAX).contains(&clean.len()) {
        return clean.to_string();
    }
    // Changed or too long: a hash of the original keeps distinct names distinct.
    let head = clean[..clean.len().min(MAX - 9)].trim_end_matches('-');
    let hash = crc32fast::hash(name.as_bytes());
    if head.is_empty() {
        format!("v-{hash:08x}")
    } else {
        format!("{head}-{hash:08x}")
    }
}

/// A prefix for a volume named `name` inside a shared bucket: the name itself, as csi-s3 does,
/// unless it holds characters that make poor keys.
pub fn prefix_for_name(name: &str) -> String {
    let p: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if p == name && !p.starts_with('.') {
        p
    } else {
        format!("{}-{:08x}", p.trim_start_matches('.'), crc32fast::hash(name.as_bytes()))
    }
}

/// The S3 connection a Secret describes.
#[derive(Clone)]
pub struct S3Secret {
    pub access_key: String,
    pub secret_key: Secret,
    pub endpoint: Option<String>,
    pub region: String,
}

impl std::fmt::Debug for S3Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Secret")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl S3Secret {
    /// `which` names the Secret in errors (`provisioner`, `node-stage`...).
    pub fn parse(secrets: &HashMap<String, String>, which: &str) -> Result<S3Secret, Status> {
        let get = |k: &str| secrets.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let missing = |k: &str| {
            Status::invalid_argument(format!(
                "the {which} secret has no {k:?}: set csi.storage.k8s.io/{which}-secret-name and -namespace in the StorageClass (or the PV's {which} secret ref) to a Secret with accessKeyID, secretAccessKey and endpoint"
            ))
        };
        let access_key = get("accessKeyID").ok_or_else(|| missing("accessKeyID"))?.to_string();
        let secret_key = Secret(
            get("secretAccessKey")
                .ok_or_else(|| missing("secretAccessKey"))?
                .to_string(),
        );
        let endpoint = match get("endpoint") {
            None => None,
            Some(e) if e.starts_with("http://") || e.starts_with("https://") => {
                Some(e.trim_end_matches('/').to_string())
            }
            // csi-s3 accepts a bare host; it means https.
            Some(e) if !e.contains("://") => Some(format!("https://{e}")),
            Some(e) => {
                return Err(Status::invalid_argument(format!(
                    "the {which} secret's endpoint {e:?} is neither http:// nor https://"
                )))
            }
        };
        if let Some(v) = get("insecure") {
            if v.parse::<bool>().map_err(|_| {
                Status::invalid_argument(format!(
                    "the {which} secret's insecure must be true or false, not {v:?}"
                ))
            })? {
                tracing::info!("secret key insecure=true: TLS certificates are always verified by s3nfs; use an http:// endpoint for plain connections");
            }
        }
        Ok(S3Secret {
            access_key,
            secret_key,
            endpoint,
            region: get("region").unwrap_or("us-east-1").to_string(),
        })
    }

    pub fn s3_config(&self, bucket: &str) -> S3Config {
        // MinIO, Garage, Ceph... want path-style; AWS wants virtual-hosted.
        let aws = self.endpoint.as_deref().is_none_or(|e| e.contains(".amazonaws.com"));
        S3Config {
            endpoint: self.endpoint.clone(),
            bucket: bucket.to_string(),
            region: self.region.clone(),
            path_style: !aws,
            access_key: Some(self.access_key.clone()),
            secret_key: Some(self.secret_key.clone()),
            session_token: None,
        }
    }

    /// The Secret back as a map, for the node's credentials file.
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert("accessKeyID".into(), self.access_key.clone());
        m.insert("secretAccessKey".into(), self.secret_key.0.clone());
        if let Some(e) = &self.endpoint {
            m.insert("endpoint".into(), e.clone());
        }
        m.insert("region".into(), self.region.clone());
        m
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    Delete,
    Retain,
}

/// StorageClass parameters (CreateVolume) and volume context (NodeStage) in one shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub bucket: Option<String>,
    pub on_delete: OnDelete,
    pub flush_delay: Duration,
    pub refresh: Duration,
    /// `durability`: what an fsync waits for (local disk or S3).
    pub durability: crate::fs::durable::Durability,
    pub defaults: ObjectDefaults,
    /// `options` as given, passed on in the volume context.
    pub options: String,
}

/// Keys that CreateVolume passes on into the volume context.
pub const CONTEXT_KEYS: &[&str] = &["mounter", "options", "flushDelay", "refresh", "durability"];

impl Params {
    /// `strict`: unknown keys are an error (a StorageClass typo must not be silently ignored);
    /// otherwise they are logged (a static PV written for csi-s3 carries keys of its own).
    pub fn parse(map: &HashMap<String, String>, strict: bool) -> Result<Params, Status> {
        let mut p = Params {
            bucket: None,
            on_delete: OnDelete::Delete,
            flush_delay: Duration::from_secs(2),
            refresh: Duration::from_secs(5),
            durability: Default::default(),
            defaults: ObjectDefaults::default(),
            options: String::new(),
        };
        let bad = |k: &str, v: &str, why: String| Status::invalid_argument(format!("parameter {k}={v:?}: {why}"));
        for (k, v) in map {
            match k.as_str() {
                "bucket" => {
                    if !v.is_empty() {
                        check_bucket(v).map_err(|m| bad(k, v, m))?;
                        p.bucket = Some(v.clone());
                    }
                }
                "onDelete" => {
                    p.on_delete = match v.as_str() {
                        "delete" | "" => OnDelete::Delete,
                        "retain" => OnDelete::Retain,
                        _ => return Err(bad(k, v, "must be delete or retain".into())),
                    }
                }
                "flushDelay" => p.flush_delay = parse_duration(v).map_err(|m| bad(k, v, m))?,
                "refresh" => p.refresh = parse_duration(v).map_err(|m| bad(k, v, m))?,
                "durability" => p.durability = v.parse().map_err(|m| bad(k, v, m))?,
                "mounter" => {
                    if !v.is_empty() && v != "s3nfs" {
                        tracing::info!(mounter = %v, "parameter mounter is ignored: s3nfs volumes are always served by the s3nfs gateway over NFS");
                    }
                }
                "options" => {
                    p.defaults = parse_options(v).map_err(|m| bad(k, v, m))?;
                    p.options = v.clone();
                }
                k if k.starts_with("csi.storage.k8s.io/") => {}
                _ if strict => {
                    return Err(Status::invalid_argument(format!(
                        "unknown parameter {k:?}; known: bucket, mounter, options, onDelete, flushDelay, refresh, durability"
                    )))
                }
                _ => tracing::debug!(key = %k, "volume context key not used by s3nfs"),
            }
        }
        Ok(p)
    }
}

/// geesefs options: `--uid N --gid N --file-mode 0644 --dir-mode 0755` (also `--opt=value`).
/// The others have no meaning for an NFS gateway; they are ignored, with a log line naming them.
pub fn parse_options(s: &str) -> Result<ObjectDefaults, String> {
    let mut d = ObjectDefaults::default();
    let mut words = s.split_whitespace().peekable();
    let mut ignored = Vec::new();
    while let Some(w) = words.next() {
        let (opt, inline) = match w.split_once('=') {
            Some((o, v)) => (o, Some(v.to_string())),
            None => (w, None),
        };
        let known = matches!(opt, "--uid" | "--gid" | "--file-mode" | "--dir-mode");
        if !known {
            ignored.push(w.to_string());
            // A value that follows an option we do not know is skipped with it.
            if inline.is_none() && words.peek().is_some_and(|n| !n.starts_with('-')) {
                ignored.push(words.next().unwrap().to_string());
            }
            continue;
        }
        let v = match inline {
            Some(v) => v,
            None => words.next().ok_or_else(|| format!("{opt} needs a value"))?.to_string(),
        };
        match opt {
            "--uid" => d.uid = v.parse().map_err(|_| format!("{opt} {v:?} is not a number"))?,
            "--gid" => d.gid = v.parse().map_err(|_| format!("{opt} {v:?} is not a number"))?,
            _ => {
                let m = u32::from_str_radix(v.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| format!("{opt} {v:?} is not an octal mode"))?;
                if opt == "--file-mode" {
                    d.file_mode = m;
                } else {
                    d.dir_mode = m;
                }
            }
        }
    }
    if !ignored.is_empty() {
        tracing::info!(options = %ignored.join(" "), "mount options ignored: they have no meaning for the s3nfs gateway");
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_follow_csi_s3() {
        let v = VolumeId::parse("data/pvc-1").unwrap();
        assert_eq!((v.bucket.as_str(), v.prefix.as_str()), ("data", "pvc-1/"));
        assert_eq!(v.to_id(), "data/pvc-1");
        let v = VolumeId::parse("data/a/b/").unwrap();
        assert_eq!(v.prefix, "a/b/");
        let v = VolumeId::parse("pvc-2").unwrap();
        assert_eq!((v.bucket.as_str(), v.prefix.as_str()), ("pvc-2", ""));
        assert_eq!(v.record_key(), ".s3nfs-volume.toml");
        for bad in ["", "ab", "da ta/x", "data//x", "data/../x", "data/a/./b"] {
            assert!(VolumeId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn long_names_become_valid_distinct_stable_buckets() {
        let a = "pvc-".to_string() + &"x".repeat(80) + "a";
        let b = "pvc-".to_string() + &"x".repeat(80) + "b";
        let (ba, bb) = (bucket_for_name(&a), bucket_for_name(&b));
        assert!(ba.len() <= 63 && bb.len() <= 63);
        assert_ne!(ba, bb);
        assert_eq!(ba, bucket_for_name(&a));
        assert!(check_bucket(&ba).is_ok());
        assert_eq!(bucket_for_name("pvc-0a1b"), "pvc-0a1b");
        let odd = bucket_for_name("PVC_Upper");
        assert!(
            check_bucket(&odd).is_ok() && odd != bucket_for_name("pvc-upper"),
            "{odd}"
        );
    }

    #[test]
    fn geesefs_options_set_defaults_and_others_are_ignored() {
        let d =
            parse_options("--memory-limit 1000 --uid 1000 --gid=2000 --dir-mode 0777 --file-mode=0666 -o allow_other")
                .unwrap();
        assert_eq!(
            d,
            ObjectDefaults {
                uid: 1000,
                gid: 2000,
                file_mode: 0o666,
                dir_mode: 0o777
            }
        );
        assert!(parse_options("--uid x").is_err());
        assert!(parse_options("--file-mode 999").is_err());
        assert!(parse_options("--gid").is_err());
    }

    #[test]
    fn unknown_parameters_are_refused_only_when_strict() {
        let mut m = HashMap::new();
        m.insert("bucket".to_string(), "data".to_string());
        m.insert("csi.storage.k8s.io/pvc/name".to_string(), "x".to_string());
        assert_eq!(Params::parse(&m, true).unwrap().bucket.as_deref(), Some("data"));
        m.insert("bukcet".to_string(), "x".to_string());
        assert_eq!(
            Params::parse(&m, true).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert!(Params::parse(&m, false).is_ok());
        m.insert("onDelete".to_string(), "keep".to_string());
        assert!(Params::parse(&m, false).is_err());
    }
}

/// What an access mode allows, as far as the node needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// A read-only mode: every mount of it is read-only.
    pub read_only: bool,
    /// SINGLE_NODE_SINGLE_WRITER: one publish target at a time.
    pub single_target: bool,
    /// MULTI_NODE_SINGLE_WRITER or MULTI_NODE_MULTI_WRITER: one owner gateway, other nodes
    /// relay to it (see [`crate::cluster`]).
    pub multi_node: bool,
}

/// Checks one volume capability: a mount (not a block device) in an access mode s3nfs can
/// honour. Every mode is: writing from several nodes goes through one owner gateway that the
/// other nodes relay to, so there is one write-back cache, never one per node.
pub fn check_capability(cap: &super::pb::VolumeCapability) -> Result<Access, String> {
    use super::pb::volume_capability::{access_mode::Mode, AccessType};
    match &cap.access_type {
        Some(AccessType::Mount(_)) => {}
        Some(AccessType::Block(_)) => return Err("block access is not supported: s3nfs volumes are filesystems".into()),
        None => return Err("volume capability has no access_type (mount)".into()),
    }
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or("volume capability has no access_mode")?
        .mode;
    let access = |read_only, single_target, multi_node| Access {
        read_only,
        single_target,
        multi_node,
    };
    match Mode::try_from(mode) {
        Ok(Mode::SingleNodeWriter | Mode::SingleNodeMultiWriter) => Ok(access(false, false, false)),
        Ok(Mode::SingleNodeSingleWriter) => Ok(access(false, true, false)),
        Ok(Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly) => Ok(access(true, false, false)),
        Ok(Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter) => Ok(access(false, false, true)),
        Ok(Mode::Unknown) | Err(_) => Err(format!("access mode {mode} is unknown")),
    }
}

/// Checks a list of capabilities (CreateVolume, ValidateVolumeCapabilities).
pub fn check_capabilities(caps: &[super::pb::VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities is missing"));
    }
    for c in caps {
        check_capability(c).map_err(Status::invalid_argument)?;
    }
    Ok(())
}

/// Capacity given when CreateVolume names none.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;

/// The capacity to give for a range: the required size, else the limit, else the default.
pub fn capacity_for(range: Option<&super::pb::CapacityRange>) -> Result<u64, Status> {
    let Some(r) = range else {
        return Ok(DEFAULT_CAPACITY);
    };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(Status::invalid_argument("capacity_range has a negative size"));
    }
    let (req, lim) = (r.required_bytes as u64, r.limit_bytes as u64);
    if lim > 0 && req > lim {
        return Err(Status::out_of_range(format!(
            "capacity_range asks for at least {req} and at most {lim} bytes"
        )));
    }
    Ok(if req > 0 {
        req
    } else if lim > 0 {
        lim
    } else {
        DEFAULT_CAPACITY
    })
}

/// Whether an existing capacity satisfies a requested range.
pub fn capacity_fits(capacity: u64, range: Option<&super::pb::CapacityRange>) -> bool {
    match range {
        None => true,
        Some(r) => {
            capacity >= r.required_bytes.max(0) as u64 && (r.limit_bytes <= 0 || capacity <= r.limit_bytes as u64)
        }
    }
}
