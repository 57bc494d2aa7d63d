//! The volume record: a small TOML object at the root of each volume the controller created
//! (`<prefix>.s3nfs-volume.toml`), holding what the volume id cannot say: its name, its capacity
//! and what to do with its data on delete. It lives with the data, so the controller keeps no
//! database, and any node that stages the volume later, after a restart or elsewhere, reads the
//! capacity as last expanded. The gateway never shows this key as a file (see
//! [`crate::fs::names::VOLUME_RECORD`]). A static PV moved over from csi-s3 has no record: it has
//! no capacity and its data is never deleted by s3nfs.

use bytes::Bytes;

use super::params::{OnDelete, VolumeId};
use crate::store::{Body, ObjectStore, StoreError, StoreResult, UserMeta};

/// Records larger than this are not ours: refuse them rather than download them.
const MAX_RECORD: u64 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeRecord {
    /// The CreateVolume name (the PV name).
    pub name: String,
    pub capacity_bytes: u64,
    pub on_delete: OnDelete,
}

pub async fn read(store: &dyn ObjectStore, vol: &VolumeId) -> StoreResult<Option<VolumeRecord>> {
    let key = vol.record_key();
    let Some(head) = store.head(&key).await? else {
        return Ok(None);
    };
    if head.size > MAX_RECORD {
        return Err(StoreError::Invalid(format!(
            "{key} is {} bytes: not an s3nfs volume record",
            head.size
        )));
    }
    let bytes = store.get_range(&key, 0..head.size).await?;
    let text = std::str::from_utf8(&bytes).map_err(|_| StoreError::Invalid(format!("{key} is not UTF-8")))?;
    toml::from_str(text)
        .map(Some)
        .map_err(|e| StoreError::Invalid(format!("{key} is not an s3nfs volume record: {e}")))
}

pub async fn write(store: &dyn ObjectStore, vol: &VolumeId, rec: &VolumeRecord) -> StoreResult<()> {
    let text = toml::to_string(rec).map_err(|e| StoreError::Invalid(e.to_string()))?;
    store
        .put(&vol.record_key(), Body::Bytes(Bytes::from(text)), &UserMeta::new())
        .await?;
    Ok(())
}
