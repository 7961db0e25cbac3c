//! What the reflectors keep of each object. The agent watches every pod of the cluster, so the
//! stores hold only the fields [`crate::manifest::convert`] reads (plus `resourceVersion`, which
//! keys the conversion cache) and annotations starting with [`KEPT_ANNOTATION_PREFIX`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Annotations with this prefix survive trimming (reserved for netpol's own flags).
pub const KEPT_ANNOTATION_PREFIX: &str = "netpol.";

/// Keeps name, namespace, labels, resourceVersion and `netpol.*` annotations; drops
/// `managedFields`, owner references, finalizers, timestamps and every other annotation
/// (notably `kubectl.kubernetes.io/last-applied-configuration`).
pub fn meta(m: &mut ObjectMeta) {
    let annotations = m.annotations.take().map(|a| {
        a.into_iter()
            .filter(|(k, _)| k.starts_with(KEPT_ANNOTATION_PREFIX))
            .collect::<BTreeMap<_, _>>()
    });
    *m = ObjectMeta {
        name: m.name.take(),
        namespace: m.namespace.take(),
        labels: m.labels.take(),
        resource_version: m.resource_version.take(),
        annotations: annotations.filter(|a| !a.is_empty()),
        ..ObjectMeta::default()
    };
}

fn container(c: &mut core::Container) -> core::Container {
    core::Container {
        name: std::mem::take(&mut c.name),
        ports: c.ports.take().map(|ports| {
            ports
                .into_iter()
                .map(|p| core::ContainerPort {
                    name: p.name,
                    container_port: p.container_port,
                    protocol: p.protocol,
                    ..core::ContainerPort::default()
                })
                .collect()
        }),
        ..core::Container::default()
    }
}

/// Keeps metadata (see [`meta`]), `spec.nodeName`, `spec.hostNetwork`, the ports (name,
/// containerPort, protocol) of containers and init containers (restartable init containers,
/// i.e. sidecars, serve named ports too), `status.phase`, `status.podIP` and `status.podIPs`.
pub fn pod(p: &mut core::Pod) {
    meta(&mut p.metadata);
    p.spec = p.spec.take().map(|mut s| core::PodSpec {
        node_name: s.node_name.take(),
        host_network: s.host_network,
        containers: s.containers.iter_mut().map(container).collect(),
        // All of them, so error messages keep the API's indexes.
        init_containers: s
            .init_containers
            .take()
            .map(|mut cs| cs.iter_mut().map(container).collect()),
        ..core::PodSpec::default()
    });
    p.status = p.status.take().map(|s| core::PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips.map(|ips| ips.into_iter().map(|ip| core::PodIP { ip: ip.ip }).collect()),
        ..core::PodStatus::default()
    });
}

/// Keeps metadata only (see [`meta`]); a namespace's spec and status are not policy inputs.
pub fn namespace(n: &mut core::Namespace) {
    meta(&mut n.metadata);
    n.spec = None;
    n.status = None;
}

/// Trims metadata (see [`meta`]); the spec is kept whole.
pub fn policy(p: &mut net::NetworkPolicy) {
    meta(&mut p.metadata);
}

/// Keeps metadata (see [`meta`]), the addresses (`clusterIP`, `clusterIPs`, `externalIPs`,
/// load-balancer ingress `ip` and `ipMode`) and the ports (name, protocol, port, nodePort).
pub fn service(s: &mut core::Service) {
    meta(&mut s.metadata);
    s.spec = s.spec.take().map(|sp| core::ServiceSpec {
        cluster_ip: sp.cluster_ip,
        cluster_ips: sp.cluster_ips,
        external_ips: sp.external_ips,
        ports: sp.ports.map(|ports| {
            ports
                .into_iter()
                .map(|p| core::ServicePort {
                    name: p.name,
                    protocol: p.protocol,
                    port: p.port,
                    node_port: p.node_port,
                    ..core::ServicePort::default()
                })
                .collect()
        }),
        ..core::ServiceSpec::default()
    });
    s.status = s.status.take().map(|st| core::ServiceStatus {
        load_balancer: st.load_balancer.map(|lb| core::LoadBalancerStatus {
            ingress: lb.ingress.map(|ing| {
                ing.into_iter()
                    .map(|i| core::LoadBalancerIngress {
                        ip: i.ip,
                        ip_mode: i.ip_mode,
                        ..core::LoadBalancerIngress::default()
                    })
                    .collect()
            }),
        }),
        ..core::ServiceStatus::default()
    });
}

/// Keeps metadata (see [`meta`]; the labels name the Service), `addressType`, the ports and,
/// of each endpoint, its addresses and conditions (not its topology, hints or target).
pub fn endpoint_slice(s: &mut discovery::EndpointSlice) {
    meta(&mut s.metadata);
    s.endpoints = s.endpoints.take().map(|eps| {
        eps.into_iter()
            .map(|e| discovery::Endpoint {
                addresses: e.addresses,
                conditions: e.conditions,
                ..discovery::Endpoint::default()
            })
            .collect()
    });
    s.ports = s.ports.take().map(|ports| {
        ports.into_iter().map(|p| discovery::EndpointPort { app_protocol: None, ..p }).collect()
    });
}

/// Trims metadata of a cluster policy (ClusterNetworkPolicy and the v1alpha1 kinds); the spec
/// is kept, the status dropped.
pub fn cluster_policy(p: &mut kube::api::DynamicObject) {
    meta(&mut p.metadata);
    if let Some(o) = p.data.as_object_mut() {
        o.remove("status");
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn full_pod() -> core::Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "a", "namespace": "prod", "uid": "u-1", "resourceVersion": "7",
                "generateName": "a-", "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": { "app": "web" },
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{...}",
                    "netpol.io/audit": "true",
                },
                "managedFields": [{ "manager": "kubectl", "operation": "Apply" }],
                "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u-2" }],
                "finalizers": ["x"],
            },
            "spec": {
                "nodeName": "node-a", "hostNetwork": true, "serviceAccountName": "sa",
                "containers": [{
                    "name": "c", "image": "nginx", "command": ["nginx"],
                    "env": [{ "name": "SECRET", "value": "s" }],
                    "ports": [{ "name": "http", "containerPort": 80, "protocol": "TCP", "hostPort": 8080, "hostIP": "1.2.3.4" }],
                }],
                "initContainers": [
                    { "name": "init", "image": "busybox" },
                    { "name": "sidecar", "image": "envoy", "restartPolicy": "Always", "ports": [{ "containerPort": 9901 }] },
                ],
                "volumes": [{ "name": "v", "emptyDir": {} }],
            },
            "status": {
                "phase": "Running", "podIP": "10.0.0.1",
                "podIPs": [{ "ip": "10.0.0.1" }, { "ip": "fd00::1" }],
                "hostIP": "192.168.0.1",
                "conditions": [{ "type": "Ready", "status": "True" }],
                "containerStatuses": [{ "name": "c", "image": "nginx", "imageID": "x", "ready": true, "restartCount": 0 }],
            },
        }))
        .expect("valid pod")
    }

    #[test]
    fn pod_keeps_exactly_what_policy_reads() {
        let mut p = full_pod();
        pod(&mut p);
        let got = serde_json::to_value(&p).expect("json");
        let want = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "a", "namespace": "prod", "resourceVersion": "7",
                "labels": { "app": "web" },
                "annotations": { "netpol.io/audit": "true" },
            },
            "spec": {
                "nodeName": "node-a", "hostNetwork": true,
                "containers": [{ "name": "c", "ports": [{ "name": "http", "containerPort": 80, "protocol": "TCP" }] }],
                "initContainers": [{ "name": "init" }, { "name": "sidecar", "ports": [{ "containerPort": 9901 }] }],
            },
            "status": {
                "phase": "Running", "podIP": "10.0.0.1",
                "podIPs": [{ "ip": "10.0.0.1" }, { "ip": "fd00::1" }],
            },
        });
        assert_eq!(got, want);
    }

    #[test]
    fn trimming_does_not_change_the_model() {
        let full = full_pod();
        let mut trimmed = full.clone();
        pod(&mut trimmed);
        let conv = |p: &core::Pod| {
            crate::manifest::convert::pod(serde_json::to_value(p).expect("json"))
                .ok()
                .expect("valid")
        };
        assert_eq!(conv(&trimmed), conv(&full));
    }

    #[test]
    fn metadata_without_annotations_stays_without() {
        let mut n: core::Namespace = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": "prod", "labels": { "a": "b" }, "annotations": { "x": "y" },
                          "managedFields": [{ "manager": "m" }] },
            "spec": { "finalizers": ["kubernetes"] },
            "status": { "phase": "Active" },
        }))
        .expect("valid namespace");
        namespace(&mut n);
        let got = serde_json::to_value(&n).expect("json");
        assert_eq!(
            got,
            json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "prod", "labels": { "a": "b" } } })
        );
    }

    #[test]
    fn services_and_slices_keep_what_the_service_pass_reads() {
        let svc = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": "web", "namespace": "prod", "managedFields": [{ "manager": "m" }] },
            "spec": {
                "type": "LoadBalancer", "selector": { "app": "web" }, "sessionAffinity": "None",
                "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"], "externalIPs": ["192.0.2.1"],
                "ports": [{ "name": "http", "port": 80, "targetPort": "http", "nodePort": 30080, "protocol": "TCP", "appProtocol": "h2" }],
            },
            "status": { "loadBalancer": { "ingress": [{ "ip": "198.51.100.1", "ipMode": "VIP", "hostname": "x" }] } },
        });
        let mut s: core::Service = serde_json::from_value(svc.clone()).expect("valid service");
        service(&mut s);
        let got = serde_json::to_value(&s).expect("json");
        assert_eq!(got["metadata"], json!({ "name": "web", "namespace": "prod" }));
        assert_eq!(
            got["spec"],
            json!({ "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"], "externalIPs": ["192.0.2.1"],
                    "ports": [{ "name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP" }] })
        );
        let conv = |v: serde_json::Value| crate::manifest::convert::service(v).ok().expect("valid");
        assert_eq!(conv(got), conv(svc));

        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": { "name": "web-a", "namespace": "prod", "labels": { "kubernetes.io/service-name": "web" } },
            "addressType": "IPv4",
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "h2" }],
            "endpoints": [{ "addresses": ["10.0.0.1"], "conditions": { "ready": false, "serving": true, "terminating": true },
                            "nodeName": "n", "zone": "z", "targetRef": { "kind": "Pod", "name": "web-1" }, "hints": { "forZones": [{ "name": "z" }] } }],
        });
        let mut e: discovery::EndpointSlice =
            serde_json::from_value(slice.clone()).expect("valid slice");
        endpoint_slice(&mut e);
        let got = serde_json::to_value(&e).expect("json");
        assert_eq!(
            got["endpoints"],
            json!([{ "addresses": ["10.0.0.1"], "conditions": { "ready": false, "serving": true, "terminating": true } }])
        );
        assert_eq!(got["ports"], json!([{ "name": "http", "port": 8080, "protocol": "TCP" }]));
        let conv =
            |v: serde_json::Value| crate::manifest::convert::endpoint_slice(v).ok().expect("valid");
        assert_eq!(conv(got), conv(slice));
    }

    #[test]
    fn policy_keeps_its_spec() {
        let spec = json!({ "podSelector": {}, "policyTypes": ["Egress"], "egress": [{ "to": [{ "ipBlock": { "cidr": "10.0.0.0/8" } }] }] });
        let mut p: net::NetworkPolicy = serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": { "name": "p", "namespace": "prod", "managedFields": [{ "manager": "m" }],
                          "annotations": { "netpol.example/x": "1", "y": "2" } },
            "spec": spec,
        }))
        .expect("valid policy");
        policy(&mut p);
        let got = serde_json::to_value(&p).expect("json");
        assert_eq!(got["spec"], spec);
        assert_eq!(
            got["metadata"],
            json!({ "name": "p", "namespace": "prod", "annotations": { "netpol.example/x": "1" } })
        );
    }
}
