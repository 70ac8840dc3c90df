//! A stand-in Kubernetes API server for `e2e-local`: real HTTP/1.1 on 127.0.0.1, answering the
//! requests `redirect-agent run --source kubernetes` makes, with the API server's JSON: lists
//! (pods by `spec.nodeName`, namespaces as PartialObjectMetadata, the MeshConfig by name), watches
//! that replay from a resourceVersion and then stream (chunked, one event per line), and Event
//! creation. The agent finds it through an ordinary kubeconfig, exactly as it would find a real
//! cluster. Objects are the ones `e2e-kind` applies (see `objects.rs`).
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Namespace,
    MeshConfig,
}

/// (kind, namespace, name)
type Key = (Kind, String, String);

struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change, in order: (resourceVersion, kind, watch event type, object).
    log: Vec<(u64, Kind, &'static str, Value)>,
    /// Events the agent created (events.k8s.io/v1 JSON as posted).
    events: Vec<Value>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

/// The server; stops when dropped (open watches end within a second).
pub struct FakeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl FakeApi {
    pub fn start() -> Result<FakeApi> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the stand-in API")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1000,
                objects: BTreeMap::new(),
                log: Vec::new(),
                events: Vec::new(),
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        thread::Builder::new()
            .name("fake-api".into())
            .spawn(move || {
                while !sh.stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let sh = sh.clone();
                            thread::spawn(move || serve_connection(stream, &sh));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(20))
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            })?;
        Ok(FakeApi { shared, addr })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces an object; open watches get ADDED or MODIFIED.
    pub fn put(&self, kind: Kind, mut obj: Value) {
        let mut st = self.shared.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(kind, &obj);
        let ty = if st.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects.insert(key, obj.clone());
        st.log.push((rv, kind, ty, obj));
        self.shared.changed.notify_all();
    }

    /// The current object, if any.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let st = self.shared.state.lock().unwrap();
        st.objects
            .get(&(kind, namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Events posted by the agent so far.
    pub fn events(&self) -> Vec<Value> {
        self.shared.state.lock().unwrap().events.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
    }
}

fn key_of(kind: Kind, obj: &Value) -> Key {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        kind,
        s(&obj["metadata"]["namespace"]),
        s(&obj["metadata"]["name"]),
    )
}

/// A parsed request.
struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    accept: String,
    body: Vec<u8>,
}

/// Serves requests on one connection (HTTP/1.1 keep-alive) until the client closes it, a watch
/// ends, or the server stops.
fn serve_connection(stream: TcpStream, sh: &Shared) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut out = stream;
    loop {
        let req = match read_request(&mut reader, sh) {
            Ok(Some(r)) => r,
            _ => return,
        };
        let keep_going = respond(&mut out, &req, sh).is_ok_and(|more| more);
        if !keep_going {
            return;
        }
    }
}

/// Reads one line, riding out read timeouts (which only exist so that a stop is noticed).
fn read_line(reader: &mut BufReader<TcpStream>, sh: &Shared) -> Result<Option<String>> {
    let mut line = String::new();
    loop {
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(None),
            Ok(_) if line.ends_with('\n') => return Ok(Some(line)),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if sh.stop.load(Ordering::Relaxed) {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn read_request(reader: &mut BufReader<TcpStream>, sh: &Shared) -> Result<Option<Request>> {
    let Some(first) = read_line(reader, sh)? else {
        return Ok(None);
    };
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut headers = BTreeMap::new();
    loop {
        let Some(line) = read_line(reader, sh)? else {
            return Ok(None);
        };
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if let Some(n) = headers
        .get("content-length")
        .and_then(|n| n.parse::<usize>().ok())
    {
        body.resize(n, 0);
        reader.read_exact(&mut body)?;
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        loop {
            let size_line = read_line(reader, sh)?.unwrap_or_default();
            let size = usize::from_str_radix(size_line.trim(), 16).unwrap_or(0);
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    Ok(Some(Request {
        method,
        path: path.to_string(),
        query: query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (decode(k), decode(v)))
            .collect(),
        accept: headers.get("accept").cloned().unwrap_or_default(),
        body,
    }))
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn write_json(out: &mut TcpStream, code: u16, reason: &str, v: &Value) -> Result<bool> {
    let body = v.to_string();
    write!(
        out,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()?;
    Ok(true)
}

fn not_found(out: &mut TcpStream, what: &str) -> Result<bool> {
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("{what} not found"), "reason": "NotFound", "code": 404});
    write_json(out, 404, "Not Found", &status)
}

/// Which collection a path names, and the namespace it is limited to.
fn route(path: &str) -> Option<(Kind, Option<String>)> {
    match path {
        "/api/v1/pods" => return Some((Kind::Pod, None)),
        "/api/v1/namespaces" => return Some((Kind::Namespace, None)),
        _ => {}
    }
    let rest = path.strip_prefix("/apis/config.flomesh.io/v1alpha3/")?;
    if rest == "meshconfigs" {
        return Some((Kind::MeshConfig, None));
    }
    let ns = rest
        .strip_prefix("namespaces/")?
        .strip_suffix("/meshconfigs")?;
    Some((Kind::MeshConfig, Some(ns.to_string())))
}

/// Answers one request; Ok(false) closes the connection.
fn respond(out: &mut TcpStream, req: &Request, sh: &Shared) -> Result<bool> {
    if req.method == "POST" && req.path.starts_with("/apis/events.k8s.io/v1/namespaces/") {
        let mut ev: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let mut st = sh.state.lock().unwrap();
        st.rv += 1;
        ev["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.events.push(ev.clone());
        drop(st);
        return write_json(out, 201, "Created", &ev);
    }
    let Some((kind, ns)) = route(&req.path).filter(|_| req.method == "GET") else {
        return not_found(out, &format!("{} {}", req.method, req.path));
    };
    let selector = req.query.get("fieldSelector").cloned().unwrap_or_default();
    let partial = req.accept.contains("as=PartialObjectMetadata");
    let matches = |k: Kind, obj: &Value| {
        k == kind
            && ns
                .as_deref()
                .is_none_or(|n| obj["metadata"]["namespace"] == n)
            && matches_selector(obj, &selector)
    };
    let shape = |obj: &Value| {
        if partial {
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                   "metadata": obj["metadata"]})
        } else {
            obj.clone()
        }
    };
    let watch = req
        .query
        .get("watch")
        .is_some_and(|w| w == "true" || w == "1");
    if !watch {
        let st = sh.state.lock().unwrap();
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((k, _, _), o)| matches(*k, o))
            .map(|(_, o)| shape(o))
            .collect();
        let (api_version, list_kind) = match (kind, partial) {
            (_, true) => ("meta.k8s.io/v1", "PartialObjectMetadataList"),
            (Kind::Pod, _) => ("v1", "PodList"),
            (Kind::Namespace, _) => ("v1", "NamespaceList"),
            (Kind::MeshConfig, _) => ("config.flomesh.io/v1alpha3", "MeshConfigList"),
        };
        let list = json!({"apiVersion": api_version, "kind": list_kind,
                          "metadata": {"resourceVersion": st.rv.to_string()}, "items": items});
        drop(st);
        return write_json(out, 200, "OK", &list);
    }
    // A watch: replay what happened after the given resourceVersion, then stream.
    let mut from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(300u64);
    let deadline = Instant::now() + Duration::from_secs(timeout);
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    out.flush()?;
    while !sh.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let mut st = sh.state.lock().unwrap();
        let mut lines = Vec::new();
        for (rv, k, ty, obj) in &st.log {
            if *rv > from && matches(*k, obj) {
                lines.push(format!("{}\n", json!({"type": ty, "object": shape(obj)})));
            }
        }
        if lines.is_empty() {
            st = sh
                .changed
                .wait_timeout(st, Duration::from_secs(1))
                .unwrap()
                .0;
            drop(st);
            continue;
        }
        from = st.rv;
        drop(st);
        for l in lines {
            write!(out, "{:x}\r\n{l}\r\n", l.len())?;
        }
        out.flush()?;
    }
    let _ = write!(out, "0\r\n\r\n");
    let _ = out.flush();
    Ok(false)
}

/// Field selectors of the form `a.b=value[,c.d=value]`.
fn matches_selector(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let Some((path, want)) = term.split_once('=') else {
            return true;
        };
        let path = path.trim_end_matches('=');
        let want = want.trim_start_matches('=');
        let mut v = obj;
        for part in path.split('.') {
            v = &v[part];
        }
        v.as_str() == Some(want)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_selectors() {
        assert_eq!(route("/api/v1/pods"), Some((Kind::Pod, None)));
        assert_eq!(
            route("/apis/config.flomesh.io/v1alpha3/namespaces/fsm-system/meshconfigs"),
            Some((Kind::MeshConfig, Some("fsm-system".into())))
        );
        assert_eq!(route("/api/v1/nodes"), None);
        let pod = json!({"metadata": {"name": "curl"}, "spec": {"nodeName": "n1"}});
        assert!(matches_selector(&pod, "spec.nodeName=n1"));
        assert!(!matches_selector(&pod, "spec.nodeName=n2"));
        assert!(matches_selector(&pod, "metadata.name==curl"));
        assert_eq!(decode("spec.nodeName%3Dn1"), "spec.nodeName=n1");
    }
}
