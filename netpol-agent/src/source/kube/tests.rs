//! The source against a mock API server (tower-test), in paused tokio time: backoff and
//! debounce run instantly, and every wait is bounded, so a hang fails instead of blocking.
//!
//! The fake answers lists with its current objects and parks watch requests until the test
//! sends events; a watch response ends after its events, as if the server closed the stream,
//! and the watcher re-watches from the last resource version.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tower_test::mock::{self, SendResponse};

use super::*;
use crate::model::build::{namespace, pod};
use crate::model::{ClusterState, Namespace, NetworkPolicy, ObjectRef, Pod, Protocol};

/// Generous in virtual time: the watcher's backoff grows to 30 s (plus jitter).
const WAIT: Duration = Duration::from_secs(300);
/// How long "nothing happens" is observed.
const QUIET: Duration = Duration::from_secs(5);

/// The CRD kinds answer a plain 404 until a test gives them objects ([`Cmd::SetList`]).
const KINDS: [(Kind, &str, &str); 8] = [
    (Kind::Pod, "/api/v1/pods", "PodList"),
    (Kind::Namespace, "/api/v1/namespaces", "NamespaceList"),
    (Kind::NetworkPolicy, "/apis/networking.k8s.io/v1/networkpolicies", "NetworkPolicyList"),
    (Kind::Service, "/api/v1/services", "ServiceList"),
    (Kind::EndpointSlice, "/apis/discovery.k8s.io/v1/endpointslices", "EndpointSliceList"),
    (
        Kind::ClusterNetworkPolicy,
        "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies",
        "ClusterNetworkPolicyList",
    ),
    (
        Kind::AdminNetworkPolicy,
        "/apis/policy.networking.k8s.io/v1alpha1/adminnetworkpolicies",
        "AdminNetworkPolicyList",
    ),
    (
        Kind::BaselineAdminNetworkPolicy,
        "/apis/policy.networking.k8s.io/v1alpha1/baselineadminnetworkpolicies",
        "BaselineAdminNetworkPolicyList",
    ),
];

enum Cmd {
    /// Replace the objects returned by lists of a kind.
    SetList(Kind, Vec<Value>),
    /// Answer the (next) watch of a kind with these events.
    Watch(Kind, Vec<Value>),
    /// Hold list requests of a kind until released.
    HoldLists(Kind, bool),
    /// Fail every request with a connection error (`true`) or serve again (`false`).
    Down(bool),
    /// Answer requests of a kind with this HTTP error status (`None`: serve again).
    Status(Kind, Option<u16>),
}

#[derive(Default)]
struct KindState {
    objects: Vec<Value>,
    watch: Option<SendResponse<Response<Body>>>,
    queued: VecDeque<Vec<Value>>,
    hold_lists: bool,
    held_lists: Vec<SendResponse<Response<Body>>>,
    status: Option<u16>,
    /// The kind's CRD is installed (always for built-in kinds).
    installed: bool,
}

struct Fake {
    kinds: BTreeMap<usize, KindState>,
    down: bool,
    resource_version: u64,
    failed: mpsc::UnboundedSender<()>,
}

fn ok(body: Vec<u8>) -> Response<Body> {
    Response::new(Body::from(body))
}

fn watch_body(events: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        out.extend(serde_json::to_vec(e).expect("json"));
        out.push(b'\n');
    }
    out
}

impl Fake {
    fn list_response(&mut self, i: usize) -> Response<Body> {
        let list_kind = KINDS[i].2;
        let items = self.kinds.entry(i).or_default().objects.clone();
        self.resource_version += 1;
        let list = json!({
            "apiVersion": "v1",
            "kind": list_kind,
            "metadata": { "resourceVersion": self.resource_version.to_string() },
            "items": items,
        });
        ok(serde_json::to_vec(&list).expect("json"))
    }

    fn fail(&self, send: SendResponse<Response<Body>>) {
        let _ = self.failed.send(());
        send.send_error(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"));
    }

    fn request(&mut self, req: Request<Body>, send: SendResponse<Response<Body>>) {
        if self.down {
            return self.fail(send);
        }
        let path = req.uri().path().to_string();
        let known = KINDS.iter().position(|(_, p, _)| *p == path);
        let installed =
            |i: usize| !KINDS[i].0.optional() || self.kinds.get(&i).is_some_and(|k| k.installed);
        let Some(i) = known.filter(|i| installed(*i)) else {
            // What kube-apiserver answers for a group/version nobody registered, such as the
            // network-policy-api kinds without their CRDs: a plain-text 404.
            send.send_response(
                Response::builder()
                    .status(404)
                    .body(Body::from(b"404 page not found\n".to_vec()))
                    .expect("resp"),
            );
            return;
        };
        let watch = req.uri().query().unwrap_or_default().split('&').any(|q| q == "watch=true");
        let k = self.kinds.entry(i).or_default();
        if let Some(code) = k.status {
            let _ = self.failed.send(());
            let status = json!({
                "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                "message": format!("{path} is not allowed"), "reason": "Forbidden", "code": code,
            });
            let body = Body::from(serde_json::to_vec(&status).expect("json"));
            send.send_response(Response::builder().status(code).body(body).expect("resp"));
        } else if watch {
            match k.queued.pop_front() {
                Some(events) => send.send_response(ok(watch_body(&events))),
                // Replaces an abandoned watch, if any.
                None => k.watch = Some(send),
            }
        } else if k.hold_lists {
            k.held_lists.push(send);
        } else {
            let resp = self.list_response(i);
            send.send_response(resp);
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::SetList(kind, objects) => {
                let k = self.kinds.entry(kind as usize).or_default();
                k.objects = objects;
                k.installed = true;
            }
            Cmd::Watch(kind, events) => {
                let k = self.kinds.entry(kind as usize).or_default();
                match k.watch.take() {
                    Some(send) => send.send_response(ok(watch_body(&events))),
                    None => k.queued.push_back(events),
                }
            }
            Cmd::HoldLists(kind, hold) => {
                let i = kind as usize;
                let k = self.kinds.entry(i).or_default();
                k.hold_lists = hold;
                if !hold {
                    for send in std::mem::take(&mut k.held_lists) {
                        let resp = self.list_response(i);
                        send.send_response(resp);
                    }
                }
            }
            Cmd::Status(kind, code) => self.kinds.entry(kind as usize).or_default().status = code,
            Cmd::Down(down) => {
                self.down = down;
                if down {
                    let parked: Vec<_> =
                        self.kinds.values_mut().filter_map(|k| k.watch.take()).collect();
                    for send in parked {
                        self.fail(send);
                    }
                }
            }
        }
    }
}

/// Starts the fake API server; returns a client of it, its command channel and a channel that
/// receives one `()` per request it failed.
fn fake_server(
    pods: Vec<Value>,
    namespaces: Vec<Value>,
    policies: Vec<Value>,
    hold: Option<Kind>,
) -> (kube::Client, mpsc::UnboundedSender<Cmd>, mpsc::UnboundedReceiver<()>) {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (cmd, mut cmd_rx) = mpsc::unbounded_channel();
    let (failed_tx, failed) = mpsc::unbounded_channel();
    let mut fake =
        Fake { kinds: BTreeMap::new(), down: false, resource_version: 100, failed: failed_tx };
    fake.command(Cmd::SetList(Kind::Pod, pods));
    fake.command(Cmd::SetList(Kind::Namespace, namespaces));
    fake.command(Cmd::SetList(Kind::NetworkPolicy, policies));
    if let Some(kind) = hold {
        fake.command(Cmd::HoldLists(kind, true));
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                req = handle.next_request() => match req {
                    Some((req, send)) => fake.request(req, send),
                    None => break,
                },
                cmd = cmd_rx.recv() => match cmd {
                    Some(cmd) => fake.command(cmd),
                    None => break,
                },
            }
        }
    });
    (client, cmd, failed)
}

/// A running source against the fake.
struct Harness {
    cmd: mpsc::UnboundedSender<Cmd>,
    rx: mpsc::Receiver<SourceEvent>,
    failed: mpsc::UnboundedReceiver<()>,
    source: JoinHandle<Result<(), KubeSourceError>>,
}

impl Harness {
    fn start(pods: Vec<Value>, namespaces: Vec<Value>, policies: Vec<Value>) -> Harness {
        Self::start_with(pods, namespaces, policies, None)
    }

    fn start_with(
        pods: Vec<Value>,
        namespaces: Vec<Value>,
        policies: Vec<Value>,
        hold: Option<Kind>,
    ) -> Harness {
        let (client, cmd, failed) = fake_server(pods, namespaces, policies, hold);
        let (tx, rx) = mpsc::channel(16);
        let opts = KubeSourceOptions { kubeconfig: None, debounce: Duration::from_millis(100) };
        let source = tokio::spawn(run(client, opts, tx));
        Harness { cmd, rx, failed, source }
    }

    fn send(&self, cmd: Cmd) {
        self.cmd.send(cmd).expect("fake server gone");
    }

    async fn next(&mut self) -> SourceEvent {
        match tokio::time::timeout(WAIT, self.rx.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => panic!("source stopped: {:?}", self.source.is_finished()),
            Err(_) => panic!("no event within {WAIT:?}"),
        }
    }

    async fn snapshot(&mut self) -> (ClusterState, Vec<String>) {
        match self.next().await {
            SourceEvent::Snapshot { state, errors, .. } => (state, errors),
            other => panic!("expected a snapshot, got {other:?}"),
        }
    }

    async fn quiet(&mut self) {
        if let Ok(e) = tokio::time::timeout(QUIET, self.rx.recv()).await {
            panic!("expected no event, got {e:?}");
        }
    }

    fn failures(&mut self) -> usize {
        let mut n = 0;
        while self.failed.try_recv().is_ok() {
            n += 1;
        }
        n
    }
}

fn meta(name: &str, ns: Option<&str>, rv: u32) -> Value {
    let mut m = json!({ "name": name, "resourceVersion": rv.to_string() });
    if let Some(ns) = ns {
        m["namespace"] = json!(ns);
    }
    m
}

/// A running pod with one named port, plus fields the source must drop.
fn pod_json(name: &str, ns: &str, ip: &str, app: &str, rv: u32) -> Value {
    let mut metadata = meta(name, Some(ns), rv);
    metadata["labels"] = json!({ "app": app });
    metadata["annotations"] = json!({ "kubectl.kubernetes.io/last-applied-configuration": "{}" });
    metadata["managedFields"] = json!([{ "manager": "kubectl", "operation": "Apply" }]);
    json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
        "spec": {
            "nodeName": "node-a",
            "containers": [{
                "name": "c", "image": "nginx",
                "ports": [{ "name": "http", "containerPort": 80, "protocol": "TCP", "hostPort": 8080 }],
            }],
        },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] },
    })
}

fn pod_model(name: &str, ns: &str, ip: &str, app: &str) -> Pod {
    pod(name, ns).label("app", app).ip(ip).port(Some("http"), 80, Protocol::Tcp).build()
}

fn ns_json(name: &str, rv: u32) -> Value {
    let mut metadata = meta(name, None, rv);
    metadata["labels"] = json!({ "team": name });
    json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": metadata })
}

fn policy_json(name: &str, ns: &str, cidr: &str, rv: u32) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": meta(name, Some(ns), rv),
        "spec": {
            "podSelector": { "matchLabels": { "app": "web" } },
            "ingress": [{ "from": [{ "ipBlock": { "cidr": cidr } }] }],
        },
    })
}

fn policy_model(name: &str, ns: &str, cidr: &str) -> NetworkPolicy {
    let (state, errors) =
        crate::manifest::load_str("p.json", &policy_json(name, ns, cidr, 1).to_string());
    assert!(errors.is_empty(), "{errors:?}");
    state.policies.into_values().next().expect("policy")
}

fn event(kind: &str, object: Value) -> Value {
    json!({ "type": kind, "object": object })
}

fn gone() -> Value {
    event(
        "ERROR",
        json!({
            "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410,
        }),
    )
}

fn state(pods: Vec<Pod>, namespaces: Vec<Namespace>, policies: Vec<NetworkPolicy>) -> ClusterState {
    ClusterState {
        namespaces: namespaces.into_iter().map(|n| (n.name.clone(), n)).collect(),
        pods: pods.into_iter().map(|p| (p.key(), p)).collect(),
        policies: policies.into_iter().map(|p| (p.key(), p)).collect(),
        ..ClusterState::default()
    }
}

/// The cluster most tests start from.
fn initial() -> Harness {
    Harness::start(
        vec![
            pod_json("a", "prod", "10.0.0.1", "web", 1),
            pod_json("b", "prod", "10.0.0.2", "db", 2),
        ],
        vec![ns_json("prod", 3)],
        vec![policy_json("allow", "prod", "10.1.0.0/16", 4)],
    )
}

fn initial_state() -> ClusterState {
    state(
        vec![pod_model("a", "prod", "10.0.0.1", "web"), pod_model("b", "prod", "10.0.0.2", "db")],
        vec![namespace("prod", &[("team", "prod")])],
        vec![policy_model("allow", "prod", "10.1.0.0/16")],
    )
}

#[tokio::test(start_paused = true)]
async fn initial_lists_give_exactly_one_snapshot() {
    let mut h = initial();
    let (state, errors) = h.snapshot().await;
    assert_eq!(errors, Vec::<String>::new());
    assert_eq!(state, initial_state());
    h.quiet().await;
}

#[tokio::test(start_paused = true)]
async fn nothing_is_sent_before_all_lists_synced() {
    let mut h = Harness::start_with(
        vec![pod_json("a", "prod", "10.0.0.1", "web", 1)],
        vec![ns_json("prod", 3)],
        vec![policy_json("allow", "prod", "10.1.0.0/16", 4)],
        Some(Kind::NetworkPolicy),
    );
    h.quiet().await;
    h.send(Cmd::HoldLists(Kind::NetworkPolicy, false));
    let (state, _) = h.snapshot().await;
    assert_eq!(state.policies.len(), 1);
    assert_eq!(state.pods.len(), 1);
    h.quiet().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_initial_list_is_degraded_and_nothing_is_sent_until_it_syncs() {
    let (client, cmd, mut failed) = fake_server(
        vec![pod_json("a", "prod", "10.0.0.1", "web", 1)],
        vec![ns_json("prod", 3)],
        vec![policy_json("allow", "prod", "10.1.0.0/16", 4)],
        None,
    );
    // RBAC forbids NetworkPolicies at first.
    cmd.send(Cmd::Status(Kind::NetworkPolicy, Some(403))).expect("fake");
    let (tx, rx) = mpsc::channel(16);
    let opts = KubeSourceOptions { kubeconfig: None, debounce: Duration::from_millis(100) };
    let source = tokio::spawn(run(client, opts, tx));
    let mut h = Harness { cmd, rx, failed: mpsc::unbounded_channel().1, source };
    match h.next().await {
        SourceEvent::Degraded { reason } => {
            assert!(reason.starts_with("NetworkPolicy watch: "), "{reason}");
            assert!(reason.contains("is not allowed"), "{reason}");
        }
        other => panic!("expected Degraded, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(h.rx.is_empty(), "no snapshot without policies, no second Degraded");
    let mut retries = 0;
    while failed.try_recv().is_ok() {
        retries += 1;
    }
    assert!(retries >= 3, "the list should have been retried: {retries}");
    h.send(Cmd::Status(Kind::NetworkPolicy, None));
    let (state, errors) = h.snapshot().await;
    assert!(errors.is_empty());
    assert_eq!(state, state_of_one_pod());
    h.quiet().await;
}

fn state_of_one_pod() -> ClusterState {
    state(
        vec![pod_model("a", "prod", "10.0.0.1", "web")],
        vec![namespace("prod", &[("team", "prod")])],
        vec![policy_model("allow", "prod", "10.1.0.0/16")],
    )
}

#[tokio::test(start_paused = true)]
async fn watch_events_update_the_snapshot() {
    let mut h = initial();
    let mut want = initial_state();
    assert_eq!(h.snapshot().await.0, want);

    h.send(Cmd::Watch(
        Kind::Pod,
        vec![event("ADDED", pod_json("c", "prod", "10.0.0.3", "web", 10))],
    ));
    want.pods.insert(ObjectRef::new("prod", "c"), pod_model("c", "prod", "10.0.0.3", "web"));
    assert_eq!(h.snapshot().await.0, want);

    h.send(Cmd::Watch(
        Kind::Pod,
        vec![event("MODIFIED", pod_json("c", "prod", "10.0.0.3", "api", 11))],
    ));
    want.pods.insert(ObjectRef::new("prod", "c"), pod_model("c", "prod", "10.0.0.3", "api"));
    assert_eq!(h.snapshot().await.0, want);

    h.send(Cmd::Watch(
        Kind::Pod,
        vec![event("DELETED", pod_json("a", "prod", "10.0.0.1", "web", 12))],
    ));
    want.pods.remove(&ObjectRef::new("prod", "a"));
    assert_eq!(h.snapshot().await.0, want);

    h.send(Cmd::Watch(
        Kind::NetworkPolicy,
        vec![event("DELETED", policy_json("allow", "prod", "10.1.0.0/16", 13))],
    ));
    want.policies.clear();
    assert_eq!(h.snapshot().await.0, want);
    h.quiet().await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_events_gives_one_snapshot() {
    let mut h = initial();
    h.snapshot().await;
    h.send(Cmd::Watch(
        Kind::Pod,
        vec![
            event("ADDED", pod_json("c", "prod", "10.0.0.3", "web", 10)),
            event("ADDED", pod_json("d", "prod", "10.0.0.4", "web", 11)),
            event("DELETED", pod_json("b", "prod", "10.0.0.2", "db", 12)),
        ],
    ));
    h.send(Cmd::Watch(Kind::Namespace, vec![event("ADDED", ns_json("dev", 13))]));
    let (state, _) = h.snapshot().await;
    let pods: Vec<_> = state.pods.keys().map(|k| k.to_string()).collect();
    assert_eq!(pods, ["prod/a", "prod/c", "prod/d"]);
    assert_eq!(state.namespaces.len(), 2);
    h.quiet().await;
}

#[tokio::test(start_paused = true)]
async fn bookmarks_and_trimmed_changes_send_nothing() {
    let mut h = initial();
    h.snapshot().await;
    let bookmark = json!({
        "type": "BOOKMARK",
        "object": { "apiVersion": "v1", "kind": "Pod", "metadata": { "resourceVersion": "50" } },
    });
    h.send(Cmd::Watch(Kind::Pod, vec![bookmark]));
    h.quiet().await;
    // Only a dropped annotation and the image change: the snapshot would be the same.
    let mut p = pod_json("a", "prod", "10.0.0.1", "web", 51);
    p["metadata"]["annotations"] = json!({ "other": "x" });
    p["spec"]["containers"][0]["image"] = json!("nginx:2");
    h.send(Cmd::Watch(Kind::Pod, vec![event("MODIFIED", p)]));
    h.quiet().await;
    // The watch goes on after both.
    h.send(Cmd::Watch(
        Kind::Pod,
        vec![event("DELETED", pod_json("a", "prod", "10.0.0.1", "web", 52))],
    ));
    assert_eq!(h.snapshot().await.0.pods.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn relist_after_gone_replaces_the_state() {
    let mut h = initial();
    h.snapshot().await;
    // While the watch was away, b was deleted and c created.
    h.send(Cmd::SetList(
        Kind::Pod,
        vec![
            pod_json("a", "prod", "10.0.0.1", "web", 1),
            pod_json("c", "prod", "10.0.0.3", "web", 20),
        ],
    ));
    h.send(Cmd::Watch(Kind::Pod, vec![gone()]));
    let (state, errors) = h.snapshot().await;
    assert!(errors.is_empty());
    let pods: Vec<_> = state.pods.keys().map(|k| k.to_string()).collect();
    assert_eq!(pods, ["prod/a", "prod/c"]);
    assert_eq!(state.policies.len(), 1, "other kinds are untouched");
    h.quiet().await;
}

#[tokio::test(start_paused = true)]
async fn outage_reports_one_degraded_and_recovers_with_a_relist() {
    let mut h = initial();
    let before = h.snapshot().await.0;
    h.failures();

    h.send(Cmd::Down(true));
    match h.next().await {
        SourceEvent::Degraded { reason } => {
            eprintln!("reason: {reason}");
            assert!(reason.contains(" watch: ") && reason.contains("refused"), "{reason}");
        }
        other => panic!("expected Degraded, got {other:?}"),
    }
    // Several retries of all three watchers, and nothing more is reported.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(h.rx.try_recv().is_err(), "only one event per outage");
    assert!(h.failures() >= 6, "the watchers should have retried");

    // Back, but the resource versions expired: all three relist; b is gone meanwhile.
    h.send(Cmd::SetList(Kind::Pod, vec![pod_json("a", "prod", "10.0.0.1", "web", 1)]));
    for (kind, _, _) in KINDS {
        h.send(Cmd::Watch(kind, vec![gone()]));
    }
    h.send(Cmd::Down(false));
    // The watchers recover one by one (jittered backoff); a watcher that relisted changes its
    // store at once, so the snapshots may come in steps, but each one holds the kept state of
    // the others, and the last one (at full recovery) is complete.
    let mut want = before.clone();
    want.pods.remove(&ObjectRef::new("prod", "b"));
    let mut steps = 0;
    loop {
        let (state, errors) = h.snapshot().await;
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(state, want, "pods relist first (b is gone), the rest is kept");
        steps += 1;
        tokio::time::sleep(QUIET).await;
        if h.rx.is_empty() {
            break;
        }
    }
    assert!(steps <= 2, "a changed relist, then at most the recovery snapshot: {steps}");
}

#[tokio::test(start_paused = true)]
async fn recovery_sends_a_snapshot_even_if_unchanged() {
    let mut h = initial();
    let before = h.snapshot().await.0;
    h.send(Cmd::Down(true));
    assert!(matches!(h.next().await, SourceEvent::Degraded { .. }));
    for (kind, _, _) in KINDS {
        h.send(Cmd::Watch(kind, vec![gone()]));
    }
    h.send(Cmd::Down(false));
    assert_eq!(h.snapshot().await.0, before, "the stores kept their state");
    h.quiet().await;
}

#[tokio::test(start_paused = true)]
async fn invalid_policy_is_reported_and_the_rest_is_kept() {
    let mut h = Harness::start(
        vec![pod_json("a", "prod", "10.0.0.1", "web", 1)],
        vec![ns_json("prod", 3)],
        vec![
            policy_json("allow", "prod", "10.1.0.0/16", 4),
            policy_json("bad", "prod", "10.1.0.0/33", 5),
        ],
    );
    let (state, errors) = h.snapshot().await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("NetworkPolicy prod/bad: spec.ingress[0].from[0].ipBlock.cidr"),
        "{errors:?}"
    );
    assert_eq!(state.policies.keys().map(|k| k.to_string()).collect::<Vec<_>>(), ["prod/allow"]);
    assert_eq!(state.pods.len(), 1);

    // Fixing it clears the error.
    h.send(Cmd::Watch(
        Kind::NetworkPolicy,
        vec![event("MODIFIED", policy_json("bad", "prod", "10.2.0.0/16", 6))],
    ));
    let (state, errors) = h.snapshot().await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(state.policies.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn terminated_pods_are_not_endpoints() {
    let mut done = pod_json("job", "prod", "10.0.0.9", "batch", 2);
    done["status"]["phase"] = json!("Succeeded");
    let mut h =
        Harness::start(vec![pod_json("a", "prod", "10.0.0.1", "web", 1), done], vec![], vec![]);
    let (state, errors) = h.snapshot().await;
    assert!(errors.is_empty());
    assert_eq!(state.pods.keys().map(|k| k.to_string()).collect::<Vec<_>>(), ["prod/a"]);
}

#[tokio::test(start_paused = true)]
async fn stops_when_the_receiver_is_dropped() {
    let mut h = initial();
    h.snapshot().await;
    drop(h.rx);
    let result = tokio::time::timeout(WAIT, h.source).await.expect("run did not stop");
    assert!(matches!(result, Ok(Ok(()))), "{result:?}");
}

#[tokio::test]
async fn client_reports_an_unreadable_kubeconfig() {
    let opts = KubeSourceOptions {
        kubeconfig: Some("/nonexistent/netpol/kubeconfig".into()),
        debounce: Duration::from_millis(100),
    };
    let Err(err) = client(&opts).await else { panic!("a missing kubeconfig must fail") };
    assert!(matches!(err, KubeSourceError::Kubeconfig { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/netpol/kubeconfig"));
}

/// A client is built from a kubeconfig (the crypto provider rustls needs is compiled in:
/// without one, building any client panicked, so `netpol-agent run` could not watch a cluster).
#[tokio::test]
async fn client_builds_from_a_kubeconfig() {
    let path = std::env::temp_dir().join(format!("netpol-kubeconfig-{}", std::process::id()));
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: \"https://127.0.0.1:6443\"}\n\
         users:\n- name: u\n  user: {token: t}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\n\
         current-context: x\n",
    )
    .unwrap();
    let opts =
        KubeSourceOptions { kubeconfig: Some(path.clone()), debounce: Duration::from_millis(100) };
    let built = client(&opts).await;
    std::fs::remove_file(&path).unwrap();
    built.expect("a client from a valid kubeconfig");
}

#[tokio::test(start_paused = true)]
async fn stores_hold_trimmed_objects() {
    let mut ns = ns_json("prod", 3);
    ns["metadata"]["managedFields"] = json!([{ "manager": "m" }]);
    ns["metadata"]["annotations"] = json!({ "netpol.io/audit": "on", "other": "x" });
    let mut pol = policy_json("allow", "prod", "10.1.0.0/16", 4);
    pol["metadata"]["annotations"] =
        json!({ "kubectl.kubernetes.io/last-applied-configuration": "{}" });
    let (client, _cmd, _failed) =
        fake_server(vec![pod_json("a", "prod", "10.0.0.1", "web", 1)], vec![ns], vec![pol], None);
    let (stores, mut updates) = watch_all(client);
    // The built-in kinds list; the CRD kinds answer 404 here.
    let builtin = KINDS.iter().filter(|(k, ..)| !k.optional()).count();
    let mut listed = 0;
    while listed < builtin {
        match tokio::time::timeout(WAIT, updates.next()).await.expect("update") {
            Some((_, Some(Ok(Step::Listed)))) => listed += 1,
            Some((kind, Some(Err(e)))) if kind.optional() && is_not_found(&e) => {}
            Some((kind, Some(Err(e)))) => panic!("{kind}: {e}"),
            Some(_) => {}
            None => panic!("watchers ended"),
        }
    }
    let pod = serde_json::to_value(&*stores.pods.state()[0]).expect("json");
    assert_eq!(pod["metadata"].get("managedFields"), None);
    assert_eq!(pod["metadata"].get("annotations"), None);
    assert_eq!(pod["spec"]["containers"][0].get("image"), None);
    assert_eq!(pod["spec"]["containers"][0]["ports"][0].get("hostPort"), None);
    assert_eq!(pod["status"]["podIP"], "10.0.0.1");
    let ns = serde_json::to_value(&*stores.namespaces.state()[0]).expect("json");
    assert_eq!(ns["metadata"].get("managedFields"), None);
    assert_eq!(ns["metadata"]["annotations"], json!({ "netpol.io/audit": "on" }));
    let pol = serde_json::to_value(&*stores.policies.state()[0]).expect("json");
    assert_eq!(pol["metadata"].get("annotations"), None);
    assert_eq!(pol["spec"]["ingress"][0]["from"][0]["ipBlock"]["cidr"], "10.1.0.0/16");
}

fn service_json(rv: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": meta("web", Some("prod"), rv),
        "spec": { "clusterIP": "10.96.0.1", "selector": { "app": "web" },
                  "ports": [{ "name": "http", "port": 80, "targetPort": "http" }] },
    })
}

fn slice_json(addresses: &[&str], rv: u32) -> Value {
    let mut metadata = meta("web-abc", Some("prod"), rv);
    metadata["labels"] = json!({ "kubernetes.io/service-name": "web" });
    metadata["managedFields"] = json!([{ "manager": "endpointslice-controller" }]);
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| json!({ "addresses": [a], "conditions": { "ready": true }, "nodeName": "node-a" }))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": metadata,
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 80, "protocol": "TCP" }],
        "endpoints": endpoints,
    })
}

/// Services and EndpointSlices reach the snapshot, and a backend leaving the slice gives a new
/// snapshot: the compiler recomputes Service verdicts from it.
#[tokio::test(start_paused = true)]
async fn services_and_endpoint_slices_are_watched() {
    let (client, cmd, failed) = fake_server(
        vec![pod_json("a", "prod", "10.0.0.1", "web", 1)],
        vec![ns_json("prod", 3)],
        vec![],
        None,
    );
    cmd.send(Cmd::SetList(Kind::Service, vec![service_json(5)])).expect("fake");
    cmd.send(Cmd::SetList(Kind::EndpointSlice, vec![slice_json(&["10.0.0.1", "10.0.0.2"], 6)]))
        .expect("fake");
    let (tx, rx) = mpsc::channel(16);
    let opts = KubeSourceOptions { kubeconfig: None, debounce: Duration::from_millis(100) };
    let source = tokio::spawn(run(client, opts, tx));
    let mut h = Harness { cmd, rx, failed, source };
    let (state, errors) = h.snapshot().await;
    assert!(errors.is_empty(), "{errors:?}");
    let svc = &state.services[&ObjectRef::new("prod", "web")];
    assert_eq!(svc.cluster_ips, ["10.96.0.1".parse::<std::net::IpAddr>().unwrap()]);
    let slice = &state.endpoint_slices[&ObjectRef::new("prod", "web-abc")];
    assert_eq!(slice.service.as_deref(), Some("web"));
    assert_eq!(slice.endpoints.len(), 2);

    h.send(Cmd::Watch(Kind::EndpointSlice, vec![event("MODIFIED", slice_json(&["10.0.0.1"], 7))]));
    let (state, _) = h.snapshot().await;
    assert_eq!(state.endpoint_slices[&ObjectRef::new("prod", "web-abc")].endpoints.len(), 1);

    h.send(Cmd::Watch(Kind::Service, vec![event("DELETED", service_json(8))]));
    let (state, _) = h.snapshot().await;
    assert!(state.services.is_empty());
    h.quiet().await;
}

/// With the CRDs installed, cluster policies of the three kinds reach the snapshot (an invalid
/// one as an error naming kind, object and field); without them (every other test) the source
/// syncs as if there were none.
#[tokio::test(start_paused = true)]
async fn cluster_policies_when_their_crds_exist() {
    let (client, cmd, _failed) = fake_server(
        vec![pod_json("a", "prod", "10.0.0.1", "web", 1)],
        vec![ns_json("prod", 2)],
        vec![],
        None,
    );
    let cnp = json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": { "name": "deny-all", "resourceVersion": "5", "managedFields": [{ "manager": "m" }] },
        "spec": {
            "tier": "Baseline", "priority": 10, "subject": { "namespaces": {} },
            "egress": [{ "action": "Deny", "to": [{ "networks": ["0.0.0.0/0"] }] }],
        },
        "status": { "conditions": [] },
    });
    let bad = json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": { "name": "bad", "resourceVersion": "6" },
        "spec": { "tier": "Middle", "priority": 1, "subject": { "namespaces": {} } },
    });
    let anp = json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
        "metadata": { "name": "dns", "resourceVersion": "7" },
        "spec": { "priority": 1, "subject": { "namespaces": {} }, "egress": [{ "action": "Allow",
            "to": [{ "pods": { "namespaceSelector": {}, "podSelector": {} } }],
            "ports": [{ "portNumber": { "protocol": "UDP", "port": 53 } }] }] },
    });
    cmd.send(Cmd::SetList(Kind::ClusterNetworkPolicy, vec![cnp, bad])).expect("fake");
    cmd.send(Cmd::SetList(Kind::AdminNetworkPolicy, vec![anp])).expect("fake");
    let (tx, mut rx) = mpsc::channel(16);
    let opts = KubeSourceOptions { kubeconfig: None, debounce: Duration::from_millis(100) };
    let _source = tokio::spawn(run(client, opts, tx));
    // The lists may race the commands: wait until both kinds arrived (bounded).
    loop {
        let e = tokio::time::timeout(WAIT, rx.recv()).await.expect("event").expect("source");
        let SourceEvent::Snapshot { state, errors, .. } = e else { continue };
        if state.cluster_policies.len() < 2 {
            continue;
        }
        let names: Vec<String> = state.cluster_policies.keys().map(|k| k.to_string()).collect();
        assert_eq!(names, ["AdminNetworkPolicy/dns", "ClusterNetworkPolicy/deny-all"]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("ClusterNetworkPolicy bad: spec.tier: "), "{errors:?}");
        assert_eq!(state.pods.len(), 1);
        break;
    }
}
