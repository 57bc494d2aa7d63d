//! [`LeaseApi`] on the Kubernetes API server: `coordination.k8s.io/v1` Leases over HTTP/1.1.
//!
//! A lease's version is its `metadata.resourceVersion`. Creating is a POST to the namespace's
//! collection (409 if the name exists); replacing is a PUT naming the version last read (409 if
//! the lease moved on). The API server does the compare-and-swap, so no two writers both win.
//!
//! One connection per request: an election makes a few requests every couple of seconds, and
//! a fresh connection needs no pool, no idle timeouts and no detection of half-dead sockets.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context};
use aws_smithy_types::date_time::{DateTime, Format};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::lease::{LeaseApi, LeaseError, LeaseRecord, Versioned};

/// Where Kubernetes mounts a pod's service account: token, CA bundle and namespace.
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Bound on one request, connection and TLS included. Leases last tens of seconds and are
/// renewed every two: a request slower than this is better retried than waited for.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A Lease is well under a kilobyte even with managedFields; a reply far larger than this is
/// not a Lease, and reading it whole would only cost memory.
const MAX_REPLY: usize = 1 << 20;

/// Server-supplied text quoted in errors is cut to this many characters to keep logs readable.
const MAX_MESSAGE: usize = 300;

/// The API server's Lease resource in one namespace.
pub struct KubeLeases {
    /// `host:port` as written in the URL, for the `Host` header and error messages.
    authority: String,
    /// The host without IPv6 brackets, for connecting.
    host: String,
    port: u16,
    /// `None` for plain http.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    namespace: String,
    token_file: Option<PathBuf>,
}

impl KubeLeases {
    /// From inside a pod: the API server's ClusterIP service from `KUBERNETES_SERVICE_HOST` and
    /// `KUBERNETES_SERVICE_PORT`, the service account's token and CA, and `namespace` or else the
    /// pod's own namespace. The API server's certificate carries the ClusterIP as an IP SAN, so
    /// TLS checks the IP rather than a DNS name.
    pub fn in_cluster(namespace: Option<String>) -> anyhow::Result<Self> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .context("KUBERNETES_SERVICE_HOST is not set: not running in a Kubernetes pod")?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT")
            .context("KUBERNETES_SERVICE_PORT is not set: not running in a Kubernetes pod")?;
        let dir = PathBuf::from(SERVICE_ACCOUNT);
        let ca_path = dir.join("ca.crt");
        let ca = std::fs::read(&ca_path).with_context(|| format!("reading {}", ca_path.display()))?;
        let namespace = match namespace {
            Some(ns) => ns,
            None => {
                let path = dir.join("namespace");
                std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .trim()
                    .to_string()
            }
        };
        // An IPv6 ClusterIP needs brackets in a URL.
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        Self::new(
            &format!("https://{host}:{port}"),
            &namespace,
            Some(dir.join("token")),
            Some(ca),
        )
    }

    /// An API server at `base_url` (`https://host:port`, or `http://host:port`, which exists
    /// for tests against a stand-in: a real API server only speaks TLS). `token_file` holds a
    /// bearer token, read again for every request because projected tokens rotate. `ca_pem` is
    /// the only trust root for https: the API server's CA, not the system's.
    pub fn new(
        base_url: &str,
        namespace: &str,
        token_file: Option<PathBuf>,
        ca_pem: Option<Vec<u8>>,
    ) -> anyhow::Result<Self> {
        let uri: hyper::Uri = base_url
            .parse()
            .with_context(|| format!("API server URL {base_url:?}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => bail!("API server URL {base_url:?}: the scheme must be http or https"),
        };
        ensure!(
            matches!(uri.path(), "" | "/") && uri.query().is_none(),
            "API server URL {base_url:?}: a path or query is not supported"
        );
        let url_host = uri
            .host()
            .with_context(|| format!("API server URL {base_url:?} has no host"))?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host = url_host.trim_start_matches('[').trim_end_matches(']').to_string();
        ensure!(
            is_dns_label(namespace),
            "namespace {namespace:?} is not a DNS label (lowercase letters, digits, '-')"
        );
        let tls = match (https, ca_pem) {
            (true, Some(pem)) => Some(tls_connector(&pem, &host)?),
            (true, None) => bail!("https to {base_url}: the API server's CA certificate is needed"),
            (false, Some(_)) => bail!("http to {base_url}: a CA certificate has no use without TLS"),
            (false, None) => None,
        };
        Ok(KubeLeases {
            authority: format!("{url_host}:{port}"),
            host,
            port,
            tls,
            namespace: namespace.to_string(),
            token_file,
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn collection_path(&self) -> String {
        format!("/apis/coordination.k8s.io/v1/namespaces/{}/leases", self.namespace)
    }

    fn lease_path(&self, name: &str) -> String {
        format!("{}/{name}", self.collection_path())
    }

    /// The `Authorization` header's value, from the token file as it is now.
    async fn authorization(&self) -> Result<Option<HeaderValue>, LeaseError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        // Errors name the file, never its content.
        let token = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| LeaseError::Refused(format!("reading the token file {}: {e}", path.display())))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(LeaseError::Refused(format!(
                "the token file {} is empty",
                path.display()
            )));
        }
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            LeaseError::Refused(format!(
                "the token file {} holds characters a header cannot carry",
                path.display()
            ))
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
    }

    /// One request, bounded by [`REQUEST_TIMEOUT`]: the reply's status and body, or
    /// `Unavailable` if there was none.
    async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<(StatusCode, Bytes), LeaseError> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, &self.authority)
            .header(USER_AGENT, "s3nfs")
            .header(ACCEPT, "application/json")
            // One request per connection: the server may close as soon as it has answered.
            .header(CONNECTION, "close");
        if let Some(auth) = self.authorization().await? {
            req = req.header(AUTHORIZATION, auth);
        }
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| LeaseError::Refused(format!("{method} {path}: {e}")))?;
        let reply = match tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(req)).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => {
                return Err(LeaseError::Unavailable(format!(
                    "{method} {path} on {}: {e}",
                    self.authority
                )))
            }
            Err(_) => {
                return Err(LeaseError::Unavailable(format!(
                    "{method} {path} on {}: no reply within {REQUEST_TIMEOUT:?}",
                    self.authority
                )))
            }
        };
        tracing::debug!(%method, path, status = %reply.0, "kubernetes API");
        Ok(reply)
    }

    async fn exchange(&self, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        // Requests are single small writes; Nagle would only delay them.
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => send(tcp, req).await,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                send(tls, req).await
            }
        }
    }
}

/// Sends `req` over a fresh HTTP/1.1 connection on `io` and reads the whole reply.
async fn send<S>(io: S, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    let exchange = async move {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_REPLY)
            .collect()
            .await
            .map_err(|e| format!("reading the reply: {e}"))?
            .to_bytes();
        Ok((status, body))
        // `sender` drops here, which lets `conn` finish.
    };
    // The connection is driven alongside the exchange rather than spawned, so a timeout that
    // drops this future closes the socket instead of leaving a task behind. Once the reply
    // has been read whole, how the connection ended does not matter.
    let (reply, _conn) = tokio::join!(exchange, conn);
    reply
}

fn tls_connector(ca_pem: &[u8], host: &str) -> anyhow::Result<(TlsConnector, ServerName<'static>)> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(cert.context("the API server's CA bundle is not valid PEM")?)
            .context("the API server's CA bundle holds an unusable certificate")?;
    }
    ensure!(!roots.is_empty(), "the API server's CA bundle holds no certificate");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(host)
        .with_context(|| format!("{host:?} is neither an IP address nor a DNS name"))?
        .to_owned();
    Ok((TlsConnector::from(Arc::new(config)), name))
}

#[async_trait::async_trait]
impl LeaseApi for KubeLeases {
    async fn get(&self, name: &str) -> Result<Option<Versioned>, LeaseError> {
        check_name(name)?;
        let (status, body) = self.call(Method::GET, &self.lease_path(name), None).await?;
        match status {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => parse_lease(&body).map(Some),
            s => Err(error_for(s, &body)),
        }
    }

    async fn create(&self, name: &str, record: &LeaseRecord) -> Result<Versioned, LeaseError> {
        check_name(name)?;
        let body = lease_body(&self.namespace, name, record, None)?;
        let (status, reply) = self.call(Method::POST, &self.collection_path(), Some(body)).await?;
        match status {
            s if s.is_success() => parse_lease(&reply),
            s => Err(error_for(s, &reply)),
        }
    }

    async fn update(&self, name: &str, record: &LeaseRecord, version: &str) -> Result<Versioned, LeaseError> {
        check_name(name)?;
        // Without a version the API server refuses a Lease update (422) rather than making it
        // unconditional; catching it here gives the caller a clearer message.
        if version.is_empty() {
            return Err(LeaseError::Refused(
                "an update must name the version it replaces".into(),
            ));
        }
        let body = lease_body(&self.namespace, name, record, Some(version))?;
        let (status, reply) = self.call(Method::PUT, &self.lease_path(name), Some(body)).await?;
        match status {
            // 201 when the lease had been deleted meanwhile: Leases allow create-on-update.
            s if s.is_success() => parse_lease(&reply),
            s => Err(error_for(s, &reply)),
        }
    }
}

/// The error for an unsuccessful reply: 409 is the compare-and-swap losing; throttling and
/// server errors pass; every other refusal needs someone to fix a cause.
fn error_for(status: StatusCode, body: &[u8]) -> LeaseError {
    let text = match status_message(body) {
        Some(message) => format!("{status}: {message}"),
        None => status.to_string(),
    };
    match status.as_u16() {
        409 => LeaseError::Conflict,
        429 | 500..=599 => LeaseError::Unavailable(text),
        _ => LeaseError::Refused(text),
    }
}

/// The `message` of a `Status` object, if the body is one.
fn status_message(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let message = value.get("message")?.as_str()?;
    Some(message.chars().take(MAX_MESSAGE).collect())
}

fn check_name(name: &str) -> Result<(), LeaseError> {
    if is_dns_subdomain(name) {
        Ok(())
    } else {
        Err(LeaseError::Refused(format!(
            "lease name {name:?} is not a DNS subdomain (lowercase letters, digits, '-' and '.', at most 253)"
        )))
    }
}

/// RFC 1123 subdomain as Kubernetes checks object names: dot-separated labels of lowercase
/// letters, digits and '-', each starting and ending with a letter or digit, 253 at most.
pub fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_label_shape)
}

/// RFC 1123 label, as namespaces are: one label of at most 63.
fn is_dns_label(name: &str) -> bool {
    name.len() <= 63 && is_label_shape(name)
}

fn is_label_shape(label: &str) -> bool {
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = label.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => alnum(first) && alnum(last) && bytes.iter().all(|b| alnum(b) || *b == b'-'),
        _ => false,
    }
}

/// A Lease object as sent and as received; unknown fields of a reply (uid, managedFields,
/// labels...) are ignored, absent ones are `None` and are left out when sending.
#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
struct LeaseObject {
    #[serde(skip_serializing_if = "Option::is_none")]
    api_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spec: Option<LeaseSpec>,
}

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource_version: Option<String>,
}

/// Integers are i64 so that a negative value in a reply is reported rather than failing as a
/// type mismatch.
#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
struct LeaseSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    holder_identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_duration_seconds: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    acquire_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    renew_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_transitions: Option<i64>,
}

/// The Lease object for `record`. The API server's fields are int32 and it refuses a
/// `leaseDurationSeconds` of 0, so 0 is left out and values past `i32::MAX` are refused here.
fn lease_object(
    namespace: &str,
    name: &str,
    record: &LeaseRecord,
    version: Option<&str>,
) -> Result<LeaseObject, LeaseError> {
    let int32 = |field: &str, v: u32| {
        i32::try_from(v)
            .map(i64::from)
            .map_err(|_| LeaseError::Refused(format!("{field} {v} does not fit the Lease's int32")))
    };
    let time = |t: Option<SystemTime>| t.map(micro_time).transpose().map_err(LeaseError::Refused);
    Ok(LeaseObject {
        api_version: Some("coordination.k8s.io/v1".into()),
        kind: Some("Lease".into()),
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            resource_version: version.map(str::to_string),
        },
        spec: Some(LeaseSpec {
            holder_identity: record.holder.clone(),
            lease_duration_seconds: match record.duration_secs {
                0 => None,
                d => Some(int32("leaseDurationSeconds", d)?),
            },
            acquire_time: time(record.acquire_time)?,
            renew_time: time(record.renew_time)?,
            lease_transitions: Some(int32("leaseTransitions", record.transitions)?),
        }),
    })
}

fn lease_body(namespace: &str, name: &str, record: &LeaseRecord, version: Option<&str>) -> Result<Vec<u8>, LeaseError> {
    let object = lease_object(namespace, name, record, version)?;
    serde_json::to_vec(&object).map_err(|e| LeaseError::Refused(format!("encoding the lease: {e}")))
}

/// A successful reply that is not a Lease means something other than an API server answered,
/// which retrying does not fix: `Refused`.
fn parse_lease(body: &[u8]) -> Result<Versioned, LeaseError> {
    let bad = |what: String| LeaseError::Refused(format!("the API server's reply is not a usable Lease: {what}"));
    let object: LeaseObject = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    let version = object
        .metadata
        .resource_version
        .filter(|v| !v.is_empty())
        .ok_or_else(|| bad("no metadata.resourceVersion".into()))?;
    let spec = object.spec.unwrap_or_default();
    let count =
        |field: &str, v: Option<i64>| u32::try_from(v.unwrap_or(0)).map_err(|_| bad(format!("{field} is {v:?}")));
    let time = |field: &str, v: Option<String>| {
        v.map(|s| parse_micro_time(&s).map_err(|e| bad(format!("{field}: {e}"))))
            .transpose()
    };
    Ok(Versioned {
        record: LeaseRecord {
            holder: spec.holder_identity,
            duration_secs: count("leaseDurationSeconds", spec.lease_duration_seconds)?,
            acquire_time: time("acquireTime", spec.acquire_time)?,
            renew_time: time("renewTime", spec.renew_time)?,
            transitions: count("leaseTransitions", spec.lease_transitions)?,
        },
        version,
    })
}

/// Kubernetes MicroTime: RFC 3339 in UTC with exactly six fractional digits. The API server
/// parses it with a fixed-width layout, so a shorter fraction (or none) is refused.
fn micro_time(t: SystemTime) -> Result<String, String> {
    let dt = DateTime::from(t);
    // Whole seconds format without a fraction; the fraction is appended at fixed width.
    let whole = DateTime::from_secs(dt.secs())
        .fmt(Format::DateTime)
        .map_err(|e| format!("time {dt} has no RFC 3339 form: {e}"))?;
    let stem = whole
        .strip_suffix('Z')
        .ok_or_else(|| format!("unexpected RFC 3339 form {whole:?}"))?;
    Ok(format!("{stem}.{:06}Z", dt.subsec_nanos() / 1_000))
}

/// Any RFC 3339 time: the API server writes MicroTime, but other writers of the same lease may
/// have sent other precisions, which it keeps as given.
fn parse_micro_time(s: &str) -> Result<SystemTime, String> {
    let dt = DateTime::from_str(s, Format::DateTimeWithOffset).map_err(|e| format!("{s:?}: {e}"))?;
    SystemTime::try_from(dt).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    /// 2026-12-04T21:30:00Z.
    const T0: u64 = 1_796_419_800;

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn micro_time_has_six_fractional_digits_in_utc() {
        assert_eq!(micro_time(at(T0, 123_456_789)).unwrap(), "2026-12-04T21:30:00.123456Z");
        assert_eq!(micro_time(at(T0, 0)).unwrap(), "2026-12-04T21:30:00.000000Z");
        assert_eq!(micro_time(at(T0 + 59, 7_000)).unwrap(), "2026-12-04T21:30:59.000007Z");
        assert_eq!(micro_time(at(T0, 500_000_000)).unwrap(), "2026-12-04T21:30:00.500000Z");
        assert_eq!(
            parse_micro_time("2026-12-04T21:30:00.123456Z").unwrap(),
            at(T0, 123_456_000)
        );
        assert_eq!(parse_micro_time("2026-12-04T22:30:00+01:00").unwrap(), at(T0, 0));
        assert!(parse_micro_time("yesterday").is_err());
    }

    #[test]
    fn record_survives_json_both_ways() {
        let record = LeaseRecord {
            holder: Some("node-a@10.0.0.7:20501".into()),
            duration_secs: 15,
            acquire_time: Some(at(T0, 123_456_000)),
            renew_time: Some(at(T0 + 10, 999_999_000)),
            transitions: 4,
        };
        let body = lease_body("vols", "pvc-1", &record, Some("812")).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["apiVersion"], "coordination.k8s.io/v1");
        assert_eq!(json["kind"], "Lease");
        assert_eq!(json["metadata"]["name"], "pvc-1");
        assert_eq!(json["metadata"]["namespace"], "vols");
        assert_eq!(json["metadata"]["resourceVersion"], "812");
        assert_eq!(json["spec"]["holderIdentity"], "node-a@10.0.0.7:20501");
        assert_eq!(json["spec"]["leaseDurationSeconds"], 15);
        assert_eq!(json["spec"]["acquireTime"], "2026-12-04T21:30:00.123456Z");
        assert_eq!(json["spec"]["renewTime"], "2026-12-04T21:30:10.999999Z");
        assert_eq!(json["spec"]["leaseTransitions"], 4);
        let back = parse_lease(&body).unwrap();
        assert_eq!(
            back,
            Versioned {
                record,
                version: "812".into()
            }
        );
    }

    #[test]
    fn absent_fields_are_left_out() {
        let record = LeaseRecord::default();
        let body = lease_body("vols", "pvc-1", &record, None).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let spec = json["spec"].as_object().unwrap();
        let keys: Vec<&str> = spec.keys().map(String::as_str).collect();
        assert_eq!(keys, ["leaseTransitions"], "{json}");
        assert!(json["metadata"].get("resourceVersion").is_none(), "{json}");
        // A create's body has no version yet, so it does not parse as a stored Lease.
        assert!(matches!(parse_lease(&body), Err(LeaseError::Refused(m)) if m.contains("resourceVersion")));
    }

    #[test]
    fn counts_past_int32_are_refused_before_sending() {
        let record = LeaseRecord {
            duration_secs: u32::MAX,
            ..Default::default()
        };
        assert!(matches!(
            lease_body("vols", "pvc-1", &record, None),
            Err(LeaseError::Refused(_))
        ));
    }

    /// Shaped like a kube-apiserver reply: server-filled metadata, managedFields, and a spec
    /// written by another client (fraction-less times).
    #[test]
    fn api_server_reply_with_extra_fields_parses() {
        let reply = br#"{
          "kind": "Lease",
          "apiVersion": "coordination.k8s.io/v1",
          "metadata": {
            "name": "pvc-0b7c",
            "namespace": "s3nfs",
            "uid": "5d0c4b6e-8a51-4f0e-9d3a-2f1e7c9b1a22",
            "resourceVersion": "4718329",
            "creationTimestamp": "2026-12-04T21:29:58Z",
            "labels": {"app.kubernetes.io/name": "s3nfs"},
            "managedFields": [{
              "manager": "s3nfs",
              "operation": "Update",
              "apiVersion": "coordination.k8s.io/v1",
              "time": "2026-12-04T21:30:00Z",
              "fieldsType": "FieldsV1",
              "fieldsV1": {"f:spec": {"f:holderIdentity": {}, "f:renewTime": {}}}
            }]
          },
          "spec": {
            "holderIdentity": "node-b@[fd00::2]:20501",
            "leaseDurationSeconds": 20,
            "acquireTime": "2026-12-04T21:29:58.000001Z",
            "renewTime": "2026-12-04T21:30:00Z",
            "leaseTransitions": 7,
            "strategy": "OldestEmulationVersion"
          }
        }"#;
        let lease = parse_lease(reply).unwrap();
        assert_eq!(lease.version, "4718329");
        assert_eq!(
            lease.record,
            LeaseRecord {
                holder: Some("node-b@[fd00::2]:20501".into()),
                duration_secs: 20,
                acquire_time: Some(at(T0 - 2, 1_000)),
                renew_time: Some(at(T0, 0)),
                transitions: 7,
            }
        );
        // A spec-less Lease (as `kubectl create` may leave one) is an empty record.
        let bare = parse_lease(br#"{"metadata":{"name":"x","resourceVersion":"9"}}"#).unwrap();
        assert_eq!(
            bare,
            Versioned {
                record: LeaseRecord::default(),
                version: "9".into()
            }
        );
        let negative = br#"{"metadata":{"resourceVersion":"9"},"spec":{"leaseTransitions":-1}}"#;
        assert!(matches!(parse_lease(negative), Err(LeaseError::Refused(_))));
    }

    #[test]
    fn statuses_map_to_lease_errors() {
        let status = br#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"leases.coordination.k8s.io is forbidden: User \"system:serviceaccount:s3nfs:default\" cannot update","reason":"Forbidden","code":403}"#;
        match error_for(StatusCode::FORBIDDEN, status) {
            LeaseError::Refused(m) => {
                assert!(
                    m.starts_with("403 Forbidden: leases.coordination.k8s.io is forbidden"),
                    "{m}"
                )
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(error_for(StatusCode::CONFLICT, b""), LeaseError::Conflict);
        assert!(
            matches!(error_for(StatusCode::SERVICE_UNAVAILABLE, b"<html>"), LeaseError::Unavailable(m) if m == "503 Service Unavailable")
        );
        assert!(matches!(
            error_for(StatusCode::TOO_MANY_REQUESTS, b""),
            LeaseError::Unavailable(_)
        ));
        assert!(matches!(
            error_for(StatusCode::UNPROCESSABLE_ENTITY, b""),
            LeaseError::Refused(_)
        ));
        assert!(matches!(
            error_for(StatusCode::UNAUTHORIZED, b""),
            LeaseError::Refused(_)
        ));
    }

    #[test]
    fn names_are_dns_subdomains_and_namespaces_labels() {
        for ok in ["pvc-0b7c", "a", "s3nfs.vol-1", "0x", &"a".repeat(253)] {
            assert!(is_dns_subdomain(ok), "{ok}");
        }
        for bad in [
            "",
            "Pvc",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a.",
            "a_b",
            "a/b",
            "a b",
            "ä",
            &"a".repeat(254),
        ] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
        assert!(is_dns_label("s3nfs-system"));
        assert!(!is_dns_label("a.b"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(matches!(check_name("../../secrets"), Err(LeaseError::Refused(_))));
    }

    #[test]
    fn urls_and_trust_are_checked_when_built() {
        assert!(KubeLeases::new("http://127.0.0.1:8080", "default", None, None).is_ok());
        assert!(KubeLeases::new("ftp://127.0.0.1", "default", None, None).is_err());
        assert!(KubeLeases::new("http://127.0.0.1/api", "default", None, None).is_err());
        assert!(KubeLeases::new("http://127.0.0.1", "Default", None, None).is_err());
        assert!(KubeLeases::new("https://10.96.0.1:443", "default", None, None).is_err());
        assert!(KubeLeases::new("https://10.96.0.1:443", "default", None, Some(b"not pem".to_vec())).is_err());
        let v6 = KubeLeases::new("http://[::1]:6443", "default", None, None).unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.port, v6.authority.as_str()),
            ("::1", 6443, "[::1]:6443")
        );
    }
}
