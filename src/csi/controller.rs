//! Controller: creates and deletes volumes (a bucket per volume, or a prefix per volume in the
//! StorageClass's bucket, as csi-s3 does) and raises their capacity. It keeps no database: the
//! volume id names the bucket and prefix, and the volume record in the bucket says the rest.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::params::{
    bucket_for_name, capacity_fits, capacity_for, check_capabilities, prefix_for_name, OnDelete, Params, S3Secret,
    VolumeId, CONTEXT_KEYS,
};
use super::pb::{self, controller_server::Controller, controller_service_capability as csc};
use super::record::{self, VolumeRecord};
use super::store_status;
use crate::store::connect::Connector;
use crate::store::{ObjectStore, StoreError};

pub struct ControllerService {
    stores: Arc<dyn Connector>,
}

impl ControllerService {
    pub fn new(stores: Arc<dyn Connector>) -> ControllerService {
        ControllerService { stores }
    }
}

/// A client for one bucket with the credentials of a request.
pub async fn connect(stores: &dyn Connector, secret: &S3Secret, bucket: &str) -> Result<Arc<dyn ObjectStore>, Status> {
    stores
        .connect(&secret.s3_config(bucket))
        .await
        .map_err(|e| Status::invalid_argument(format!("S3 settings of the secret: {e}")))
}

/// The record of an existing volume, None when the volume (or its bucket) does not exist.
/// A bucket or prefix with objects but no record is a volume made elsewhere (a static PV).
async fn find(store: &dyn ObjectStore, vol: &VolumeId) -> Result<Option<Option<VolumeRecord>>, Status> {
    let what = format!("reading volume {}", vol.to_id());
    match record::read(store, vol).await {
        Ok(Some(r)) => Ok(Some(Some(r))),
        Ok(None) => match store.list(&vol.prefix, None, None, 1).await {
            Ok(page) if page.objects.is_empty() && page.prefixes.is_empty() => {
                // An empty bucket (a volume made by csi-s3 with nothing written yet) exists;
                // an empty prefix does not.
                Ok(if vol.prefix.is_empty() { Some(None) } else { None })
            }
            Ok(_) => Ok(Some(None)),
            Err(StoreError::NoSuchBucket(_)) => Ok(None),
            Err(e) => Err(store_status(&e, &what)),
        },
        Err(StoreError::NoSuchBucket(_)) => Ok(None),
        Err(e) => Err(store_status(&e, &what)),
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(Status::invalid_argument("name is missing"));
        }
        check_capabilities(&r.volume_capabilities)?;
        if r.volume_content_source.is_some() {
            return Err(Status::invalid_argument(
                "volume_content_source: s3nfs cannot create a volume from a snapshot or another volume",
            ));
        }
        let params = Params::parse(&r.parameters, true)?;
        let capacity = capacity_for(r.capacity_range.as_ref())?;
        let secret = S3Secret::parse(&r.secrets, "provisioner")?;
        let vol = match &params.bucket {
            Some(b) => VolumeId {
                bucket: b.clone(),
                prefix: format!("{}/", prefix_for_name(&r.name)),
            },
            None => VolumeId {
                bucket: bucket_for_name(&r.name),
                prefix: String::new(),
            },
        };
        let id = vol.to_id();
        let store = connect(&*self.stores, &secret, &vol.bucket).await?;
        store
            .create_bucket(&secret.region)
            .await
            .map_err(|e| store_status(&e, &format!("creating bucket {}", vol.bucket)))?;
        let capacity = match record::read(&*store, &vol).await {
            Ok(Some(rec)) if rec.name != r.name => {
                return Err(Status::already_exists(format!(
                    "volume id {id} already belongs to volume {:?}",
                    rec.name
                )))
            }
            Ok(Some(rec)) if !capacity_fits(rec.capacity_bytes, r.capacity_range.as_ref()) => {
                return Err(Status::already_exists(format!(
                    "volume {} exists with a capacity of {} bytes, outside the requested range",
                    r.name, rec.capacity_bytes
                )))
            }
            Ok(Some(rec)) => rec.capacity_bytes,
            Ok(None) => {
                let rec = VolumeRecord {
                    name: r.name.clone(),
                    capacity_bytes: capacity,
                    on_delete: params.on_delete,
                };
                record::write(&*store, &vol, &rec)
                    .await
                    .map_err(|e| store_status(&e, &format!("recording volume {id}")))?;
                tracing::info!(volume = %id, name = %r.name, capacity, "volume created");
                capacity
            }
            Err(e) => return Err(store_status(&e, &format!("reading volume {id}"))),
        };
        let volume_context = r
            .parameters
            .iter()
            .filter(|(k, _)| CONTEXT_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(pb::Volume {
                capacity_bytes: capacity as i64,
                volume_id: id,
                volume_context,
                content_source: None,
            }),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        let vol = VolumeId::parse(&r.volume_id)?;
        let secret = S3Secret::parse(&r.secrets, "provisioner")?;
        let store = connect(&*self.stores, &secret, &vol.bucket).await?;
        let id = vol.to_id();
        let rec = match find(&*store, &vol).await? {
            None => return Ok(Response::new(pb::DeleteVolumeResponse {})),
            Some(None) => {
                // Not created by s3nfs (a static PV of existing data): never deleted by it.
                tracing::info!(volume = %id, "volume has no s3nfs record: its data is left in place");
                return Ok(Response::new(pb::DeleteVolumeResponse {}));
            }
            Some(Some(rec)) => rec,
        };
        if rec.on_delete == OnDelete::Retain {
            tracing::info!(volume = %id, "onDelete=retain: the volume's data is kept");
            return Ok(Response::new(pb::DeleteVolumeResponse {}));
        }
        delete_prefix(&*store, &vol)
            .await
            .map_err(|e| store_status(&e, &format!("deleting the data of volume {id}")))?;
        // The record goes last: a delete interrupted before it is retried with the same result.
        store
            .delete(&vol.record_key())
            .await
            .map_err(|e| store_status(&e, &format!("deleting volume {id}")))?;
        if vol.prefix.is_empty() {
            store
                .delete_bucket()
                .await
                .map_err(|e| store_status(&e, &format!("deleting bucket {}", vol.bucket)))?;
        }
        tracing::info!(volume = %id, "volume deleted with its data");
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        let vol = VolumeId::parse(&r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is missing"));
        }
        let secret = S3Secret::parse(&r.secrets, "controller")?;
        let store = connect(&*self.stores, &secret, &vol.bucket).await?;
        if find(&*store, &vol).await?.is_none() {
            return Err(Status::not_found(format!("volume {} does not exist", vol.to_id())));
        }
        if let Err(s) = check_capabilities(&r.volume_capabilities) {
            return Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: s.message().to_string(),
            }));
        }
        Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                volume_context: r.volume_context,
                volume_capabilities: r.volume_capabilities,
                parameters: r.parameters,
                mutable_parameters: Default::default(),
            }),
            message: String::new(),
        }))
    }

    /// Attaches nothing (the node plugin reaches S3 itself): it is what lets Kubernetes keep a
    /// ReadWriteOnce volume on one node at a time, as its attach/detach controller refuses a
    /// second node for a volume attached elsewhere ("Multi-Attach error"); ReadWriteMany and
    /// ReadOnlyMany volumes attach to many. Checks what it can: the request, and, given the
    /// secrets, that the volume exists.
    async fn controller_publish_volume(
        &self,
        req: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let vol = VolumeId::parse(&r.volume_id)?;
        if r.node_id.is_empty() {
            return Err(Status::invalid_argument("node_id is missing"));
        }
        let Some(cap) = r.volume_capability.as_ref() else {
            return Err(Status::invalid_argument("volume_capability is missing"));
        };
        check_capabilities(std::slice::from_ref(cap))?;
        if !r.secrets.is_empty() {
            let secret = S3Secret::parse(&r.secrets, "controller-publish")?;
            let store = connect(&*self.stores, &secret, &vol.bucket).await?;
            if find(&*store, &vol).await?.is_none() {
                return Err(Status::not_found(format!("volume {} does not exist", vol.to_id())));
            }
        }
        Ok(Response::new(pb::ControllerPublishVolumeResponse {
            publish_context: Default::default(),
        }))
    }

    /// Nothing was attached: done, whatever the volume or node (the spec's answer for a volume
    /// that can be taken as unpublished).
    async fn controller_unpublish_volume(
        &self,
        req: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        VolumeId::parse(&req.into_inner().volume_id)?;
        Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        let rpc = |t: csc::rpc::Type| pb::ControllerServiceCapability {
            r#type: Some(csc::Type::Rpc(csc::Rpc { r#type: t as i32 })),
        };
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities: vec![
                rpc(csc::rpc::Type::CreateDeleteVolume),
                rpc(csc::rpc::Type::PublishUnpublishVolume),
                rpc(csc::rpc::Type::ExpandVolume),
                rpc(csc::rpc::Type::SingleNodeMultiWriter),
            ],
        }))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let vol = VolumeId::parse(&r.volume_id)?;
        let Some(range) = r.capacity_range.as_ref() else {
            return Err(Status::invalid_argument("capacity_range is missing"));
        };
        let wanted = capacity_for(Some(range))?;
        let secret = S3Secret::parse(&r.secrets, "controller-expand")?;
        let store = connect(&*self.stores, &secret, &vol.bucket).await?;
        let id = vol.to_id();
        let mut rec = match find(&*store, &vol).await? {
            None => return Err(Status::not_found(format!("volume {id} does not exist"))),
            Some(None) => {
                return Err(Status::failed_precondition(format!(
                    "volume {id} was not created by s3nfs (no record of its capacity) and has no capacity to expand"
                )))
            }
            Some(Some(rec)) => rec,
        };
        if wanted > rec.capacity_bytes {
            rec.capacity_bytes = wanted;
            record::write(&*store, &vol, &rec)
                .await
                .map_err(|e| store_status(&e, &format!("recording the capacity of volume {id}")))?;
            tracing::info!(volume = %id, capacity = wanted, "volume expanded");
        }
        Ok(Response::new(pb::ControllerExpandVolumeResponse {
            capacity_bytes: rec.capacity_bytes as i64,
            node_expansion_required: true,
        }))
    }
}

/// Deletes every object of a volume but its record.
async fn delete_prefix(store: &dyn ObjectStore, vol: &VolumeId) -> Result<(), StoreError> {
    let record = vol.record_key();
    loop {
        // Listing from the start each time: what was deleted is gone from the next page.
        let page = store.list(&vol.prefix, None, None, 1000).await?;
        let keys: Vec<_> = page
            .objects
            .into_iter()
            .map(|o| o.key)
            .filter(|k| *k != record)
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        // One DeleteObjects request per page.
        store.delete_many(&keys).await?;
    }
}
