use super::*;
use crate::model::{Direction, Peer, PortRef, Protocol};

const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: prod
  labels: {env: prod}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web}}
spec:
  nodeName: node-a
  containers:
  - name: c
    image: x
    ports:
    - {name: http, containerPort: 8080}
    - {containerPort: 53, protocol: UDP}
status:
  podIP: 10.0.0.1
  podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector: {}
      podSelector: {matchExpressions: [{key: app, operator: In, values: [a, b]}]}
    - ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24]}
    ports:
    - {port: http}
    - {protocol: SCTP, port: 1000, endPort: 2000}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
"#;

#[test]
fn multi_document_yaml() {
    let (s, errors) = load_str("good.yaml", GOOD);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(s.namespaces["prod"].labels["kubernetes.io/metadata.name"], "prod");
    let web = &s.pods[&crate::model::PodRef::new("prod", "web")];
    assert_eq!(web.ips.len(), 2);
    assert_eq!(web.node_name.as_deref(), Some("node-a"));
    assert_eq!(web.container_ports[1].protocol, Protocol::Udp);
    let p = &s.policies[&crate::model::PodRef::new("prod", "backend")];
    assert!(p.affects(Direction::Ingress) && !p.affects(Direction::Egress));
    let r = &p.ingress[0];
    assert!(matches!(&r.peers[1], Peer::IpBlock(b) if b.except.len() == 1));
    assert_eq!(r.ports[0].port, Some(PortRef::Name("http".into())));
    assert_eq!(r.ports[1].end_port, Some(2000));
}

#[test]
fn list_and_json() {
    let json = r#"{"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "x"}, "spec": {"containers": []}, "status": {"podIP": "10.0.0.9"}},
        {"apiVersion": "v1", "kind": "PodList", "items": [
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "b"}, "spec": {"containers": [], "hostNetwork": true}}
        ]}
    ]}"#;
    let (s, errors) = load_str("pods.json", json);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(s.pods.len(), 2);
    assert!(s.pods[&crate::model::PodRef::new("default", "b")].host_network);
    let yaml_list = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: n1}}\n";
    let (s, errors) = load_str("l.yaml", yaml_list);
    assert!(errors.is_empty() && s.namespaces.contains_key("n1"));
}

fn policy_with(spec: &str) -> String {
    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: backend, namespace: prod}}\nspec:\n{spec}\n")
}

#[test]
fn validation_errors_name_file_object_and_field() {
    let ingress_from = |peer: &str| {
        policy_with(&format!(
            "  podSelector: {{}}\n  ingress:\n  - from:\n    - podSelector: {{}}\n    - {peer}\n"
        ))
    };
    let ingress_port = |port: &str| {
        policy_with(&format!("  podSelector: {{}}\n  ingress:\n  - ports:\n    - {port}\n"))
    };
    let cases = [
        (ingress_from("ipBlock: {cidr: 10.0.0.0/33}"), r#"policies.yaml: NetworkPolicy prod/backend: spec.ingress[0].from[1].ipBlock.cidr: invalid CIDR "10.0.0.0/33""#),
        (ingress_from("ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}"), "spec.ingress[0].from[1].ipBlock.except[0]: except 10.1.0.0/24 is not a strict subset of cidr 10.0.0.0/16"),
        (ingress_from("ipBlock: {cidr: 10.0.0.0/16}\n      podSelector: {}"), "spec.ingress[0].from[1]: ipBlock may not"),
        (ingress_from("podSelector: {matchExpressions: [{key: a, operator: Equals, values: [x]}]}"), r#"spec.ingress[0].from[1].podSelector.matchExpressions[0].operator: unknown label selector operator "Equals""#),
        (ingress_from("namespaceSelector: {matchExpressions: [{key: a, operator: In}]}"), "spec.ingress[0].from[1].namespaceSelector.matchExpressions[0].values: operator In requires values"),
        (ingress_port("{protocol: ICMP, port: 1}"), r#"spec.ingress[0].ports[0].protocol: unknown protocol "ICMP""#),
        (ingress_port("{port: 0}"), "spec.ingress[0].ports[0].port: port 0 is out of range"),
        (ingress_port("{port: 70000}"), "spec.ingress[0].ports[0].port: port 70000 is out of range"),
        (ingress_port("{port: 80, endPort: 79}"), "spec.ingress[0].ports[0].endPort: endPort 79 is smaller than port 80"),
        (ingress_port("{port: http, endPort: 90}"), "spec.ingress[0].ports[0].endPort: endPort requires a numeric port"),
        (ingress_port("{port: HTTP}"), r#"spec.ingress[0].ports[0].port: invalid port name "HTTP""#),
        (policy_with("  policyTypes: [Inbound]"), r#"spec.policyTypes[0]: unknown policy type "Inbound""#),
    ];
    for (text, want) in cases {
        let (s, errors) = load_str("policies.yaml", &text);
        assert_eq!(errors.len(), 1, "{text}");
        let msg = errors[0].to_string();
        assert!(msg.contains(want), "{msg}\n  does not contain\n{want}");
        assert!(msg.starts_with("policies.yaml: NetworkPolicy prod/backend: "), "{msg}");
        assert!(s.policies.is_empty());
    }
}

#[test]
fn bad_objects_are_skipped_and_others_load() {
    let text = format!(
        "{}---\n{}---\n{}",
        policy_with("  ingress: [{ports: [{port: 0}]}]"),
        GOOD,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: bad, namespace: prod}\nspec: {containers: []}\nstatus: {podIP: 10.0.0.300}\n"
    );
    let (s, errors) = load_str("mixed.yaml", &text);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].to_string().contains("spec.ingress[0].ports[0].port"));
    assert!(errors[1].to_string().contains("Pod prod/bad: status.podIP: invalid IP address"));
    // The duplicate-named policy from GOOD is the valid one and loads.
    assert_eq!(s.policies.len(), 1);
    assert_eq!(s.pods.len(), 1);
}

#[test]
fn duplicates_keep_the_first() {
    let dup = format!(
        "{}---\n{}",
        policy_with("  podSelector: {}"),
        policy_with("  policyTypes: [Egress]")
    );
    let (s, errors) = load_str("dup.yaml", &dup);
    assert_eq!(errors.len(), 1);
    assert!(
        matches!(&errors[0], ManifestError::Duplicate { kind, object, .. } if kind == "NetworkPolicy" && object == "prod/backend")
    );
    assert!(s.policies.values().next().is_some_and(|p| p.policy_types.is_none()));
}

#[test]
fn garbage_does_not_panic() {
    let inputs = [
        "", "---", "- a\n- b", "kind: 5", "kind: Pod\nspec: 7", "{", ": : :", "kind: List\nitems: 3",
        "kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {name: x}\nspec: {ingress: [{from: [{}]}]}",
        "kind: Pod\napiVersion: v1\nmetadata: {name: x}\nspec: {containers: [{name: c, ports: [{containerPort: -1}]}]}",
        "apiVersion: v1\nkind: Pod\nmetadata: {}\n",
    ];
    for text in inputs {
        let _ = load_str("x.yaml", text);
        let _ = load_str("x.json", text);
    }
    let (_, errors) =
        load_str("x.yaml", "kind: List\nitems: [{kind: Namespace, apiVersion: v1, metadata: {}}]");
    assert!(errors[0].to_string().contains("metadata.name: missing required field"), "{errors:?}");
}

#[test]
fn load_dir_reads_sorted_manifest_files() {
    let dir = std::env::temp_dir().join(format!("netpol-manifest-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("b.yml"), GOOD).unwrap();
    std::fs::write(
        dir.join("a.json"),
        r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"prod"}}"#,
    )
    .unwrap();
    std::fs::write(dir.join("c.txt"), "not read").unwrap();
    let (s, errors) = load_dir(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].to_string().contains("duplicate, already defined in")
            && errors[0].to_string().contains("a.json")
    );
    assert_eq!(s.pods.len(), 1);
    let (_, errors) = load_dir(Path::new("/nonexistent/netpol"));
    assert!(matches!(errors[..], [ManifestError::Read { .. }]));
}

#[test]
fn audit_from_namespace_label_or_annotation_and_policy_annotation() {
    let ns =
        |meta: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: n, {meta}}}\n");
    let pol = |meta: &str| {
        format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: n, {meta}}}\nspec: {{podSelector: {{}}}}\n")
    };
    let cases = [
        ("labels: {netpol.io/audit: \"true\"}", true),
        ("annotations: {netpol.io/audit: \"true\"}", true),
        ("annotations: {netpol.io/audit: \"false\"}", false),
        ("annotations: {netpol.io/audit: \"yes\"}", false),
        ("annotations: {other.io/audit: \"true\"}", false),
        ("labels: {}", false),
    ];
    for (meta, want) in cases {
        let (s, errors) = load_str("ns.yaml", &ns(meta));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(s.namespaces["n"].audit, want, "namespace {meta}");
        let (s, errors) = load_str("p.yaml", &pol(meta));
        assert!(errors.is_empty(), "{errors:?}");
        let p = s.policies.values().next().expect("policy");
        // Policies are switched by the annotation only (labels select, they do not configure).
        assert_eq!(p.audit, want && meta.starts_with("annotations"), "policy {meta}");
    }
}

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  externalIPs: [192.0.2.10]
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.1}, {ip: 198.51.100.2, ipMode: Proxy}, {hostname: lb.example}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: prod}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: prod, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}, {name: nothing}]
endpoints:
- addresses: [10.0.0.1]
- addresses: [10.0.0.2]
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: names, namespace: prod}
addressType: FQDN
endpoints: [{addresses: [example.com]}]
"#;

#[test]
fn services_and_endpoint_slices() {
    use crate::model::{AddressType, ObjectRef};
    let (s, errors) = load_str("svc.yaml", SERVICES);
    assert!(errors.is_empty(), "{errors:?}");
    let web = &s.services[&ObjectRef::new("prod", "web")];
    let ips = |v: &[std::net::IpAddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(ips(&web.cluster_ips), ["10.96.0.10", "fd00:96::10"]);
    assert_eq!(ips(&web.external_ips), ["192.0.2.10"]);
    assert_eq!(ips(&web.load_balancer_ips), ["198.51.100.1"], "ipMode Proxy is not DNATed");
    assert_eq!(web.ports.len(), 2);
    assert_eq!((web.ports[0].name.as_str(), web.ports[0].node_port), ("http", Some(30080)));
    assert_eq!((web.ports[1].protocol, web.ports[1].port), (Protocol::Udp, 53));
    assert!(s.services[&ObjectRef::new("prod", "headless")].cluster_ips.is_empty());
    let slice = &s.endpoint_slices[&ObjectRef::new("prod", "web-abc")];
    assert_eq!(slice.service.as_deref(), Some("web"));
    assert_eq!(slice.ports.len(), 2, "a port without a number is left out");
    assert!(slice.endpoints[0].ready && !slice.endpoints[0].terminating);
    assert!(!slice.endpoints[1].ready && slice.endpoints[1].serving);
    let fqdn = &s.endpoint_slices[&ObjectRef::new("prod", "names")];
    assert_eq!((fqdn.address_type, fqdn.endpoints.len()), (AddressType::Fqdn, 0));
}

#[test]
fn service_errors_name_the_field() {
    let cases = [
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: a}\nspec: {clusterIP: 10.96.0.300}\n",
            r#"svc.yaml: Service a/s: spec.clusterIP: invalid IP address "10.96.0.300""#,
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: a}\nspec: {ports: [{port: 80, protocol: ICMP}]}\n",
            r#"svc.yaml: Service a/s: spec.ports[0].protocol: unknown protocol "ICMP" (expected TCP, UDP or SCTP)"#,
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e, namespace: a}\naddressType: IPv4\nendpoints: [{addresses: [\"fd00::1\"]}]\n",
            "svc.yaml: EndpointSlice a/e: endpoints[0].addresses[0]: address fd00::1 is not IPv4",
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e, namespace: a}\naddressType: IPv5\nendpoints: []\n",
            r#"svc.yaml: EndpointSlice a/e: addressType: unknown value "IPv5" (expected IPv4, IPv6 or FQDN)"#,
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e, namespace: a}\naddressType: IPv4\nports: [{port: 0}]\nendpoints: []\n",
            "svc.yaml: EndpointSlice a/e: ports[0].port: port 0 is out of range 1-65535",
        ),
    ];
    for (text, want) in cases {
        let (s, errors) = load_str("svc.yaml", text);
        assert_eq!(errors.len(), 1, "{text}");
        assert_eq!(errors[0].to_string(), want);
        assert!(s.services.is_empty() && s.endpoint_slices.is_empty());
    }
}

const CLUSTER: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: sensitive}
spec:
  tier: Admin
  priority: 10
  subject:
    pods:
      namespaceSelector: {matchLabels: {env: prod}}
      podSelector: {matchLabels: {app: db}}
  ingress:
  - name: monitoring
    action: Accept
    from:
    - namespaces: {matchLabels: {kubernetes.io/metadata.name: monitoring}}
    protocols:
    - tcp: {destinationPort: {number: 9100}}
    - udp: {destinationPort: {range: {start: 1000, end: 2000}}}
    - sctp: {}
    - destinationNamedPort: metrics
  - {action: Pass, from: [{pods: {namespaceSelector: {}, podSelector: {}}}]}
  egress:
  - action: Deny
    to: [{networks: [0.0.0.0/0, "::/0"]}]
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: dns}
spec:
  priority: 3
  subject: {namespaces: {}}
  egress:
  - action: Allow
    to: [{pods: {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}, podSelector: {matchLabels: {k8s-app: kube-dns}}}}]
    ports:
    - portNumber: {protocol: UDP, port: 53}
    - portRange: {start: 53, end: 54}
    - namedPort: dns-tcp
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [kube-system]}]}}
  ingress:
  - {action: Deny, from: [{namespaces: {}}]}
"#;

#[test]
fn cluster_kinds() {
    use crate::model::{cluster_ref, ClusterAction, ClusterKind, ClusterPeer, ClusterPort, Tier};
    let (s, errors) = load_str("cluster.yaml", CLUSTER);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(s.cluster_policies.len(), 3);
    let cnp = &s.cluster_policies[&cluster_ref(ClusterKind::ClusterNetworkPolicy, "sensitive")];
    assert_eq!((cnp.tier, cnp.priority), (Tier::Admin, 10));
    assert_eq!(cnp.subject.pod_selector.match_labels["app"], "db");
    let r = &cnp.ingress[0];
    assert_eq!((r.name.as_str(), r.action), ("monitoring", ClusterAction::Accept));
    assert_eq!(r.ports.len(), 4);
    assert!(
        matches!(&r.ports[0], ClusterPort::Numeric(p) if p.port == Some(PortRef::Number(9100)) && p.protocol == Protocol::Tcp)
    );
    assert!(
        matches!(&r.ports[1], ClusterPort::Numeric(p) if p.end_port == Some(2000) && p.protocol == Protocol::Udp)
    );
    assert!(
        matches!(&r.ports[2], ClusterPort::Numeric(p) if p.port.is_none() && p.protocol == Protocol::Sctp)
    );
    assert_eq!(r.ports[3], ClusterPort::Named("metrics".into()));
    assert_eq!(cnp.ingress[1].action, ClusterAction::Pass);
    assert!(matches!(&cnp.egress[0].peers[0], ClusterPeer::Networks(n) if n.len() == 2));
    let anp = &s.cluster_policies[&cluster_ref(ClusterKind::AdminNetworkPolicy, "dns")];
    assert_eq!((anp.tier, anp.priority), (Tier::Admin, 3));
    assert!(anp.subject.namespace_selector.match_labels.is_empty());
    assert_eq!(anp.egress[0].action, ClusterAction::Accept);
    assert!(
        matches!(&anp.egress[0].ports[1], ClusterPort::Numeric(p) if p.protocol == Protocol::Tcp && p.end_port == Some(54))
    );
    let banp =
        &s.cluster_policies[&cluster_ref(ClusterKind::BaselineAdminNetworkPolicy, "default")];
    assert_eq!(banp.tier, Tier::Baseline);
    assert_eq!(banp.ingress[0].action, ClusterAction::Deny);
}

/// Each invalid cluster policy is rejected with its kind, name and field; the valid one beside
/// it still loads.
#[test]
fn cluster_bad_input() {
    let head = |kind: &str, name: &str| {
        let v = if kind == "ClusterNetworkPolicy" { "v1alpha2" } else { "v1alpha1" };
        format!(
            "apiVersion: policy.networking.k8s.io/{v}\nkind: {kind}\nmetadata: {{name: {name}}}\n"
        )
    };
    let cnp = "ClusterNetworkPolicy";
    let anp = "AdminNetworkPolicy";
    let banp = "BaselineAdminNetworkPolicy";
    let ok_subject = "  subject: {namespaces: {}}\n";
    let cases: Vec<(String, &str, &str)> = vec![
        (format!("{}spec:\n  tier: Middle\n  priority: 1\n{ok_subject}", head(cnp, "t")), "spec.tier", "unknown value \"Middle\""),
        (format!("{}spec:\n  priority: 1\n{ok_subject}", head(cnp, "t2")), "spec.tier", "missing"),
        (format!("{}spec:\n  tier: Admin\n  priority: 1001\n{ok_subject}", head(cnp, "p")), "spec.priority", "out of range"),
        (format!("{}spec:\n  priority: -1\n{ok_subject}", head(anp, "p2")), "spec.priority", "out of range"),
        (format!("{}spec:\n{ok_subject}", head(anp, "p3")), "spec.priority", "missing"),
        (format!("{}spec:\n  tier: Admin\n  priority: 1\n  subject: {{namespaces: {{}}, pods: {{podSelector: {{}}}}}}\n", head(cnp, "s")), "spec.subject", "exactly one of namespaces, pods"),
        (format!("{}spec:\n  tier: Admin\n  priority: 1\n  subject: {{pods: {{namespaceSelector: {{}}}}}}\n", head(cnp, "s2")), "spec.subject.pods.podSelector", "missing"),
        (format!("{}spec:\n  tier: Admin\n  priority: 1\n{ok_subject}  ingress: [{{action: Allow, from: [{{namespaces: {{}}}}]}}]\n", head(cnp, "a")), "spec.ingress[0].action", "Accept, Deny or Pass"),
        (format!("{}spec:\n{ok_subject}  ingress: [{{action: Pass, from: [{{namespaces: {{}}}}]}}]\n", head(banp, "default")), "spec.ingress[0].action", "Allow or Deny"),
        (format!("{}spec:\n{ok_subject}", head(banp, "other")), "metadata.name", "default"),
        (format!("{}spec:\n  priority: 1\n{ok_subject}  egress: [{{action: Deny, to: []}}]\n", head(anp, "e")), "spec.egress[0].to", "missing"),
        (format!("{}spec:\n  priority: 1\n{ok_subject}  egress: [{{action: Deny, to: [{{networks: [10.0.0.0/33]}}]}}]\n", head(anp, "c")), "spec.egress[0].to[0].networks[0]", "invalid CIDR"),
        (format!("{}spec:\n  priority: 1\n{ok_subject}  egress: [{{action: Deny, to: [{{nodes: {{}}}}]}}]\n", head(anp, "n")), "spec.egress[0].to[0].nodes", "not supported"),
        (format!("{}spec:\n  priority: 1\n{ok_subject}  egress: [{{action: Deny, to: [{{namespaces: {{}}, networks: [10.0.0.0/8]}}]}}]\n", head(anp, "two")), "spec.egress[0].to[0]", "exactly one of"),
        (format!("{}spec:\n  priority: 1\n{ok_subject}  egress: [{{action: Deny, to: [{{networks: [10.0.0.0/8]}}], ports: [{{namedPort: http}}]}}]\n", head(anp, "np")), "spec.egress[0]", "named ports"),
        (format!("{}spec:\n  priority: 1\n{ok_subject}  ingress: [{{action: Deny, from: [{{namespaces: {{}}}}], ports: [{{portNumber: {{port: 80}}}}]}}]\n", head(anp, "pp")), "spec.ingress[0].ports[0].portNumber.protocol", "missing"),
        (format!("{}spec:\n  priority: 1\n{ok_subject}  ingress: [{{action: Deny, from: [{{namespaces: {{}}}}], ports: [{{portRange: {{start: 90, end: 80}}}}]}}]\n", head(anp, "pr")), "spec.ingress[0].ports[0].portRange.end", "before start"),
        (format!("{}spec:\n  tier: Baseline\n  priority: 1\n{ok_subject}  ingress: [{{action: Deny, from: [{{namespaces: {{}}}}], protocols: [{{tcp: {{destinationPort: {{number: 70000}}}}}}]}}]\n", head(cnp, "pn")), "spec.ingress[0].protocols[0].tcp.destinationPort.number", "out of range"),
        (format!("{}spec:\n  tier: Baseline\n  priority: 1\n{ok_subject}  ingress: [{{action: Deny, from: [{{namespaces: {{}}}}], protocols: [{{tcp: {{}}, udp: {{}}}}]}}]\n", head(cnp, "pt")), "spec.ingress[0].protocols[0]", "exactly one of tcp"),
        (format!("{}spec:\n  tier: Baseline\n  priority: 1\n{ok_subject}  ingress: [{{action: Deny, from: [{{namespaces: {{matchExpressions: [{{key: a, operator: Has}}]}}}}]}}]\n", head(cnp, "sel")), "spec.ingress[0].from[0].namespaces.matchExpressions[0].operator", "operator"),
        (format!("{}spec:\n  tier: Baseline\n  priority: 1\n{ok_subject}  ingress: [{{action: Deny, from: [{{networks: [10.0.0.0/8]}}]}}]\n", head(cnp, "in")), "spec.ingress[0].from[0]", "exactly one of namespaces, pods"),
    ];
    let good =
        format!("---\n{}spec:\n  tier: Admin\n  priority: 5\n{ok_subject}", head(cnp, "good"));
    for (doc, field, message) in cases {
        let (s, errors) = load_str("bad.yaml", &format!("{doc}{good}"));
        assert_eq!(errors.len(), 1, "{doc}: {errors:?}");
        let text = errors[0].to_string();
        assert!(text.contains(&format!(": {field}: ")), "{doc}: {text}");
        assert!(text.contains(message), "{doc}: {text}");
        assert!(!text.contains("default/"), "cluster-scoped objects have no namespace: {text}");
        assert_eq!(s.cluster_policies.len(), 1, "the valid policy still loads: {doc}");
    }
}
