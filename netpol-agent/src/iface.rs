//! Finding a local pod's host-side interface from the host itself, over netlink.
//!
//! The route to the pod's IP names the interface: a veth for routed CNIs (Calico `cali*`, Azure
//! CNI transparent mode `azv*`, kindnet `veth*`: any name works), or a bridge (kubenet `cbr0`,
//! Azure CNI bridge mode). Behind a bridge, the pod's MAC comes from the neighbour table and its
//! bridge port from the bridge's forwarding database; when the neighbour is not known yet, the
//! pod is probed (the kernel resolves it with ARP or ND) and asked again later. A pod is never
//! identified by a source address seen in traffic, which anyone can spoof.
use std::net::{IpAddr, UdpSocket};

use futures::TryStreamExt as _;
use rtnetlink::{
    packet_route::{
        link::{InfoKind, LinkAttribute, LinkInfo},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        route::{RouteAttribute, RouteType},
        AddressFamily,
    },
    Handle, RouteMessageBuilder,
};

/// Errors of interface discovery.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    /// The netlink socket could not be opened.
    #[error("opening a netlink socket")]
    Connect(#[source] std::io::Error),
    /// A netlink request failed.
    #[error("netlink {what} for {ip}")]
    Netlink {
        /// What was asked.
        what: &'static str,
        /// The pod address.
        ip: IpAddr,
        /// Cause.
        #[source]
        source: rtnetlink::Error,
    },
}

/// Where a pod's traffic enters and leaves the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostIface {
    /// Interface index of the veth (or bridge port) the programs attach to.
    pub ifindex: u32,
    /// Its name.
    pub name: String,
    /// The bridge it is a port of, if any.
    pub bridge: Option<String>,
}

/// The answer for one pod address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Found.
    Found(HostIface),
    /// The address is routed elsewhere (another node, a gateway) or not at all: not a local pod
    /// interface of this host (yet).
    NotLocal,
    /// Behind a bridge, but its MAC or bridge port is not known yet; a probe was sent.
    Pending,
}

/// Resolves pod addresses to host interfaces.
pub struct Resolver {
    handle: Handle,
}

impl Resolver {
    /// Opens a netlink connection; must be called inside a tokio runtime.
    pub fn new() -> Result<Self, IfaceError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(IfaceError::Connect)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The netlink handle (for other queries on the same connection, e.g. tc filters).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Finds the host interface of the pod with address `ip`.
    pub async fn resolve(&self, ip: IpAddr) -> Result<Resolution, IfaceError> {
        let bits = if ip.is_ipv4() { 32 } else { 128 };
        let msg = match RouteMessageBuilder::<IpAddr>::new().destination_prefix(ip, bits) {
            Ok(b) => b.build(),
            Err(_) => return Ok(Resolution::NotLocal),
        };
        let route = match self.handle.route().get(msg).execute().try_next().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(Resolution::NotLocal),
            // ENETUNREACH and friends: nothing routes there.
            Err(rtnetlink::Error::NetlinkError(_)) => return Ok(Resolution::NotLocal),
            Err(source) => return Err(IfaceError::Netlink { what: "route get", ip, source }),
        };
        if route.header.kind != RouteType::Unicast {
            return Ok(Resolution::NotLocal);
        }
        let mut oif = None;
        for a in &route.attributes {
            match a {
                // Reached through a router: a pod of another node, or not a pod at all.
                RouteAttribute::Gateway(_) => return Ok(Resolution::NotLocal),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        let Some(oif) = oif else { return Ok(Resolution::NotLocal) };
        let Some((name, kind)) = self.link(oif, ip).await? else { return Ok(Resolution::NotLocal) };
        if kind != Some(InfoKind::Bridge) {
            // A routed CNI's veth. The host's own uplink would also be a direct route, but then
            // the address is on the node's subnet, not a pod's; such "pods" are host-network
            // ones, which the compiler never turns into endpoints.
            return Ok(Resolution::Found(HostIface { ifindex: oif, name, bridge: None }));
        }
        let Some(mac) = self.neighbour_mac(oif, ip).await? else {
            probe(ip);
            return Ok(Resolution::Pending);
        };
        match self.fdb_port(oif, &mac, ip).await? {
            Some(port) => {
                let Some((port_name, _)) = self.link(port, ip).await? else {
                    return Ok(Resolution::Pending);
                };
                Ok(Resolution::Found(HostIface {
                    ifindex: port,
                    name: port_name,
                    bridge: Some(name),
                }))
            }
            None => {
                probe(ip);
                Ok(Resolution::Pending)
            }
        }
    }

    async fn link(
        &self,
        index: u32,
        ip: IpAddr,
    ) -> Result<Option<(String, Option<InfoKind>)>, IfaceError> {
        let link = match self.handle.link().get().match_index(index).execute().try_next().await {
            Ok(Some(l)) => l,
            Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => return Ok(None),
            Err(source) => return Err(IfaceError::Netlink { what: "link get", ip, source }),
        };
        let mut name = None;
        let mut kind = None;
        for a in link.attributes {
            match a {
                LinkAttribute::IfName(n) => name = Some(n),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            kind = Some(k);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(name.map(|n| (n, kind)))
    }

    async fn neighbour_mac(&self, bridge: u32, ip: IpAddr) -> Result<Option<Vec<u8>>, IfaceError> {
        let family = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        let mut s = self.handle.neighbours().get().set_address_family(family).execute();
        while let Some(n) = s.try_next().await.map_err(|source| IfaceError::Netlink {
            what: "neighbour dump",
            ip,
            source,
        })? {
            if n.header.ifindex != bridge
                || matches!(n.header.state, NeighbourState::Failed | NeighbourState::Incomplete)
            {
                continue;
            }
            if neighbour_destination(&n) == Some(ip) {
                if let Some(mac) = lladdr(&n) {
                    return Ok(Some(mac));
                }
            }
        }
        Ok(None)
    }

    async fn fdb_port(
        &self,
        bridge: u32,
        mac: &[u8],
        ip: IpAddr,
    ) -> Result<Option<u32>, IfaceError> {
        let mut s =
            self.handle.neighbours().get().set_address_family(AddressFamily::Bridge).execute();
        while let Some(n) = s.try_next().await.map_err(|source| IfaceError::Netlink {
            what: "bridge fdb dump",
            ip,
            source,
        })? {
            let master = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Controller(m) => Some(*m),
                _ => None,
            });
            if master == Some(bridge)
                && n.header.ifindex != bridge
                && lladdr(&n).as_deref() == Some(mac)
            {
                return Ok(Some(n.header.ifindex));
            }
        }
        Ok(None)
    }

    /// Every address of the host's own interfaces (the node addresses kubelet probes come from).
    pub async fn host_addresses(&self) -> Result<Vec<IpAddr>, IfaceError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let mut out = Vec::new();
        let mut s = self.handle.address().get().execute();
        let any: IpAddr = [0u8; 4].into();
        while let Some(a) = s.try_next().await.map_err(|source| IfaceError::Netlink {
            what: "address dump",
            ip: any,
            source,
        })? {
            for attr in a.attributes {
                if let AddressAttribute::Address(ip) = attr {
                    out.push(ip);
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

fn neighbour_destination(n: &NeighbourMessage) -> Option<IpAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })
}

fn lladdr(n: &NeighbourMessage) -> Option<Vec<u8>> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(mac) if mac.len() == 6 => Some(mac.clone()),
        _ => None,
    })
}

/// Makes the kernel resolve the pod's link-layer address (ARP or ND): an empty datagram to the
/// discard port. Best effort; the next resolve attempt reads the neighbour table.
fn probe(ip: IpAddr) {
    let bind: IpAddr = if ip.is_ipv4() { [0u8; 4].into() } else { [0u16; 8].into() };
    if let Ok(s) = UdpSocket::bind((bind, 0)) {
        let _ = s.send_to(&[], (ip, 9));
    }
}

/// A change of the host's links, routes or neighbours: it may make a pending pod resolvable,
/// or a bound pod's interface disappear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostEvent {
    /// The interface with this index was deleted.
    LinkRemoved(u32),
    /// Some link, route or neighbour changed.
    Changed,
}

/// Subscribes to netlink link, route and neighbour notifications; must be called inside a tokio
/// runtime. Pods are attached as soon as their interface and route appear, instead of waiting
/// for the periodic retry.
pub fn watch() -> Result<tokio::sync::mpsc::UnboundedReceiver<HostEvent>, IfaceError> {
    use futures::StreamExt as _;
    use rtnetlink::{
        constants::{RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH},
        packet_core::NetlinkPayload,
        packet_route::RouteNetlinkMessage,
        sys::{AsyncSocket as _, SocketAddr},
    };
    let (mut conn, handle, mut messages) =
        rtnetlink::new_connection().map_err(IfaceError::Connect)?;
    let groups = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, groups))
        .map_err(IfaceError::Connect)?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        // Keeps the connection's request side open for as long as notifications are read.
        let _handle = handle;
        while let Some((msg, _)) = messages.next().await {
            let ev = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                    HostEvent::LinkRemoved(l.header.index)
                }
                _ => HostEvent::Changed,
            };
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}
