//! aws-sdk-s3 implementation of [`ObjectStore`](super::ObjectStore). (being written)

use std::fmt;

/// A secret string: never printed, never logged.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where and how to reach an S3 service.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    /// e.g. `http://127.0.0.1:9000`; `None` means AWS's own endpoint for `region`.
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`), as MinIO and Garage want.
    pub path_style: bool,
    /// Credentials; when absent, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
    /// `AWS_SESSION_TOKEN` are read from the environment.
    pub access_key: Option<String>,
    pub secret_key: Option<Secret>,
    pub session_token: Option<Secret>,
}

pub struct S3Store;
