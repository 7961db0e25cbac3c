//! Services and EndpointSlices, as far as pod egress to a Service address is concerned.
//!
//! A pod's egress is checked at the host side of its interface, before kube-proxy's DNAT: a
//! packet to a ClusterIP still carries the Service address. The compiler decides such packets
//! from the backends the Service resolves to (see `compile::services`); this module holds the
//! trimmed objects and the one rule that picks those backends ([`Service::backends`]), which
//! mirrors kube-proxy's.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::{ObjectRef, Protocol};

/// Reference to a Service.
pub type ServiceRef = ObjectRef;

/// The label an EndpointSlice carries to name its Service (`kubernetes.io/service-name`).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One `spec.ports[]` entry of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePort {
    /// `name` (empty when the Service has a single unnamed port). EndpointSlice ports carry the
    /// same name; that is how a backend's target port is found.
    pub name: String,
    /// `protocol` (default TCP).
    pub protocol: Protocol,
    /// `port`: the port clients connect to on the Service addresses.
    pub port: u16,
    /// `nodePort` (NodePort and LoadBalancer Services).
    pub node_port: Option<u16>,
}

/// A Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.clusterIPs` (or `spec.clusterIP`); empty for headless (`None`) and ExternalName
    /// Services, which have no virtual address.
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.externalIPs`: kube-proxy DNATs them like the ClusterIP.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`, except those with `ipMode: Proxy` (kube-proxy leaves
    /// these to the load balancer instead of short-circuiting them to the backends).
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.ports`.
    pub ports: Vec<ServicePort>,
}

impl Service {
    /// The Service's reference.
    pub fn key(&self) -> ServiceRef {
        ObjectRef::new(&self.namespace, &self.name)
    }

    /// Every virtual address of the Service: cluster IPs, external IPs, load-balancer IPs.
    pub fn virtual_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.cluster_ips.iter().chain(&self.external_ips).chain(&self.load_balancer_ips).copied()
    }

    /// The backends kube-proxy sends `port` traffic of address family `v6` to: every address of
    /// an endpoint of the Service's slices of that family whose slice lists a port with the
    /// Service port's name and protocol, at that slice port's number (the resolved
    /// `targetPort`, which may differ per backend for a named `targetPort`; at each of them if
    /// the slice lists the name more than once).
    ///
    /// kube-proxy uses the ready endpoints (`ready` unset counts as ready); only when there is
    /// none does it fall back to the endpoints that are serving and terminating. The same rule
    /// applies here, so the set is exactly what kube-proxy may pick from (topology hints and
    /// traffic policies can only narrow it, and a narrower set never allows more).
    pub fn backends<'a>(
        &self,
        slices: impl Iterator<Item = &'a EndpointSlice>,
        port: &ServicePort,
        v6: bool,
    ) -> BTreeSet<(IpAddr, u16)> {
        let mut ready = BTreeSet::new();
        let mut fallback = BTreeSet::new();
        for slice in slices {
            if slice.service.as_deref() != Some(self.name.as_str())
                || slice.namespace != self.namespace
                || slice.address_type != AddressType::from_v6(v6)
            {
                continue;
            }
            // Every slice port of that name and protocol, not the first. The API wants a slice's
            // port names unique, but a manifest directory is not validated, and with two the
            // one kube-proxy uses depends on its map order: both are candidates, so a
            // connection is allowed only if the policy allows each.
            let ports = || {
                slice.ports.iter().filter(|p| p.name == port.name && p.protocol == port.protocol)
            };
            for ep in &slice.endpoints {
                let target = if ep.ready {
                    &mut ready
                } else if ep.serving && ep.terminating {
                    &mut fallback
                } else {
                    continue;
                };
                for sp in ports() {
                    target.extend(ep.addresses.iter().map(|a| (*a, sp.port)));
                }
            }
        }
        if ready.is_empty() {
            fallback
        } else {
            ready
        }
    }
}

/// `addressType` of an EndpointSlice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddressType {
    /// `IPv4`.
    Ipv4,
    /// `IPv6`.
    Ipv6,
    /// `FQDN` (deprecated; kube-proxy ignores such slices, and so does netpol).
    Fqdn,
}

impl AddressType {
    fn from_v6(v6: bool) -> Self {
        if v6 {
            AddressType::Ipv6
        } else {
            AddressType::Ipv4
        }
    }
}

/// One `ports[]` entry of an EndpointSlice (entries without a port number are left out, as
/// kube-proxy does).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointPort {
    /// `name`: the Service port's name (empty for an unnamed port).
    pub name: String,
    /// `protocol` (default TCP).
    pub protocol: Protocol,
    /// `port`: the backend port (the Service port's resolved `targetPort`).
    pub port: u16,
}

/// One `endpoints[]` entry of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SliceEndpoint {
    /// `addresses` (of the slice's family).
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready` (unset: `true`, as the API says).
    pub ready: bool,
    /// `conditions.serving` (unset: `true`).
    pub serving: bool,
    /// `conditions.terminating` (unset: `false`).
    pub terminating: bool,
}

/// An EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The Service it belongs to: label [`SERVICE_NAME_LABEL`] (`None`: no Service, unused).
    pub service: Option<String>,
    /// `addressType`.
    pub address_type: AddressType,
    /// `ports`.
    pub ports: Vec<EndpointPort>,
    /// `endpoints`.
    pub endpoints: Vec<SliceEndpoint>,
}

impl EndpointSlice {
    /// The slice's reference.
    pub fn key(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str, ready: bool, serving: bool, terminating: bool) -> SliceEndpoint {
        SliceEndpoint { addresses: vec![addr.parse().unwrap()], ready, serving, terminating }
    }

    fn slice(name: &str, v6: bool, port: u16, endpoints: Vec<SliceEndpoint>) -> EndpointSlice {
        EndpointSlice {
            namespace: "ns".into(),
            name: name.into(),
            service: Some("svc".into()),
            address_type: AddressType::from_v6(v6),
            ports: vec![EndpointPort { name: "http".into(), protocol: Protocol::Tcp, port }],
            endpoints,
        }
    }

    fn svc() -> (Service, ServicePort) {
        let port =
            ServicePort { name: "http".into(), protocol: Protocol::Tcp, port: 80, node_port: None };
        let s = Service {
            namespace: "ns".into(),
            name: "svc".into(),
            cluster_ips: vec!["10.96.0.1".parse().unwrap()],
            external_ips: vec![],
            load_balancer_ips: vec![],
            ports: vec![port.clone()],
        };
        (s, port)
    }

    fn addrs(b: &BTreeSet<(IpAddr, u16)>) -> Vec<String> {
        b.iter().map(|(a, p)| format!("{a}:{p}")).collect()
    }

    #[test]
    fn backends_follow_kube_proxy() {
        let (s, p) = svc();
        let slices = [
            slice("a", false, 8080, vec![ep("10.0.0.1", true, true, false)]),
            // Named targetPort resolved to another number on these pods.
            slice("b", false, 9090, vec![ep("10.0.0.2", true, true, false)]),
            slice(
                "c",
                false,
                8080,
                vec![ep("10.0.0.3", false, false, false), ep("10.0.0.4", false, true, true)],
            ),
            slice("d", true, 8080, vec![ep("fd00::1", true, true, false)]),
        ];
        let mut other = slice("e", false, 8080, vec![ep("10.0.0.9", true, true, false)]);
        other.service = Some("other".into());
        let mut unnamed = slice("f", false, 7070, vec![ep("10.0.0.8", true, true, false)]);
        unnamed.ports[0].name = String::new();
        let all: Vec<&EndpointSlice> = slices.iter().chain([&other, &unnamed]).collect();
        assert_eq!(
            addrs(&s.backends(all.iter().copied(), &p, false)),
            ["10.0.0.1:8080", "10.0.0.2:9090"],
            "ready only, per-slice target ports, other Services and port names ignored"
        );
        assert_eq!(addrs(&s.backends(all.iter().copied(), &p, true)), ["fd00::1:8080"]);
        // No ready endpoint left: kube-proxy falls back to serving terminating ones.
        let draining = [slices[2].clone()];
        assert_eq!(addrs(&s.backends(draining.iter(), &p, false)), ["10.0.0.4:8080"]);
        assert!(s.backends([].iter(), &p, false).is_empty());
    }

    #[test]
    fn a_port_name_listed_twice_in_a_slice_makes_both_ports_backends() {
        let (s, p) = svc();
        let mut twice = slice("a", false, 8080, vec![ep("10.0.0.1", true, true, false)]);
        let mut second = twice.ports[0].clone();
        second.port = 1000;
        twice.ports.push(second);
        assert_eq!(
            addrs(&s.backends([&twice].into_iter(), &p, false)),
            ["10.0.0.1:1000", "10.0.0.1:8080"]
        );
    }
}
