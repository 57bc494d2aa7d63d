//! A stand-in for the Kubernetes API server's Lease resource, over real HTTP/1.1 on a local
//! port: kube-apiserver needs etcd and a cluster and cannot run in these tests.
//!
//! What it implements, as kube-apiserver behaves for `coordination.k8s.io/v1` Leases:
//! - GET `…/namespaces/{ns}/leases/{name}`: 200 with the object; 404 `NotFound` Status if absent.
//! - POST `…/namespaces/{ns}/leases`: 201 with the stored object; 409 `AlreadyExists` if the
//!   name is taken; 422 without `metadata.name`; 400 for a body that is not a Lease or names
//!   another namespace.
//! - PUT `…/namespaces/{ns}/leases/{name}`: 200 if `metadata.resourceVersion` is the stored one;
//!   409 `Conflict` if it differs; 422 `Invalid` if it is missing, because the Lease strategy
//!   does not allow unconditional updates (`AllowUnconditionalUpdate` is false in
//!   `pkg/registry/coordination/lease/strategy.go`, and the generic registry then answers
//!   "metadata.resourceVersion: must be specified for an update"); a PUT of an absent lease
//!   creates it (201), because the same strategy allows create-on-update; 400 if the body's
//!   name differs from the URL's.
//! - Every write takes the next value of one global counter as its `resourceVersion`.
//! - Optionally a bearer token ([`KubeApi::start_with_token`]): 401 without it.
//! - [`KubeApi::fail_next`]: the next requests answer with a chosen status.
//!
//! What it does not: other verbs (DELETE, PATCH, LIST, WATCH) and resources, validation of the
//! spec's fields, RBAC and admission, query parameters (ignored), chunked request bodies,
//! keep-alive (every reply closes the connection).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

const PREFIX: &str = "/apis/coordination.k8s.io/v1/namespaces/";
const RESOURCE: &str = "leases.coordination.k8s.io";
/// Bound on a request's head and body: a Lease is small, anything larger is a client bug.
const MAX_REQUEST: usize = 64 * 1024;

pub struct KubeApi {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    /// (namespace, name) → the object as the server returns it.
    leases: BTreeMap<(String, String), Value>,
    /// The last resourceVersion handed out.
    revision: u64,
    token: Option<String>,
    failures: usize,
    failure_status: u16,
    requests: usize,
}

struct Reply {
    code: u16,
    body: Value,
}

impl KubeApi {
    /// Binds `addr` (port 0 for any) and serves on the current runtime until dropped.
    pub async fn start(addr: SocketAddr) -> KubeApi {
        Self::serve(addr, None).await
    }

    /// As [`KubeApi::start`], answering 401 to requests without `Authorization: Bearer {token}`.
    pub async fn start_with_token(addr: SocketAddr, token: &str) -> KubeApi {
        Self::serve(addr, Some(token.to_string())).await
    }

    async fn serve(addr: SocketAddr, token: Option<String>) -> KubeApi {
        let listener = TcpListener::bind(addr).await.expect("bind the API stand-in");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            token,
            ..State::default()
        }));
        let server = tokio::spawn(accept(listener, state.clone()));
        KubeApi { addr, state, server }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The stored object, as a GET would return it.
    pub fn lease(&self, ns: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .leases
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Answers the next `n` requests with `status` (and a Status object) before anything else.
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut st = self.state.lock().unwrap();
        st.failures = n;
        st.failure_status = status;
    }

    /// How many requests arrived, answered or failed.
    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().requests
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        // Dropping the accept task's JoinSet aborts the connections in flight too.
        self.server.abort();
    }
}

async fn accept(listener: TcpListener, state: Arc<Mutex<State>>) {
    let mut connections = JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        connections.spawn(connection(stream, state.clone()));
        while connections.try_join_next().is_some() {}
    }
}

async fn connection(mut stream: TcpStream, state: Arc<Mutex<State>>) {
    let reply = match read_request(&mut stream).await {
        Ok(Some((method, path, headers, body))) => handle(&state, &method, &path, &headers, &body),
        Ok(None) => return,
        Err(e) => status(400, "BadRequest", &e, None),
    };
    let body = serde_json::to_vec(&reply.body).unwrap();
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reply.code,
        phrase(reply.code),
        body.len()
    );
    let _ = stream.write_all(&[head.as_bytes(), &body].concat()).await;
    let _ = stream.shutdown().await;
}

type Request = (String, String, Vec<(String, String)>, Vec<u8>);

/// Method, path without query, headers (names lowercased) and body; `None` if the client
/// closed before sending a request.
async fn read_request(stream: &mut TcpStream) -> Result<Option<Request>, String> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_REQUEST {
            return Err("request head too large".into());
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await.map_err(|e| e.to_string())? {
            0 if buf.is_empty() => return Ok(None),
            0 => return Err("connection closed inside the request head".into()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let mut body = buf.split_off(head_end + 4);
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "request head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(target), Some("HTTP/1.1")) =
        (request_line.next(), request_line.next(), request_line.next())
    else {
        return Err(format!("malformed request line {head:?}"));
    };
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    if headers.iter().any(|(k, _)| k == "transfer-encoding") {
        return Err("chunked request bodies are not implemented by this stand-in".into());
    }
    let length: usize = match headers.iter().find(|(k, _)| k == "content-length") {
        Some((_, v)) => v.parse().map_err(|_| format!("bad Content-Length {v:?}"))?,
        None => 0,
    };
    if length > MAX_REQUEST {
        return Err("request body too large".into());
    }
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await.map_err(|e| e.to_string())? {
            0 => return Err("connection closed inside the request body".into()),
            n => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(length);
    let path = target.split('?').next().unwrap_or_default().to_string();
    Ok(Some((method.to_string(), path, headers, body)))
}

fn handle(state: &Mutex<State>, method: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> Reply {
    let mut st = state.lock().unwrap();
    st.requests += 1;
    if st.failures > 0 {
        st.failures -= 1;
        let code = st.failure_status;
        return status(code, reason(code), "injected by the test", None);
    }
    if let Some(token) = &st.token {
        let expected = format!("Bearer {token}");
        if !headers.iter().any(|(k, v)| k == "authorization" && *v == expected) {
            return status(401, "Unauthorized", "Unauthorized", None);
        }
    }
    let route = path
        .strip_prefix(PREFIX)
        .map(|rest| rest.split('/').collect::<Vec<_>>());
    let (ns, name) = match route.as_deref() {
        Some([ns, "leases"]) => (ns.to_string(), None),
        Some([ns, "leases", name]) => (ns.to_string(), Some(name.to_string())),
        _ => {
            return status(
                404,
                "NotFound",
                "the server could not find the requested resource",
                None,
            )
        }
    };
    let parse = || -> Result<Value, Reply> {
        let object: Value =
            serde_json::from_slice(body).map_err(|e| status(400, "BadRequest", &e.to_string(), None))?;
        if object.get("kind").and_then(Value::as_str) != Some("Lease") {
            return Err(status(400, "BadRequest", "the body is not a Lease", None));
        }
        match object.pointer("/metadata/namespace").and_then(Value::as_str) {
            Some(other) if other != ns => Err(status(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
                None,
            )),
            _ => Ok(object),
        }
    };
    match (method, name) {
        ("GET", Some(name)) => match st.leases.get(&(ns, name.clone())) {
            Some(object) => Reply {
                code: 200,
                body: object.clone(),
            },
            None => status(
                404,
                "NotFound",
                &format!("{RESOURCE} \"{name}\" not found"),
                Some(&name),
            ),
        },
        ("POST", None) => {
            let object = match parse() {
                Ok(object) => object,
                Err(reply) => return reply,
            };
            let Some(name) = object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .map(str::to_string)
            else {
                return status(
                    422,
                    "Invalid",
                    "metadata.name: Required value: name or generateName is required",
                    None,
                );
            };
            if st.leases.contains_key(&(ns.clone(), name.clone())) {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("{RESOURCE} \"{name}\" already exists"),
                    Some(&name),
                );
            }
            store(&mut st, ns, name, object, 201)
        }
        ("PUT", Some(name)) => {
            let object = match parse() {
                Ok(object) => object,
                Err(reply) => return reply,
            };
            let body_name = object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if body_name != name {
                let message =
                    format!("the name of the object ({body_name}) does not match the name on the URL ({name})");
                return status(400, "BadRequest", &message, None);
            }
            let Some(stored) = st.leases.get(&(ns.clone(), name.clone())) else {
                // Create-on-update: the version in the body is not checked against anything.
                return store(&mut st, ns, name, object, 201);
            };
            match object.pointer("/metadata/resourceVersion").and_then(Value::as_str) {
                None | Some("") | Some("0") => status(
                    422,
                    "Invalid",
                    &format!("{RESOURCE} \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0: must be specified for an update"),
                    Some(&name),
                ),
                Some(v) if Some(v) != stored.pointer("/metadata/resourceVersion").and_then(Value::as_str) => status(
                    409,
                    "Conflict",
                    &format!("Operation cannot be fulfilled on {RESOURCE} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
                    Some(&name),
                ),
                Some(_) => store(&mut st, ns, name, object, 200),
            }
        }
        _ => status(
            405,
            "MethodNotAllowed",
            &format!("{method} is not supported by this stand-in"),
            None,
        ),
    }
}

/// Stores `object` under the next resourceVersion with the metadata the server fills in, and
/// answers with it.
fn store(st: &mut State, ns: String, name: String, mut object: Value, code: u16) -> Reply {
    st.revision += 1;
    let uid = st
        .leases
        .get(&(ns.clone(), name.clone()))
        .and_then(|old| old.pointer("/metadata/uid").cloned())
        .unwrap_or_else(|| json!(format!("00000000-0000-4000-8000-{:012}", st.revision)));
    let metadata = object["metadata"].as_object_mut().expect("metadata was read above");
    metadata.insert("namespace".into(), json!(ns));
    metadata.insert("uid".into(), uid);
    metadata.insert("resourceVersion".into(), json!(st.revision.to_string()));
    st.leases.insert((ns, name), object.clone());
    Reply { code, body: object }
}

/// A `Status` object as kube-apiserver sends with every error.
fn status(code: u16, reason: &str, message: &str, name: Option<&str>) -> Reply {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    if let Some(name) = name {
        body["details"] = json!({"name": name, "group": "coordination.k8s.io", "kind": "leases"});
    }
    Reply { code, body }
}

fn reason(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

fn phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
