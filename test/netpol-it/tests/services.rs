//! Egress to a Service address with a real kube-proxy-style DNAT in the host namespace: the
//! agent checks the client's egress before the DNAT (the packet carries the Service address) and
//! must decide it from every ready backend, as EndpointSlices change while traffic runs.
use std::net::SocketAddr;

use netpol_it::{
    agent::RunningAgent,
    lab::{Lab, Topology},
    manifests::{namespace, pod, ManifestDir},
    probe::{eventually, TcpServer},
    services::{service_manifest, slice_manifest, Backend, ServiceNat},
};

const NODE: &str = "lab-node";

/// The client may reach `app: web` pods on their named port `http` only.
const CLIENT_EGRESS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: client-egress\n  namespace: prod\nspec:\n  podSelector:\n    matchLabels: {app: client}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - podSelector:\n        matchLabels: {app: web}\n    ports:\n    - port: http\n";

#[test]
fn service_address_follows_every_ready_backend() {
    for topology in [Topology::Routed, Topology::Bridged] {
        let mut lab = Lab::with_topology(topology).unwrap();
        // An empty lab: a blackholed /24 of its own for the Service address.
        let vips = Lab::new().unwrap();
        let client = lab.add_pod("client").unwrap();
        let free = lab.add_pod("free").unwrap();
        // Two web pods whose named port `http` has different numbers, and a db pod.
        let web1 = lab.add_pod("web-1").unwrap();
        let web2 = lab.add_pod("web-2").unwrap();
        let db = lab.add_pod("db").unwrap();
        let _servers = [
            TcpServer::start(&web1.netns, 8080).unwrap(),
            TcpServer::start(&web2.netns, 9090).unwrap(),
            TcpServer::start(&db.netns, 9090).unwrap(),
        ];
        let vip = vips.address(10);
        let nat = ServiceNat::new(vip).unwrap();
        nat.route_from(&lab).unwrap();
        let dir = ManifestDir::new(&format!("svc-{topology:?}")).unwrap();
        dir.write("ns.yaml", &namespace("prod", &[])).unwrap();
        dir.write("client.yaml", &pod(&client, "prod", NODE, &[("app", "client")], &[])).unwrap();
        dir.write("free.yaml", &pod(&free, "prod", NODE, &[("app", "free")], &[])).unwrap();
        dir.write("web-1.yaml", &pod(&web1, "prod", NODE, &[("app", "web")], &[("http", 8080)]))
            .unwrap();
        dir.write("web-2.yaml", &pod(&web2, "prod", NODE, &[("app", "web")], &[("http", 9090)]))
            .unwrap();
        dir.write("db.yaml", &pod(&db, "prod", NODE, &[("app", "db")], &[("http", 9090)])).unwrap();
        // Service port 80, targetPort `http`: 8080 on web-1, 9090 on web-2 (one slice each, as
        // the EndpointSlice controller groups endpoints by resolved ports).
        dir.write(
            "svc.yaml",
            &service_manifest("prod", "web", vip, &[("http", "TCP", 80, "http")]),
        )
        .unwrap();
        let slice_a = |eps: &[(std::net::Ipv4Addr, bool)]| {
            slice_manifest("prod", "web-a", "web", &[("http", "TCP", 8080)], eps)
        };
        let slice_b = |eps: &[(std::net::Ipv4Addr, bool)]| {
            slice_manifest("prod", "web-b", "web", &[("http", "TCP", 9090)], eps)
        };
        // db is listed but not ready: kube-proxy ignores it, and so must the verdict.
        dir.write("slice-a.yaml", &slice_a(&[(web1.ip, true)])).unwrap();
        dir.write("slice-b.yaml", &slice_b(&[(web2.ip, true), (db.ip, false)])).unwrap();
        let b1 = Backend { ip: web1.ip, port: 8080 };
        let b2 = Backend { ip: web2.ip, port: 9090 };
        let bdb = Backend { ip: db.ip, port: 9090 };
        nat.set(&[("tcp", 80, vec![b1, b2])]).unwrap();
        let agent = RunningAgent::start(&dir, NODE, &format!("svc{topology:?}"));
        agent.wait_ready();
        let to = SocketAddr::from((vip, 80));
        let t = format!("{topology:?}");

        eventually(&client, to, true, &format!("{t}: no policy, the DNAT works"));
        dir.write("client-egress.yaml", CLIENT_EGRESS).unwrap();
        // Port 80 is not what the policy names; both backends' resolved ports are allowed.
        eventually(&client, to, true, &format!("{t}: every backend allowed"));
        eventually(&client, SocketAddr::from((web2.ip, 9090)), true, &format!("{t}: web-2 direct"));
        eventually(&client, SocketAddr::from((db.ip, 9090)), false, &format!("{t}: db direct"));
        // db becomes ready while traffic runs: a backend the client may not reach, so the
        // Service is denied, whichever backend the DNAT would pick.
        dir.write("slice-b.yaml", &slice_b(&[(web2.ip, true), (db.ip, true)])).unwrap();
        nat.set(&[("tcp", 80, vec![b1, b2, bdb])]).unwrap();
        eventually(&client, to, false, &format!("{t}: db backend added"));
        // A pod without egress policy is not affected.
        eventually(&free, to, true, &format!("{t}: unpoliced pod"));
        // db leaves again.
        dir.write("slice-b.yaml", &slice_b(&[(web2.ip, true)])).unwrap();
        nat.set(&[("tcp", 80, vec![b1, b2])]).unwrap();
        eventually(&client, to, true, &format!("{t}: db backend removed"));
        // Only db left (web pods gone from the Service): denied.
        dir.write("slice-a.yaml", &slice_a(&[])).unwrap();
        dir.write("slice-b.yaml", &slice_b(&[(db.ip, true)])).unwrap();
        nat.set(&[("tcp", 80, vec![bdb])]).unwrap();
        eventually(&client, to, false, &format!("{t}: only db"));
        // The policy goes: the client is not isolated any more.
        dir.remove("client-egress.yaml").unwrap();
        eventually(&client, to, true, &format!("{t}: policy deleted"));
    }
}
