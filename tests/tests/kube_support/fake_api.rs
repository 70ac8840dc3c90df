//! A fake Kubernetes API server behind kube's mock service (tower-test): it answers the list,
//! watch and create requests the agent makes with real API JSON, keeps a resourceVersion'd event
//! log per resource (so watches resume, and a compacted log answers 410 Gone as the real server
//! does), streams watch events as they happen, records every request, and can fail or cut off
//! requests on demand. [`FakeApi::serve`] also serves it over HTTP on a socket, for an agent in
//! its own process that finds the server through a kubeconfig (tests/e2e_local.rs).
use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::StreamExt as _;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::api_rules::{matches_selector, url_pairs, validate_event};

pub type RespBody = UnsyncBoxBody<Bytes, Infallible>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pods,
    Namespaces,
    MeshConfigs,
}

/// A request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    /// Path and query, percent-encoded as sent.
    pub uri: String,
    pub accept: String,
    pub kind: Option<Kind>,
    pub watch: bool,
}

struct Log {
    /// (resourceVersion, type, object) in order.
    events: Vec<(u64, &'static str, Value)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted_below: u64,
    /// Current objects by namespace/name.
    objects: BTreeMap<String, Value>,
}

struct Inner {
    rv: u64,
    logs: BTreeMap<Kind, Log>,
    watches: Vec<(Kind, String, mpsc::UnboundedSender<Bytes>)>,
    seen: Vec<Seen>,
    posted_events: Vec<Value>,
    /// Events the server refused (422), as they were sent.
    rejected_events: Vec<Value>,
    /// Event list requests answered.
    event_lists: usize,
    /// The next list or watch request of a kind is answered with this status code.
    fail_next: VecDeque<(Kind, u16)>,
    meshconfig_crd: bool,
}

/// Handle on the fake server; cheap to clone.
#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Mutex<Inner>>,
}

fn key(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj["metadata"]["namespace"].as_str().unwrap_or(""),
        obj["metadata"]["name"].as_str().unwrap_or("")
    )
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn full(code: StatusCode, v: &Value) -> Response<RespBody> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed_unsync())
        .unwrap()
}

/// The object as a metadata-only watch/list returns it.
fn partial(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]})
}

impl FakeApi {
    /// Starts the server on the current tokio runtime and returns a client wired to it.
    pub fn start() -> (kube::Client, FakeApi) {
        let api = FakeApi {
            inner: Arc::new(Mutex::new(Inner {
                rv: 100,
                logs: [Kind::Pods, Kind::Namespaces, Kind::MeshConfigs]
                    .into_iter()
                    .map(|k| {
                        (
                            k,
                            Log {
                                events: Vec::new(),
                                compacted_below: 0,
                                objects: BTreeMap::new(),
                            },
                        )
                    })
                    .collect(),
                watches: Vec::new(),
                seen: Vec::new(),
                posted_events: Vec::new(),
                rejected_events: Vec::new(),
                event_lists: 0,
                fail_next: VecDeque::new(),
                meshconfig_crd: true,
            })),
        };
        (api.reconnect(), api)
    }

    /// Another client on the same server state (for an agent restart). Must be called inside
    /// the runtime.
    pub fn reconnect(&self) -> kube::Client {
        let (svc, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<RespBody>>();
        let server = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let resp = server.respond(req).await;
                send.send_response(resp);
            }
        });
        kube::Client::new(svc, "default")
    }

    fn kind_of(path: &str) -> Option<Kind> {
        if path == "/api/v1/pods" {
            Some(Kind::Pods)
        } else if path == "/api/v1/namespaces" {
            Some(Kind::Namespaces)
        } else if path.starts_with("/apis/config.flomesh.io/v1alpha3/")
            && path.ends_with("/meshconfigs")
        {
            Some(Kind::MeshConfigs)
        } else {
            None
        }
    }

    /// A single object's URL → (kind, namespace/name key).
    fn object_of(path: &str) -> Option<(Kind, String)> {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match parts.as_slice() {
            ["api", "v1", "namespaces", ns, "pods", name] => {
                Some((Kind::Pods, format!("{ns}/{name}")))
            }
            ["api", "v1", "namespaces", name] => Some((Kind::Namespaces, format!("/{name}"))),
            [
                "apis",
                "config.flomesh.io",
                "v1alpha3",
                "namespaces",
                ns,
                "meshconfigs",
                name,
            ] => Some((Kind::MeshConfigs, format!("{ns}/{name}"))),
            _ => None,
        }
    }

    /// Serves the same state over HTTP/1.1 on `127.0.0.1`, on the current tokio runtime, and
    /// returns the address. The server runs until the runtime shuts down.
    pub async fn serve(&self) -> std::io::Result<std::net::SocketAddr> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = self.clone();
        let app = axum::Router::new().fallback(move |req: Request<axum::body::Body>| {
            let server = server.clone();
            async move { server.respond(req).await }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(addr)
    }

    async fn respond<B>(&self, req: Request<B>) -> Response<RespBody>
    where
        B: http_body::Body<Data = Bytes>,
    {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().to_string();
        let query: BTreeMap<String, String> = parts.uri.query().map(url_pairs).unwrap_or_default();
        let kind = Self::kind_of(&path);
        let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        let seen = Seen {
            method: parts.method.clone(),
            uri: parts.uri.to_string(),
            accept: parts
                .headers
                .get("accept")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
            kind,
            watch,
        };
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut inner = self.inner.lock().unwrap();
        inner.seen.push(seen);
        if parts.method == Method::POST && path.ends_with("/events") {
            let mut ev: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if let Err(why) = validate_event(&ev) {
                inner.rejected_events.push(ev);
                return full(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &status(422, "Invalid", &why),
                );
            }
            ev["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
            inner.posted_events.push(ev.clone());
            return full(StatusCode::CREATED, &ev);
        }
        if parts.method == Method::GET
            && let Some(ns) = path
                .strip_prefix("/apis/events.k8s.io/v1/namespaces/")
                .and_then(|p| p.strip_suffix("/events"))
        {
            let selector = query.get("labelSelector").cloned().unwrap_or_default();
            let items: Vec<Value> = inner
                .posted_events
                .iter()
                .filter(|e| e["metadata"]["namespace"] == ns)
                .filter(|e| {
                    selector.split(',').filter(|t| !t.is_empty()).all(|t| {
                        t.split_once('=')
                            .is_some_and(|(k, v)| e["metadata"]["labels"][k] == v)
                    })
                })
                .cloned()
                .collect();
            inner.event_lists += 1;
            return full(
                StatusCode::OK,
                &json!({"apiVersion": "events.k8s.io/v1", "kind": "EventList",
                        "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items}),
            );
        }
        let Some(kind) = kind else {
            if let Some((kind, key)) = Self::object_of(&path)
                && parts.method == Method::GET
            {
                if kind == Kind::MeshConfigs && !inner.meshconfig_crd {
                    return full(
                        StatusCode::NOT_FOUND,
                        &status(
                            404,
                            "NotFound",
                            "the server could not find the requested resource",
                        ),
                    );
                }
                return match inner.logs[&kind].objects.get(&key) {
                    Some(o) if kind == Kind::Namespaces => full(StatusCode::OK, &partial(o)),
                    Some(o) => full(StatusCode::OK, o),
                    None => full(
                        StatusCode::NOT_FOUND,
                        &status(404, "NotFound", &format!("{key} not found")),
                    ),
                };
            }
            return full(
                StatusCode::NOT_FOUND,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        };
        if let Some(i) = inner.fail_next.iter().position(|(k, _)| *k == kind) {
            let (_, code) = inner.fail_next.remove(i).unwrap();
            let code = StatusCode::from_u16(code).unwrap();
            return full(
                code,
                &status(code.as_u16(), "InternalError", "injected failure"),
            );
        }
        if kind == Kind::MeshConfigs && !inner.meshconfig_crd {
            return full(
                StatusCode::NOT_FOUND,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        }
        let selector = query.get("fieldSelector").cloned().unwrap_or_default();
        let ns_filter = path
            .strip_prefix("/apis/config.flomesh.io/v1alpha3/namespaces/")
            .and_then(|p| p.split('/').next())
            .map(str::to_string);
        let matches = move |obj: &Value| {
            matches_selector(obj, &selector)
                && ns_filter
                    .as_deref()
                    .is_none_or(|ns| obj["metadata"]["namespace"] == ns)
        };
        let metadata_only = kind == Kind::Namespaces;
        if !watch {
            let log = &inner.logs[&kind];
            let items: Vec<Value> = log
                .objects
                .values()
                .filter(|o| matches(o))
                .map(|o| if metadata_only { partial(o) } else { o.clone() })
                .collect();
            let (api_version, list_kind) = match kind {
                Kind::Pods => ("v1", "PodList"),
                Kind::Namespaces => ("meta.k8s.io/v1", "PartialObjectMetadataList"),
                Kind::MeshConfigs => ("config.flomesh.io/v1alpha3", "MeshConfigList"),
            };
            let list = json!({"apiVersion": api_version, "kind": list_kind,
                              "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items});
            return full(StatusCode::OK, &list);
        }
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        let log = &inner.logs[&kind];
        if from < log.compacted_below {
            let gone = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
            let _ = tx.send(Bytes::from(format!("{gone}\n")));
            drop(tx);
        } else {
            for (rv, ty, obj) in &log.events {
                if *rv > from && matches(obj) {
                    let obj = if metadata_only {
                        partial(obj)
                    } else {
                        obj.clone()
                    };
                    let _ = tx.send(line(ty, &obj));
                }
            }
            let sel = query.get("fieldSelector").cloned().unwrap_or_default();
            inner.watches.push((kind, sel, tx));
        }
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(StreamBody::new(stream.boxed()).boxed_unsync())
            .unwrap()
    }

    /// Adds or replaces an object (ADDED or MODIFIED to open watches) and returns its
    /// resourceVersion.
    pub fn put(&self, kind: Kind, mut obj: Value) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        inner.rv += 1;
        let rv = inner.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let k = key(&obj);
        let log = inner.logs.get_mut(&kind).unwrap();
        let ty = if log.objects.contains_key(&k) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        log.objects.insert(k, obj.clone());
        log.events.push((rv, ty, obj.clone()));
        broadcast(&mut inner, kind, ty, &obj);
        rv
    }

    /// Deletes an object (DELETED to open watches).
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut inner = self.inner.lock().unwrap();
        inner.rv += 1;
        let rv = inner.rv;
        let log = inner.logs.get_mut(&kind).unwrap();
        let Some(mut obj) = log.objects.remove(&format!("{namespace}/{name}")) else {
            return;
        };
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        log.events.push((rv, "DELETED", obj.clone()));
        broadcast(&mut inner, kind, "DELETED", &obj);
    }

    /// Changes an object without telling the watches (as if the event was lost while the
    /// agent was cut off) and compacts the log, so the next watch gets 410 Gone and must
    /// re-list to see it.
    pub fn delete_unseen(&self, kind: Kind, namespace: &str, name: &str) {
        let mut inner = self.inner.lock().unwrap();
        inner.rv += 1;
        let rv = inner.rv;
        let log = inner.logs.get_mut(&kind).unwrap();
        log.objects.remove(&format!("{namespace}/{name}"));
        log.compacted_below = rv + 1;
    }

    /// Ends every open watch of `kind` (an orderly end, like the server's watch timeout).
    pub fn end_watches(&self, kind: Kind) {
        self.inner
            .lock()
            .unwrap()
            .watches
            .retain(|(k, _, _)| *k != kind);
    }

    /// Sends a watch ERROR event (410 Gone) on the open watches of `kind`.
    pub fn expire_watches(&self, kind: Kind) {
        let mut inner = self.inner.lock().unwrap();
        let gone =
            json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
        for (k, _, tx) in &inner.watches {
            if *k == kind {
                let _ = tx.send(Bytes::from(format!("{gone}\n")));
            }
        }
        inner.watches.retain(|(k, _, _)| *k != kind);
    }

    /// Answers the next `n` list/watch requests of `kind` with `code`.
    pub fn fail_next(&self, kind: Kind, code: u16, n: usize) {
        let mut inner = self.inner.lock().unwrap();
        for _ in 0..n {
            inner.fail_next.push_back((kind, code));
        }
    }

    /// Whether the MeshConfig CRD exists (404 for its URLs otherwise).
    pub fn set_meshconfig_crd(&self, installed: bool) {
        self.inner.lock().unwrap().meshconfig_crd = installed;
    }

    /// The current object (`namespace` empty for a Namespace).
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let inner = self.inner.lock().unwrap();
        inner.logs[&kind]
            .objects
            .get(&format!("{namespace}/{name}"))
            .cloned()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.inner.lock().unwrap().seen.clone()
    }

    /// List (not watch) requests of `kind` so far.
    pub fn lists(&self, kind: Kind) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.kind == Some(kind) && !s.watch && s.method == Method::GET)
            .count()
    }

    pub fn posted_events(&self) -> Vec<Value> {
        self.inner.lock().unwrap().posted_events.clone()
    }

    /// Events the server refused with 422, as sent.
    pub fn rejected_events(&self) -> Vec<Value> {
        self.inner.lock().unwrap().rejected_events.clone()
    }

    pub fn event_lists(&self) -> usize {
        self.inner.lock().unwrap().event_lists
    }

    /// Open watch streams of `kind`.
    pub fn open_watches(&self, kind: Kind) -> usize {
        let mut inner = self.inner.lock().unwrap();
        inner.watches.retain(|(_, _, tx)| !tx.is_closed());
        inner.watches.iter().filter(|(k, _, _)| *k == kind).count()
    }
}

fn line(ty: &str, obj: &Value) -> Bytes {
    Bytes::from(format!("{}\n", json!({"type": ty, "object": obj})))
}

fn broadcast(inner: &mut Inner, kind: Kind, ty: &'static str, obj: &Value) {
    let metadata_only = kind == Kind::Namespaces;
    inner.watches.retain(|(k, sel, tx)| {
        if *k != kind || !matches_selector(obj, sel) {
            return !tx.is_closed();
        }
        let obj = if metadata_only {
            partial(obj)
        } else {
            obj.clone()
        };
        tx.send(line(ty, &obj)).is_ok()
    });
}

/// Polls `f` until it returns Some, for up to `timeout`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
