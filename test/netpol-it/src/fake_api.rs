//! A minimal Kubernetes API server on loopback for agent-level tests of the Kubernetes source:
//! it serves lists and watches of Pods, Namespaces and NetworkPolicies over plain HTTP/1.1, and
//! can be taken down (connections refused, open watches cut) and brought back.
//!
//! Watch semantics are the simplest the API allows: a watch from the current resource version
//! is held open until something changes (or a few seconds pass) and then closed; a watch from
//! an older version gets `410 Gone` ("too old resource version"), so the client relists.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

use serde_json::{json, Value};

/// The kinds the agent always watches (the network-policy-api CRDs are left out: the server
/// answers them like one without those CRDs installed).
const PATHS: [(&str, &str); 5] = [
    ("/api/v1/pods", "PodList"),
    ("/api/v1/namespaces", "NamespaceList"),
    ("/apis/networking.k8s.io/v1/networkpolicies", "NetworkPolicyList"),
    ("/api/v1/services", "ServiceList"),
    ("/apis/discovery.k8s.io/v1/endpointslices", "EndpointSliceList"),
];

#[derive(Default)]
struct State {
    /// Objects per entry of [`PATHS`].
    objects: [Vec<Value>; 5],
    resource_version: u64,
    down: bool,
    /// Requests answered (lists and watches), for tests that wait for a relist.
    lists: u64,
    /// Lists answered per entry of [`PATHS`].
    lists_per_kind: [u64; 5],
}

/// The fake server; stops on drop.
pub struct FakeApi {
    state: Arc<(Mutex<State>, Condvar)>,
    addr: SocketAddr,
    kubeconfig: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApi {
    /// Starts serving on a free loopback port; writes a kubeconfig for it under `dir`.
    pub fn start(dir: &Path) -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake API");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let kubeconfig = dir.join("fake-api.kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{addr}\"}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{cluster: fake, user: u}}\ncurrent-context: c\n"
            ),
        )
        .expect("kubeconfig");
        let state = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || accept_loop(listener, state, stop))
        };
        FakeApi { state, addr, kubeconfig, stop, thread: Some(thread) }
    }

    /// The kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Replaces the object of its kind with the same namespace and name (or adds it).
    pub fn put(&self, mut obj: Value) {
        let i = kind_index(&obj);
        self.change(|s| {
            // Every write gives the object a new resource version, as the API server does.
            obj["metadata"]["resourceVersion"] = json!((s.resource_version + 1).to_string());
            let objs = &mut s.objects[i];
            objs.retain(|o| !same(o, &obj));
            objs.push(obj);
        });
    }

    /// Deletes an object (matched by kind, namespace and name).
    pub fn delete(&self, obj: &Value) {
        let i = kind_index(obj);
        self.change(|s| s.objects[i].retain(|o| !same(o, obj)));
    }

    /// Refuses every connection and cuts open watches (`true`), or serves again (`false`).
    pub fn set_down(&self, down: bool) {
        self.change(|s| s.down = down);
    }

    /// Lists served so far.
    pub fn lists(&self) -> u64 {
        self.state.0.lock().unwrap().lists
    }

    /// Lists served so far, per kind (Pods, Namespaces, NetworkPolicies, Services,
    /// EndpointSlices): each of the client's watchers relists on its own schedule after an
    /// outage, so "relisted" means every kind it listed before.
    pub fn lists_per_kind(&self) -> [u64; 5] {
        self.state.0.lock().unwrap().lists_per_kind
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn change(&self, f: impl FnOnce(&mut State)) {
        let mut s = self.state.0.lock().unwrap();
        f(&mut s);
        s.resource_version += 1;
        self.state.1.notify_all();
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.state.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn kind_index(obj: &Value) -> usize {
    match obj["kind"].as_str() {
        Some("Pod") => 0,
        Some("Namespace") => 1,
        Some("NetworkPolicy") => 2,
        Some("Service") => 3,
        Some("EndpointSlice") => 4,
        other => panic!("fake API: unsupported kind {other:?}"),
    }
}

fn same(a: &Value, b: &Value) -> bool {
    a["metadata"]["name"] == b["metadata"]["name"]
        && a["metadata"]["namespace"] == b["metadata"]["namespace"]
}

fn accept_loop(
    listener: TcpListener,
    state: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                if state.0.lock().unwrap().down {
                    // Down: the connection is reset at once, like a refused one.
                    let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
                    drop(conn);
                    continue;
                }
                let (state, stop) = (state.clone(), stop.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &state, &stop);
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Answers one request (the client opens a new connection per request since we close it).
fn serve(
    conn: TcpStream,
    state: &(Mutex<State>, Condvar),
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let param = |k: &str| {
        query.split('&').find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
    };
    let mut out = conn;
    let Some(i) = PATHS.iter().position(|(p, _)| *p == path) else {
        // What a real API server answers for a group it does not serve (a CRD that is not
        // installed): plain text, not a Status object.
        return out.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 19\r\nConnection: close\r\n\r\n404 page not found\n",
        );
    };
    if param("watch") != Some("true") {
        let body = {
            let mut s = state.0.lock().unwrap();
            s.lists += 1;
            s.lists_per_kind[i] += 1;
            json!({"apiVersion": "v1", "kind": PATHS[i].1,
                   "metadata": {"resourceVersion": s.resource_version.to_string()},
                   "items": s.objects[i]})
            .to_string()
        };
        return write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    let from: u64 = param("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    out.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
    )?;
    let mut s = state.0.lock().unwrap();
    if from < s.resource_version {
        let gone = json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status",
            "metadata": {}, "status": "Failure", "message": "too old resource version",
            "reason": "Expired", "code": 410}});
        drop(s);
        return writeln!(out, "{gone}");
    }
    // Held until a change (or the server goes down), then closed: the client watches again.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while s.resource_version == from && !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        s = state.1.wait_timeout(s, left.min(Duration::from_millis(200))).unwrap().0;
    }
    if s.down {
        let _ = socket2::SockRef::from(&out).set_linger(Some(Duration::ZERO));
    }
    Ok(())
}
