//! Every manifest in `deploy/` as `kubectl apply -k` sees it: each kustomization is rendered
//! (resources, `images`, JSON6902 `patches`: the only kustomize features deploy/ uses; any other
//! field fails the render), and every object
//! - parses into its k8s-openapi type with no unknown field (serde_ignored) and a path to the
//!   first wrong value (serde_path_to_error),
//! - passes a strict JSON Schema check (kubeconform's `-strict`: no additional properties)
//!   against the schema k8s-openapi generates from the Kubernetes OpenAPI spec (v1.36),
//! - and the agent's container arguments parse with the agent's real command line parser.
//!
//! The renderer is checked against `kubectl kustomize` where the output must be identical.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use clap::Parser as _;
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, Namespace, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
    schemars,
};
use netpol_agent::cli::{Cli, Command};
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::Value;

/// The kustomizations an operator applies.
const KUSTOMIZATIONS: &[&str] =
    &[".", "overlays/kind", "overlays/aks", "uninstall", "overlays/aks/uninstall"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    images: Vec<Image>,
    #[serde(default)]
    patches: Vec<Patch>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Image {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Patch {
    target: Target,
    patch: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    group: Option<String>,
    version: Option<String>,
    kind: String,
    name: String,
}

/// A rendered kustomization: its objects and every file it read.
#[derive(Default)]
struct Rendered {
    objects: Vec<Value>,
    files: BTreeSet<PathBuf>,
}

fn yaml_docs(text: &str, what: &Path) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", what.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// Renders the kustomization in `dir` the way kustomize does for the features deploy/ uses.
fn render(dir: &Path) -> Rendered {
    let file = dir.join("kustomization.yaml");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let k: Kustomization = serde_yaml::from_str(&text).unwrap_or_else(|e| {
        panic!("{}: {e} (a kustomize feature this renderer does not know?)", file.display())
    });
    assert_eq!(
        (k.api_version.as_str(), k.kind.as_str()),
        ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
        "{}",
        file.display()
    );
    let mut out = Rendered::default();
    out.files.insert(file.canonicalize().unwrap());
    for r in &k.resources {
        let path = dir.join(r);
        if path.is_dir() {
            let sub = render(&path);
            out.objects.extend(sub.objects);
            out.files.extend(sub.files);
        } else {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.objects.extend(yaml_docs(&text, &path));
            out.files.insert(path.canonicalize().unwrap());
        }
    }
    for p in &k.patches {
        let ops: Value = serde_yaml::from_str(&p.patch).expect("patch YAML");
        let ops: json_patch::Patch = serde_json::from_value(ops)
            .unwrap_or_else(|e| panic!("{}: patch for {}: {e}", file.display(), p.target.name));
        let api_version = match (&p.target.group, &p.target.version) {
            (Some(g), Some(v)) if !g.is_empty() => format!("{g}/{v}"),
            (_, Some(v)) => v.clone(),
            _ => String::new(),
        };
        let targets: Vec<&mut Value> = out
            .objects
            .iter_mut()
            .filter(|o| {
                o["kind"] == p.target.kind.as_str()
                    && o["metadata"]["name"] == p.target.name.as_str()
                    && (api_version.is_empty() || o["apiVersion"] == api_version.as_str())
            })
            .collect();
        assert_eq!(
            targets.len(),
            1,
            "{}: patch target {} must match one object",
            file.display(),
            p.target.name
        );
        for t in targets {
            json_patch::patch(t, &ops)
                .unwrap_or_else(|e| panic!("{}: patch of {}: {e}", file.display(), p.target.name));
        }
    }
    for o in &mut out.objects {
        for list in ["initContainers", "containers"] {
            let Some(cs) = o.pointer_mut(&format!("/spec/template/spec/{list}")) else { continue };
            for c in cs.as_array_mut().into_iter().flatten() {
                let image = c["image"].as_str().unwrap_or_default().to_owned();
                let (name, tag) = image.split_once(':').unwrap_or((&image, ""));
                let Some(img) = k.images.iter().find(|i| i.name == name) else { continue };
                let name = img.new_name.as_deref().unwrap_or(name);
                let tag = img.new_tag.as_deref().unwrap_or(tag);
                c["image"] =
                    if tag.is_empty() { name.into() } else { format!("{name}:{tag}").into() };
            }
        }
    }
    out
}

/// Parses `doc` into `T`: fails on a wrong value (with its path) or any unknown field.
fn typed<T: DeserializeOwned>(doc: &Value, what: &str) -> Result<T, String> {
    let mut unknown = Vec::new();
    let mut record = |p: serde_ignored::Path<'_>| unknown.push(p.to_string());
    let de = serde_ignored::Deserializer::new(doc.clone(), &mut record);
    let t: Result<T, _> = serde_path_to_error::deserialize(de);
    let t = t.map_err(|e| format!("{what}: {} at {}", e.inner(), e.path()))?;
    if !unknown.is_empty() {
        return Err(format!("{what}: unknown fields {unknown:?}"));
    }
    Ok(t)
}

/// Makes every object schema with `properties` reject other properties (kubeconform -strict).
fn strict(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if m.contains_key("properties") && !m.contains_key("additionalProperties") {
                m.insert("additionalProperties".into(), false.into());
            }
            m.values_mut().for_each(strict);
        }
        Value::Array(a) => a.iter_mut().for_each(strict),
        _ => {}
    }
}

/// Violations of `T`'s strict JSON Schema by `doc`.
fn schema_errors<T: schemars::JsonSchema>(doc: &Value, what: &str) -> Vec<String> {
    let schema = schemars::generate::SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<T>();
    let mut schema = serde_json::to_value(&schema).expect("schema as JSON");
    strict(&mut schema);
    let validator = jsonschema::validator_for(&schema).expect("a valid schema");
    validator.iter_errors(doc).map(|e| format!("{what}: {e} at {}", e.instance_path())).collect()
}

fn check_as<T: DeserializeOwned + schemars::JsonSchema>(doc: &Value, what: &str) -> Vec<String> {
    let mut errors = schema_errors::<T>(doc, what);
    if let Err(e) = typed::<T>(doc, what) {
        errors.push(e);
    }
    errors
}

/// Every problem of one object: typed parse and schema, by apiVersion and kind.
fn check(doc: &Value) -> Vec<String> {
    let what = format!(
        "{} {}/{}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["namespace"].as_str().unwrap_or(""),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    );
    match (doc["apiVersion"].as_str(), doc["kind"].as_str()) {
        (Some("v1"), Some("Namespace")) => check_as::<Namespace>(doc, &what),
        (Some("v1"), Some("ServiceAccount")) => check_as::<ServiceAccount>(doc, &what),
        (Some("v1"), Some("Service")) => check_as::<Service>(doc, &what),
        (Some("apps/v1"), Some("DaemonSet")) => check_as::<DaemonSet>(doc, &what),
        (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRole")) => {
            check_as::<ClusterRole>(doc, &what)
        }
        (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRoleBinding")) => {
            check_as::<ClusterRoleBinding>(doc, &what)
        }
        (v, k) => vec![format!("{what}: no check for apiVersion {v:?} kind {k:?}; add one")],
    }
}

fn rendered_all() -> Vec<(&'static str, Rendered)> {
    KUSTOMIZATIONS.iter().map(|k| (*k, render(&deploy_dir().join(k)))).collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects.iter().find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

#[test]
fn every_rendered_object_parses_strictly_and_passes_the_schema() {
    for (k, r) in rendered_all() {
        assert!(!r.objects.is_empty(), "{k}: renders nothing");
        let errors: Vec<String> = r.objects.iter().flat_map(check).collect();
        assert!(errors.is_empty(), "{k}:\n{}", errors.join("\n"));
        // Namespaced objects go to a Namespace the same kustomization creates.
        let namespaces: BTreeSet<&str> = r
            .objects
            .iter()
            .filter(|o| o["kind"] == "Namespace")
            .filter_map(|o| o["metadata"]["name"].as_str())
            .collect();
        for o in &r.objects {
            if let Some(ns) = o["metadata"]["namespace"].as_str() {
                assert!(
                    namespaces.contains(ns),
                    "{k}: {} {} in namespace {ns} that is not created",
                    o["kind"],
                    o["metadata"]["name"]
                );
            }
        }
    }
}

#[test]
fn every_yaml_file_in_deploy_is_part_of_a_kustomization() {
    let used: BTreeSet<PathBuf> = rendered_all().into_iter().flat_map(|(_, r)| r.files).collect();
    let mut stack = vec![deploy_dir()];
    let mut orphans = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml")
                && !used.contains(&p.canonicalize().unwrap())
            {
                orphans.push(p);
            }
        }
    }
    assert!(
        orphans.is_empty(),
        "manifests no kustomization renders (and so no test checks): {orphans:?}"
    );
}

#[test]
fn the_checks_catch_an_unknown_field_and_a_wrong_type() {
    let base = render(&deploy_dir().join("base"));
    let ds = find(&base.objects, "DaemonSet", "netpol-agent").expect("the DaemonSet");
    let mut typo = ds.clone();
    typo["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = serde_json::json!({});
    let errors = check(&typo);
    assert!(
        errors.iter().any(|e| e.contains("unknown fields") && e.contains("livenessprobe")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("livenessprobe") && !e.contains("unknown fields")),
        "the schema check: {errors:?}"
    );
    let mut wrong = ds.clone();
    wrong["spec"]["template"]["spec"]["hostNetwork"] = "yes".into();
    let errors = check(&wrong);
    assert!(errors.iter().any(|e| e.contains("spec.template.spec.hostNetwork")), "{errors:?}");
    assert!(errors.len() >= 2, "both checks report it: {errors:?}");
}

/// `$(VAR)` in container arguments, expanded as the kubelet does from the container's env
/// (a downward-API value becomes `<fieldPath>`).
fn expanded_args(c: &Container) -> Vec<String> {
    let mut env = BTreeMap::new();
    for e in c.env.iter().flatten() {
        let v = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => {
                format!("<{}>", from.field_ref.as_ref().expect("fieldRef").field_path)
            }
            _ => String::new(),
        };
        env.insert(format!("$({})", e.name), v);
    }
    c.args
        .iter()
        .flatten()
        .map(|a| env.iter().fold(a.clone(), |a, (k, v)| a.replace(k, v)))
        .inspect(|a| assert!(!a.contains("$("), "{}: undefined variable in {a}", c.name))
        .collect()
}

fn parse_cli(c: &Container) -> Cli {
    assert_eq!(
        c.command.as_deref(),
        Some(&["/usr/local/bin/netpol-agent".to_owned()][..]),
        "{}",
        c.name
    );
    let args = expanded_args(c);
    Cli::try_parse_from(std::iter::once("netpol-agent".to_owned()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("{}: {args:?} do not parse: {e}", c.name))
}

/// The host path behind the mount that holds `path` in container `c`.
fn host_path_of(ds: &DaemonSet, c: &Container, path: &Path) -> Option<String> {
    let spec = ds.spec.as_ref()?.template.spec.as_ref()?;
    let mount = c.volume_mounts.iter().flatten().find(|m| path.starts_with(&m.mount_path))?;
    let volume = spec.volumes.iter().flatten().find(|v| v.name == mount.name)?;
    Some(volume.host_path.as_ref()?.path.clone())
}

#[test]
fn daemonset_args_parse_with_the_agents_cli_and_match_ports_probes_and_mounts() {
    let mut agents = 0;
    let mut uninstalls = 0;
    for (k, r) in rendered_all() {
        if let Some(doc) = find(&r.objects, "DaemonSet", "netpol-agent") {
            agents += 1;
            let ds: DaemonSet = typed(doc, k).unwrap();
            let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
            assert_eq!(spec.host_network, Some(true), "{k}");
            let c = spec.containers.iter().find(|c| c.name == "agent").expect("container agent");
            let Command::Run(run) = parse_cli(c).command else { panic!("{k}: not `run`") };
            assert_eq!(run.node_name, "<spec.nodeName>", "{k}: NODE_NAME from the downward API");
            assert!(run.manifests.is_none() && run.kubeconfig.is_none(), "{k}: in-cluster API");
            assert!(!run.allow_foreign_programs, "{k}");
            let port = c.ports.iter().flatten().find(|p| p.name.as_deref() == Some("metrics"));
            assert_eq!(
                port.map(|p| p.container_port),
                Some(i32::from(run.metrics_addr.port())),
                "{k}"
            );
            for (probe, path) in [(&c.liveness_probe, "/healthz"), (&c.readiness_probe, "/readyz")]
            {
                let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("HTTP probe");
                assert_eq!(get.path.as_deref(), Some(path), "{k}");
                assert_eq!(get.port, IntOrString::String("metrics".into()), "{k}");
            }
            assert_eq!(
                host_path_of(&ds, c, &run.pin_dir).as_deref(),
                Some("/sys/fs/bpf"),
                "{k}: pins on the host's bpffs"
            );
            assert!(
                host_path_of(&ds, c, &run.status_file).is_some(),
                "{k}: status file on the host"
            );
            let init = spec
                .init_containers
                .iter()
                .flatten()
                .find(|c| c.name == "mount-bpffs")
                .expect("init container");
            let m = init
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.mount_path == "/sys/fs/bpf")
                .expect("bpffs mount");
            assert_eq!(m.mount_propagation.as_deref(), Some("Bidirectional"), "{k}");
            let ru = ds
                .spec
                .as_ref()
                .unwrap()
                .update_strategy
                .as_ref()
                .unwrap()
                .rolling_update
                .as_ref()
                .unwrap();
            assert_eq!(ru.max_unavailable, Some(IntOrString::Int(1)), "{k}");
        }
        if let Some(doc) = find(&r.objects, "DaemonSet", "netpol-uninstall") {
            uninstalls += 1;
            let ds: DaemonSet = typed(doc, k).unwrap();
            let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
            let c = spec
                .init_containers
                .iter()
                .flatten()
                .find(|c| c.name == "uninstall")
                .expect("init uninstall");
            let Command::Uninstall(u) = parse_cli(c).command else {
                panic!("{k}: not `uninstall`")
            };
            assert_eq!(
                u.pin_dir,
                Path::new(netpol_common::maps::PIN_ROOT),
                "{k}: every layout version"
            );
            assert_eq!(host_path_of(&ds, c, &u.pin_dir).as_deref(), Some("/sys/fs/bpf"), "{k}");
            assert!(host_path_of(&ds, c, &u.status_file).is_some(), "{k}");
        }
    }
    assert_eq!((agents, uninstalls), (3, 2), "agent DaemonSets in ., kind, aks; uninstall in two");
}

#[test]
fn a_flag_the_agent_does_not_have_fails_the_parse() {
    let r = Cli::try_parse_from(["netpol-agent", "run", "--node-name=n", "--metrics-port=9808"]);
    assert!(r.is_err(), "an unknown flag must not parse");
}

#[test]
fn the_cluster_role_only_reads_the_kinds_the_agent_watches() {
    let base = render(&deploy_dir().join("base"));
    let role: ClusterRole =
        typed(find(&base.objects, "ClusterRole", "netpol-agent").unwrap(), "role").unwrap();
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert_eq!(rule.verbs, ["get", "list", "watch"], "read only: {rule:?}");
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                granted.insert(format!("{g}/{r}"));
            }
        }
    }
    let want: BTreeSet<String> = [
        "/pods",
        "/namespaces",
        "networking.k8s.io/networkpolicies",
        "/services",
        "discovery.k8s.io/endpointslices",
        "policy.networking.k8s.io/clusternetworkpolicies",
        "policy.networking.k8s.io/adminnetworkpolicies",
        "policy.networking.k8s.io/baselineadminnetworkpolicies",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(granted, want);
}

/// Where `cargo xtask kustomize-golden` keeps what `kubectl kustomize` printed for kustomization
/// `k` (kubectl is not on a fresh Debian machine: Debian's kubernetes-client is too old).
fn golden(k: &str) -> PathBuf {
    let name = if k == "." { "deploy".to_owned() } else { k.replace('/', "_") };
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kustomize").join(format!("{name}.yaml"))
}

/// The renderer above must agree with kustomize itself (kubectl's built-in kustomize, as in
/// `kubectl apply -k`): otherwise the checks would look at something else than what is applied.
/// Kustomize's output is kept in tests/data/kustomize; a change under deploy/ without
/// regenerating it (`cargo xtask kustomize-golden`, needs kubectl) fails here.
#[test]
fn the_renderer_matches_kubectl_kustomize() {
    for (k, r) in rendered_all() {
        let dir = deploy_dir().join(k);
        let file = golden(k);
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
            panic!("{}: {e}; run `cargo xtask kustomize-golden` (needs kubectl)", file.display())
        });
        let key = |o: &Value| {
            format!(
                "{}/{}/{}/{}",
                o["apiVersion"], o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]
            )
        };
        let theirs: BTreeMap<String, Value> =
            yaml_docs(&text, &dir).into_iter().map(|o| (key(&o), o)).collect();
        let ours: BTreeMap<String, Value> = r.objects.into_iter().map(|o| (key(&o), o)).collect();
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{k} vs {}",
            file.display()
        );
        for (name, o) in &ours {
            assert_eq!(
                o,
                &theirs[name],
                "{k}: {name} differs from kubectl kustomize's output in {}; if deploy/ changed, \
                 run `cargo xtask kustomize-golden`",
                file.display()
            );
        }
    }
}
