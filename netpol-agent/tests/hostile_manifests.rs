//! Hostile manifests: valid objects mixed with objects that the API would reject (invalid CIDRs,
//! bad selector operators, out-of-range and zero ports, endPort below port, unknown protocols,
//! invalid pod IPs, duplicates), random YAML, and oversized or pathological inputs. Every bad
//! object gets one error naming the object and the field; the valid objects load and compile
//! exactly as they do without the bad ones; nothing panics; memory stays bounded.
use netpol_agent::compile::{compile, CompileOptions};
use netpol_agent::manifest::{load_dir, load_str, ManifestError, MAX_FILE_BYTES};
use proptest::prelude::*;
use serde_json::{json, Value};

const NODE: &str = "node-a";

fn namespace(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": format!("ns{i}"), "labels": {"env": if i.is_multiple_of(2) {"prod"} else {"dev"}}}})
}

fn pod(ns: usize, i: usize, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": format!("pod{i}"), "namespace": format!("ns{ns}"), "labels": {"app": app}},
           "spec": {"nodeName": if i.is_multiple_of(3) { "node-b" } else { NODE },
                    "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
           "status": {"podIP": format!("10.7.{ns}.{}", i + 1)}})
}

fn policy(ns: usize, name: &str, app: &str, port: Value, cidr: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": format!("ns{ns}")},
           "spec": {"podSelector": {"matchLabels": {"app": app}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "cli"}}},
                                          {"ipBlock": {"cidr": cidr}}],
                                 "ports": [port]}]}})
}

/// One kind of invalid object: how to make it, and the field its error must name.
#[derive(Clone, Copy, Debug)]
enum Bad {
    Cidr,
    Operator,
    ZeroPort,
    PortTooLarge,
    EndPortBelowPort,
    Protocol,
    PortName,
    PodIp,
    ContainerPort,
    PolicyType,
    NoName,
}

impl Bad {
    const ALL: [Bad; 11] = [
        Bad::Cidr,
        Bad::Operator,
        Bad::ZeroPort,
        Bad::PortTooLarge,
        Bad::EndPortBelowPort,
        Bad::Protocol,
        Bad::PortName,
        Bad::PodIp,
        Bad::ContainerPort,
        Bad::PolicyType,
        Bad::NoName,
    ];

    /// The object named `ns{ns}/bad{i}` (`None`: its error names no object name) and the field.
    fn make(self, ns: usize, i: usize) -> (Value, &'static str) {
        let name = format!("bad{i}");
        let good_port = json!({"port": 80});
        match self {
            Bad::Cidr => (
                policy(ns, &name, "web", good_port, "10.0.0.0/33"),
                "spec.ingress[0].from[1].ipBlock.cidr",
            ),
            Bad::Operator => {
                let mut p = policy(ns, &name, "web", good_port, "10.0.0.0/8");
                p["spec"]["podSelector"] = json!({"matchExpressions": [
                    {"key": "app", "operator": "Like", "values": ["web"]}]});
                (p, "spec.podSelector.matchExpressions[0].operator")
            }
            Bad::ZeroPort => (
                policy(ns, &name, "web", json!({"port": 0}), "10.0.0.0/8"),
                "spec.ingress[0].ports[0].port",
            ),
            Bad::PortTooLarge => (
                policy(ns, &name, "web", json!({"port": 65536}), "10.0.0.0/8"),
                "spec.ingress[0].ports[0].port",
            ),
            Bad::EndPortBelowPort => (
                policy(ns, &name, "web", json!({"port": 9000, "endPort": 8000}), "10.0.0.0/8"),
                "spec.ingress[0].ports[0].endPort",
            ),
            Bad::Protocol => (
                policy(ns, &name, "web", json!({"port": 80, "protocol": "tcp"}), "10.0.0.0/8"),
                "spec.ingress[0].ports[0].protocol",
            ),
            Bad::PortName => (
                policy(ns, &name, "web", json!({"port": "Not_A-Name"}), "10.0.0.0/8"),
                "spec.ingress[0].ports[0].port",
            ),
            Bad::PodIp => {
                let mut p = pod(ns, 0, "web");
                p["metadata"]["name"] = json!(name);
                p["status"]["podIP"] = json!("10.7.300.1");
                (p, "status.podIP")
            }
            Bad::ContainerPort => {
                let mut p = pod(ns, 0, "web");
                p["metadata"]["name"] = json!(name);
                p["spec"]["containers"][0]["ports"][0]["containerPort"] = json!(0);
                (p, "spec.containers[0].ports[0].containerPort")
            }
            Bad::PolicyType => {
                let mut p = policy(ns, &name, "web", good_port, "10.0.0.0/8");
                p["spec"]["policyTypes"] = json!(["Ingress", "Sideways"]);
                (p, "spec.policyTypes[1]")
            }
            Bad::NoName => {
                let mut p = policy(ns, &name, "web", good_port, "10.0.0.0/8");
                p["metadata"]["name"] = json!("");
                (p, "metadata.name")
            }
        }
    }
}

fn yaml(docs: &[Value]) -> String {
    docs.iter().map(|d| serde_yaml::to_string(d).unwrap()).collect::<Vec<_>>().join("---\n")
}

/// A cluster: namespaces, pods and valid policies.
fn valid_objects(pods: usize, policies: usize, ports: &[u16]) -> Vec<Value> {
    let mut v: Vec<Value> = (0..3).map(namespace).collect();
    for i in 0..pods {
        v.push(pod(i % 3, i, ["web", "db", "cli"][i % 3]));
    }
    for i in 0..policies {
        let protocol = ["TCP", "UDP", "SCTP"][i % 3];
        let port = json!({"port": ports[i % ports.len()], "protocol": protocol});
        v.push(policy(i % 3, &format!("np{i}"), ["web", "db"][i % 2], port, "10.0.0.0/8"));
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Bad objects anywhere in the stream: one error each, naming object and field; the rest
    /// loads and compiles exactly as the valid objects alone.
    #[test]
    fn bad_objects_are_reported_and_the_rest_compiles(
        pods in 0usize..12,
        policies in 0usize..8,
        ports in proptest::collection::vec(1u16..=u16::MAX, 1..4),
        bad in proptest::collection::vec((0usize..Bad::ALL.len(), 0usize..3), 0..8),
        dup in proptest::collection::vec(any::<prop::sample::Index>(), 0..3),
        order in any::<u64>(),
    ) {
        let valid = valid_objects(pods, policies, &ports);
        let mut mixed = valid.clone();
        let mut expected = Vec::new();
        for (i, (b, ns)) in bad.iter().enumerate() {
            let (obj, field) = Bad::ALL[*b].make(*ns, i);
            // An object without a name is reported with an empty one.
            let object = if field == "metadata.name" { format!("ns{ns}/") } else { format!("ns{ns}/bad{i}") };
            expected.push((object, field));
            mixed.push(obj);
        }
        // Duplicates of valid objects with other content: the first definition is kept.
        for d in &dup {
            let mut copy = valid[d.index(valid.len())].clone();
            copy["metadata"]["labels"] = json!({"changed": "yes"});
            mixed.push(copy);
        }
        // Shuffle deterministically, keeping each duplicate after its original.
        let n_valid = valid.len();
        let mut keyed: Vec<(u64, usize, Value)> = mixed.into_iter().enumerate().map(|(i, v)| {
            let k = if i < n_valid { (order.rotate_left(i as u32 % 64) ^ i as u64) % 1000 } else { 1000 + ((i as u64 * 7919) ^ order) % 1000 };
            (k, i, v)
        }).collect();
        keyed.sort_by_key(|(k, i, _)| (*k, *i));
        let stream: Vec<Value> = keyed.into_iter().map(|(_, _, v)| v).collect();

        let (state, errors) = load_str("mixed.yaml", &yaml(&stream));
        let (clean, clean_errors) = load_str("clean.yaml", &yaml(&valid));
        prop_assert!(clean_errors.is_empty(), "{clean_errors:?}");

        let dups = errors.iter().filter(|e| matches!(e, ManifestError::Duplicate { .. })).count();
        prop_assert_eq!(dups, dup.len(), "{:?}", errors);
        let invalid: Vec<String> = errors.iter()
            .filter(|e| !matches!(e, ManifestError::Duplicate { .. }))
            .map(|e| e.to_string())
            .collect();
        prop_assert_eq!(invalid.len(), expected.len(), "{:?}", invalid);
        for (object, field) in &expected {
            let want = format!("{object}: {field}: ");
            prop_assert!(
                invalid.iter().any(|e| e.contains(&want)),
                "no error names {} and {}: {:?}", object, field, invalid
            );
        }
        prop_assert_eq!(&state, &clean);
        let opts = CompileOptions::new(NODE);
        prop_assert_eq!(compile(&state, &opts), compile(&clean, &opts));
    }

    /// Arbitrary text as YAML or JSON: an error or a state, never a panic.
    #[test]
    fn random_text_never_panics(text in ".{0,400}", json_ext in any::<bool>()) {
        let name = if json_ext { "x.json" } else { "x.yaml" };
        let (state, _errors) = load_str(name, &text);
        let _ = compile(&state, &CompileOptions::new(NODE));
    }

    /// Random YAML documents shaped like objects (random keys and values under a real kind).
    #[test]
    fn random_objects_never_panic(
        kind in prop::sample::select(vec!["Pod", "Namespace", "NetworkPolicy", "List", "PodList"]),
        body in random_value(4),
    ) {
        let mut obj = json!({"kind": kind, "metadata": {"name": "x", "namespace": "y"}});
        if let Value::Object(m) = body {
            for (k, v) in m { obj[k] = v; }
        }
        let text = serde_yaml::to_string(&obj).unwrap();
        let (state, _errors) = load_str("random.yaml", &text);
        let _ = compile(&state, &CompileOptions::new(NODE));
    }
}

fn random_value(depth: u32) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![
            "TCP",
            "UDP",
            "SCTP",
            "ICMP",
            "In",
            "NotIn",
            "Exists",
            "DoesNotExist",
            "10.0.0.0/8",
            "::/0",
            "300.1.1.1/8",
            "",
            "Ingress",
            "Egress",
            "http",
            "-1"
        ])
        .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(depth, 64, 6, |inner| {
        let keys = prop::sample::select(vec![
            "spec",
            "status",
            "metadata",
            "ingress",
            "egress",
            "from",
            "to",
            "ports",
            "port",
            "endPort",
            "protocol",
            "ipBlock",
            "cidr",
            "except",
            "podSelector",
            "namespaceSelector",
            "matchLabels",
            "matchExpressions",
            "key",
            "operator",
            "values",
            "policyTypes",
            "podIP",
            "podIPs",
            "ip",
            "containers",
            "containerPort",
            "nodeName",
            "items",
            "labels",
        ]);
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(keys, inner, 0..5).prop_map(|m| Value::Object(
                m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

/// A pod with 20,000 labels and a policy with 2,000 selector expressions load and compile.
#[test]
fn huge_label_sets_load_and_compile() {
    let mut p = pod(0, 1, "web");
    let labels: serde_json::Map<String, Value> =
        (0..20_000).map(|i| (format!("k{i}"), json!(format!("v{i}")))).collect();
    p["metadata"]["labels"] = Value::Object(labels);
    let mut np = policy(0, "wide", "web", json!({"port": 80}), "10.0.0.0/8");
    let exprs: Vec<Value> = (0..2_000)
        .map(|i| json!({"key": format!("k{i}"), "operator": "In", "values": [format!("v{i}")]}))
        .collect();
    np["spec"]["podSelector"] = json!({"matchExpressions": exprs});
    let (state, errors) = load_str("huge.yaml", &yaml(&[namespace(0), p, np]));
    assert!(errors.is_empty(), "{errors:?}");
    let c = compile(&state, &CompileOptions::new(NODE));
    let ep = c.endpoints.values().next().expect("the pod is a local endpoint");
    assert!(!ep.sets.is_empty(), "the policy selects the pod through all 2,000 expressions");
}

/// YAML alias bombs and deep nesting are refused by the parsers' limits, not expanded.
#[test]
fn alias_bombs_and_deep_nesting_are_refused() {
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 0..12 {
        let prev = if i == 0 { "a".to_string() } else { format!("b{}", i - 1) };
        bomb += &format!("b{i}: &b{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n");
    }
    bomb += "kind: Pod\nmetadata: {name: bomb}\n";
    let (state, errors) = load_str("bomb.yaml", &bomb);
    assert!(state.pods.is_empty());
    assert!(matches!(errors.as_slice(), [ManifestError::Yaml { .. }]), "{errors:?}");

    let deep = format!("kind: Pod\nspec: {}{}\n", "[".repeat(10_000), "]".repeat(10_000));
    let (state, errors) = load_str("deep.yaml", &deep);
    assert!(state.pods.is_empty());
    assert_eq!(errors.len(), 1, "{errors:?}");
    let deep =
        format!("{{\"kind\": \"Pod\", \"spec\": {}{}}}", "[".repeat(10_000), "]".repeat(10_000));
    let (_, errors) = load_str("deep.json", &deep);
    assert!(matches!(errors.as_slice(), [ManifestError::Json { .. }]), "{errors:?}");
}

/// A manifest file over the size limit is refused with an error naming it; the other files of
/// the directory still load.
#[test]
fn oversized_files_are_refused_and_the_rest_loads() {
    let dir = std::env::temp_dir().join(format!("netpol-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), yaml(&[namespace(0), pod(0, 1, "web")])).unwrap();
    let big =
        format!("kind: ConfigMap\ndata: {{x: \"{}\"}}\n", "y".repeat(MAX_FILE_BYTES as usize));
    std::fs::write(dir.join("big.yaml"), big).unwrap();
    let (state, errors) = load_dir(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(state.pods.len(), 1);
    assert!(
        matches!(errors.as_slice(), [ManifestError::TooLarge { file, .. }] if file.ends_with("big.yaml")),
        "{errors:?}"
    );
    assert!(errors[0].to_string().contains("big.yaml"), "{}", errors[0]);
}
