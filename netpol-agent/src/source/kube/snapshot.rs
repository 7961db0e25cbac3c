//! Reflector stores → [`ClusterState`] plus per-object errors, through the manifest converter
//! (the API objects are serialized with serde_json and converted like manifest documents).
//!
//! Pure apart from a cache: an object whose `resourceVersion` did not change since the last
//! snapshot is not converted again (the agent sees every pod of the cluster, and a snapshot is
//! built on every change).

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as net;
use kube::ResourceExt;
use serde::Serialize;

use crate::manifest::convert::{self, Failure};
use crate::model::{
    ClusterKind, ClusterPolicy, ClusterState, EndpointSlice, Namespace, NetworkPolicy, Pod, Service,
};

/// Pod phases whose containers have all terminated: such pods are not endpoints.
const TERMINAL_PHASES: [&str; 2] = ["Succeeded", "Failed"];

/// What became of one object.
#[derive(Clone, Debug)]
enum Outcome<T> {
    /// Converted.
    Ok(T),
    /// Deliberately left out (terminated pods).
    Skipped,
    /// Not usable; the message names kind, object and field.
    Invalid(String),
}

/// Converted objects of one kind by `namespace/name`, with the `resourceVersion` converted.
struct Cache<T> {
    entries: HashMap<(String, String), (String, Outcome<T>)>,
}

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Cache { entries: HashMap::new() }
    }
}

impl<T: Clone> Cache<T> {
    /// Converts `objects` (reusing entries whose resourceVersion is unchanged), drops entries
    /// of objects that are gone, and returns the outcomes.
    fn update<K>(
        &mut self,
        kind: &str,
        objects: &[Arc<K>],
        skip: impl Fn(&K) -> bool,
        convert: impl Fn(serde_json::Value) -> Result<T, Failure>,
    ) -> Vec<Outcome<T>>
    where
        K: kube::Resource + Serialize,
    {
        let mut next = HashMap::with_capacity(objects.len());
        let mut out = Vec::with_capacity(objects.len());
        for obj in objects {
            let key = (obj.namespace().unwrap_or_default(), obj.name_any());
            let version = obj.resource_version().unwrap_or_default();
            let cached = match self.entries.remove(&key) {
                // Without a resourceVersion there is nothing to compare: convert again.
                Some((v, outcome)) if !version.is_empty() && v == version => Some(outcome),
                _ => None,
            };
            let outcome = cached.unwrap_or_else(|| {
                if skip(obj) {
                    Outcome::Skipped
                } else {
                    convert_one(kind, obj.as_ref(), &convert)
                }
            });
            out.push(outcome.clone());
            next.insert(key, (version, outcome));
        }
        self.entries = next;
        out
    }
}

fn convert_one<K: Serialize, T>(
    kind: &str,
    obj: &K,
    convert: impl Fn(serde_json::Value) -> Result<T, Failure>,
) -> Outcome<T> {
    let value = match serde_json::to_value(obj) {
        Ok(v) => v,
        // Not expected for k8s-openapi types, but never a reason to panic.
        Err(e) => return Outcome::Invalid(format!("{kind}: cannot serialize: {e}")),
    };
    let object = convert::object_name(kind, &value);
    match convert(value) {
        Ok(t) => Outcome::Ok(t),
        Err(Failure::Decode(e)) => Outcome::Invalid(format!("{kind} {object}: {e}")),
        Err(Failure::Invalid { field, source }) => {
            Outcome::Invalid(format!("{kind} {object}: {field}: {source}"))
        }
    }
}

/// Whether a pod's phase says all its containers terminated.
pub fn terminated(p: &core::Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|ph| TERMINAL_PHASES.contains(&ph))
}

/// Builds snapshots from store contents, caching conversions between calls.
#[derive(Default)]
pub struct Converter {
    pods: Cache<Pod>,
    namespaces: Cache<Namespace>,
    policies: Cache<NetworkPolicy>,
    services: Cache<Service>,
    slices: Cache<EndpointSlice>,
    cluster: [Cache<ClusterPolicy>; 3],
}

/// Cluster policies by kind, in [`ClusterKind::ALL`] order.
pub type ClusterObjects<'a> = [&'a [Arc<kube::api::DynamicObject>]; 3];

impl Converter {
    /// The cluster state of the given objects and, sorted, the errors of those that could not
    /// be converted (which are left out). Pods in phase Succeeded or Failed are left out too.
    pub fn build(
        &mut self,
        pods: &[Arc<core::Pod>],
        namespaces: &[Arc<core::Namespace>],
        policies: &[Arc<net::NetworkPolicy>],
        services: &[Arc<core::Service>],
        slices: &[Arc<discovery::EndpointSlice>],
    ) -> (ClusterState, Vec<String>) {
        self.build_all(pods, namespaces, policies, services, slices, [&[], &[], &[]])
    }

    /// [`Converter::build`] with the cluster policies of the three network-policy-api kinds.
    pub fn build_all(
        &mut self,
        pods: &[Arc<core::Pod>],
        namespaces: &[Arc<core::Namespace>],
        policies: &[Arc<net::NetworkPolicy>],
        services: &[Arc<core::Service>],
        slices: &[Arc<discovery::EndpointSlice>],
        cluster: ClusterObjects,
    ) -> (ClusterState, Vec<String>) {
        let mut state = ClusterState::default();
        let mut errors = Vec::new();
        let outcomes = self.pods.update("Pod", pods, terminated, convert::pod);
        gather(outcomes, &mut errors, |p| {
            state.pods.insert(p.key(), p);
        });
        let outcomes =
            self.namespaces.update("Namespace", namespaces, |_| false, convert::namespace);
        gather(outcomes, &mut errors, |n| {
            state.namespaces.insert(n.name.clone(), n);
        });
        let outcomes = self.policies.update("NetworkPolicy", policies, |_| false, convert::policy);
        gather(outcomes, &mut errors, |p| {
            state.policies.insert(p.key(), p);
        });
        let outcomes = self.services.update("Service", services, |_| false, convert::service);
        gather(outcomes, &mut errors, |s| {
            state.services.insert(s.key(), s);
        });
        let outcomes =
            self.slices.update("EndpointSlice", slices, |_| false, convert::endpoint_slice);
        gather(outcomes, &mut errors, |s| {
            state.endpoint_slices.insert(s.key(), s);
        });
        for ((kind, cache), objects) in
            ClusterKind::ALL.into_iter().zip(&mut self.cluster).zip(cluster)
        {
            let outcomes = cache.update(
                kind.as_str(),
                objects,
                |_| false,
                |v| crate::manifest::cluster_policy(kind, v),
            );
            gather(outcomes, &mut errors, |p| {
                state.cluster_policies.insert(p.key(), p);
            });
        }
        errors.sort();
        (state, errors)
    }
}

fn gather<T>(outcomes: Vec<Outcome<T>>, errors: &mut Vec<String>, mut insert: impl FnMut(T)) {
    for o in outcomes {
        match o {
            Outcome::Ok(t) => insert(t),
            Outcome::Skipped => {}
            Outcome::Invalid(e) => errors.push(e),
        }
    }
}

/// [`Converter::build`] without a cache.
pub fn snapshot(
    pods: &[Arc<core::Pod>],
    namespaces: &[Arc<core::Namespace>],
    policies: &[Arc<net::NetworkPolicy>],
    services: &[Arc<core::Service>],
    slices: &[Arc<discovery::EndpointSlice>],
) -> (ClusterState, Vec<String>) {
    Converter::default().build(pods, namespaces, policies, services, slices)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn obj<K: serde::de::DeserializeOwned>(v: Value) -> Arc<K> {
        Arc::new(serde_json::from_value(v).expect("valid object"))
    }

    fn pod(name: &str, rv: &str, ip: &str, phase: &str) -> Arc<core::Pod> {
        obj(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": "ns", "resourceVersion": rv, "labels": { "app": name } },
            "spec": { "containers": [{ "name": "c" }] },
            "status": { "phase": phase, "podIP": ip },
        }))
    }

    fn policy(name: &str, rv: &str, cidr: &str) -> Arc<net::NetworkPolicy> {
        obj(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": { "name": name, "namespace": "ns", "resourceVersion": rv },
            "spec": { "podSelector": {}, "egress": [{ "to": [{ "ipBlock": { "cidr": cidr } }] }] },
        }))
    }

    fn names<V>(m: &std::collections::BTreeMap<crate::model::ObjectRef, V>) -> Vec<String> {
        m.keys().map(|k| k.to_string()).collect()
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            pods: Vec<Arc<core::Pod>>,
            policies: Vec<Arc<net::NetworkPolicy>>,
            want_pods: Vec<&'static str>,
            want_policies: Vec<&'static str>,
            want_errors: Vec<&'static str>,
        }
        let cases = [
            Case {
                name: "empty",
                pods: vec![],
                policies: vec![],
                want_pods: vec![],
                want_policies: vec![],
                want_errors: vec![],
            },
            Case {
                name: "terminated pods are left out, pending and running kept",
                pods: vec![
                    pod("run", "1", "10.0.0.1", "Running"),
                    pod("pend", "1", "", "Pending"),
                    pod("ok", "1", "10.0.0.2", "Succeeded"),
                    pod("bad", "1", "10.0.0.3", "Failed"),
                ],
                policies: vec![],
                want_pods: vec!["ns/pend", "ns/run"],
                want_policies: vec![],
                want_errors: vec![],
            },
            Case {
                name: "invalid objects are reported, sorted, and left out",
                pods: vec![pod("x", "1", "10.0.0.999", "Running"), pod("y", "1", "10.0.0.1", "Running")],
                policies: vec![policy("z", "1", "10.0.0.0/8"), policy("b", "1", "300.0.0.0/8")],
                want_pods: vec!["ns/y"],
                want_policies: vec!["ns/z"],
                want_errors: vec![
                    "NetworkPolicy ns/b: spec.egress[0].to[0].ipBlock.cidr: invalid CIDR \"300.0.0.0/8\"",
                    "Pod ns/x: status.podIP: invalid IP address \"10.0.0.999\"",
                ],
            },
        ];
        for c in cases {
            let (state, errors) = snapshot(&c.pods, &[], &c.policies, &[], &[]);
            assert_eq!(names(&state.pods), c.want_pods, "{}", c.name);
            assert_eq!(names(&state.policies), c.want_policies, "{}", c.name);
            assert_eq!(errors, c.want_errors, "{}", c.name);
        }
    }

    #[test]
    fn namespaces_get_the_name_label() {
        let ns: Arc<core::Namespace> =
            obj(json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "prod" } }));
        let (state, errors) = snapshot(&[], &[ns], &[], &[], &[]);
        assert!(errors.is_empty());
        assert_eq!(state.namespaces["prod"].labels[crate::model::NAMESPACE_NAME_LABEL], "prod");
    }

    #[test]
    fn cache_follows_resource_versions_and_deletions() {
        let mut c = Converter::default();
        let (s, _) = c.build(&[pod("a", "1", "10.0.0.1", "Running")], &[], &[], &[], &[]);
        assert_eq!(s.pods.values().next().map(|p| p.ips[0].to_string()), Some("10.0.0.1".into()));
        // Same version: the cached conversion is reused (the changed address is not seen, which
        // proves the cache is used; the API never changes an object without a new version).
        let (s, _) = c.build(&[pod("a", "1", "10.0.0.9", "Running")], &[], &[], &[], &[]);
        assert_eq!(s.pods.values().next().map(|p| p.ips[0].to_string()), Some("10.0.0.1".into()));
        // New version: converted again, including into a terminal phase.
        let (s, _) = c.build(&[pod("a", "2", "10.0.0.2", "Running")], &[], &[], &[], &[]);
        assert_eq!(s.pods.values().next().map(|p| p.ips[0].to_string()), Some("10.0.0.2".into()));
        let (s, _) = c.build(&[pod("a", "3", "10.0.0.2", "Failed")], &[], &[], &[], &[]);
        assert!(s.pods.is_empty());
        // Deleted objects leave the cache.
        c.build(&[], &[], &[], &[], &[]);
        assert!(c.pods.entries.is_empty());
        // Without a resourceVersion nothing is cached across calls.
        let (s, _) = c.build(&[pod("b", "", "10.0.0.1", "Running")], &[], &[], &[], &[]);
        assert_eq!(s.pods.len(), 1);
        let (s, _) = c.build(&[pod("b", "", "10.0.0.5", "Running")], &[], &[], &[], &[]);
        assert_eq!(s.pods.values().next().map(|p| p.ips[0].to_string()), Some("10.0.0.5".into()));
    }

    #[test]
    fn errors_are_cached_too() {
        let mut c = Converter::default();
        let bad = [policy("b", "1", "nope")];
        let (_, e1) = c.build(&[], &[], &bad, &[], &[]);
        let (_, e2) = c.build(&[], &[], &bad, &[], &[]);
        assert_eq!(e1.len(), 1);
        assert_eq!(e1, e2);
    }
}
