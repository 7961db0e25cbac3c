//! The agent's status file: what it enforces, published after every applied snapshot for the
//! CLI (`inspect`, `conntrack`, `explain --live`), which cannot see the agent's memory.
//!
//! Written atomically (temporary file in the same directory, then rename), so a reader sees the
//! previous or the new file, never a partial one.
use std::{
    collections::BTreeMap,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::compile::RuleOrigin;
use crate::model::{Direction, PodRef, Tier};

/// Default location of the status file.
pub const DEFAULT_PATH: &str = "/run/netpol/status.json";

/// Errors of reading and writing the status file.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The file does not exist (no agent ran, or it uses another `--status-file`).
    #[error(
        "no status file at {path}; is the agent running (or does it use another --status-file)?"
    )]
    Missing {
        /// The path.
        path: PathBuf,
    },
    /// Reading or writing failed.
    #[error("{op} {path}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a status file of this version.
    #[error("parsing {path}")]
    Parse {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// The three set ids of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierSets {
    /// Admin tier (0: none).
    pub admin: u32,
    /// NetworkPolicy tier (0: not isolated).
    pub network_policy: u32,
    /// Baseline tier (0: none).
    pub baseline: u32,
}

impl TierSets {
    /// The sets of `dir` in an endpoint value.
    pub fn of(ep: &netpol_common::ep::Endpoint, dir: u8) -> TierSets {
        let [admin, network_policy, baseline] = ep.sets(dir);
        TierSets { admin, network_policy, baseline }
    }
}

/// A policy that selects an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedPolicy {
    /// `NAMESPACE/NAME`.
    pub policy: String,
    /// `ingress`, `egress` or both.
    pub directions: Vec<String>,
}

/// One enforced endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Host-side interface index.
    pub ifindex: u32,
    /// Host-side interface name.
    pub interface: String,
    /// Pod addresses.
    pub ips: Vec<IpAddr>,
    /// Generation written to `np_ep`.
    pub generation: u32,
    /// Audit mode (drops only reported).
    pub audit: bool,
    /// Set ids for traffic entering the pod.
    pub ingress: TierSets,
    /// Set ids for traffic leaving the pod.
    pub egress: TierSets,
    /// NetworkPolicies selecting the pod.
    pub policies: Vec<AppliedPolicy>,
}

impl EndpointStatus {
    /// `NAMESPACE/NAME`.
    pub fn pod(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Where a rule id comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RuleStatus {
    /// A rule of a policy.
    Policy {
        /// `Admin`, `NetworkPolicy` or `Baseline`.
        tier: String,
        /// Policy namespace.
        namespace: String,
        /// Policy name.
        name: String,
        /// `ingress` or `egress`.
        direction: String,
        /// Index in the policy's rules of that direction.
        index: u32,
    },
    /// Traffic from the node's own addresses to its pods.
    NodeToPod,
    /// Egress to a Service port, decided from its backends.
    Service {
        /// Service namespace.
        namespace: String,
        /// Service name.
        name: String,
        /// `TCP`, `UDP` or `SCTP`.
        protocol: String,
        /// The Service port.
        port: u16,
    },
}

impl From<&RuleOrigin> for RuleStatus {
    fn from(o: &RuleOrigin) -> Self {
        match o {
            RuleOrigin::Policy { tier, policy, direction, index } => RuleStatus::Policy {
                tier: format!("{tier:?}"),
                namespace: policy.namespace.clone(),
                name: policy.name.clone(),
                direction: direction.name().to_owned(),
                index: *index,
            },
            RuleOrigin::NodeToPod => RuleStatus::NodeToPod,
            RuleOrigin::Service { service, protocol, port } => RuleStatus::Service {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
                protocol: protocol.to_string(),
                port: *port,
            },
        }
    }
}

impl RuleStatus {
    /// Back to the compiler's type (`None` for a tier or direction this build does not know).
    pub fn origin(&self) -> Option<RuleOrigin> {
        match self {
            RuleStatus::NodeToPod => Some(RuleOrigin::NodeToPod),
            RuleStatus::Service { namespace, name, protocol, port } => Some(RuleOrigin::Service {
                service: PodRef::new(namespace, name),
                protocol: crate::model::Protocol::parse(protocol).ok()?,
                port: *port,
            }),
            RuleStatus::Policy { tier, namespace, name, direction, index } => {
                let tier = match tier.as_str() {
                    "Admin" => Tier::Admin,
                    "NetworkPolicy" => Tier::NetworkPolicy,
                    "Baseline" => Tier::Baseline,
                    _ => return None,
                };
                let direction = match direction.as_str() {
                    "ingress" => Direction::Ingress,
                    "egress" => Direction::Egress,
                    _ => return None,
                };
                Some(RuleOrigin::Policy {
                    tier,
                    policy: PodRef::new(namespace, name),
                    direction,
                    index: *index,
                })
            }
        }
    }

    /// A short description: `prod/allow-web ingress rule 0` or `node to pod`.
    pub fn describe(&self) -> String {
        match self {
            RuleStatus::Policy { namespace, name, direction, index, .. } => {
                format!("{namespace}/{name} {direction} rule {index}")
            }
            RuleStatus::NodeToPod => "node to pod".into(),
            RuleStatus::Service { namespace, name, protocol, port } => {
                format!("Service {namespace}/{name} port {port}/{protocol} (its backends)")
            }
        }
    }
}

/// The whole status file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The node's name.
    pub node: String,
    /// Seconds since the Unix epoch when written.
    pub written_at: u64,
    /// Layout version of the pinned maps (`v1`).
    pub layout: String,
    /// Where the maps are pinned.
    pub pin_dir: PathBuf,
    /// Enforced endpoints.
    pub endpoints: Vec<EndpointStatus>,
    /// Local pods whose interface was not found yet (`NAMESPACE/NAME`).
    pub pending: Vec<String>,
    /// Rule id → origin.
    pub rules: BTreeMap<u32, RuleStatus>,
    /// Peer entries as compiled (`np_peer_exact` and `np_peer` together).
    pub peer_entries: usize,
    /// Port entries as compiled (`np_port_exact` and `np_ports` together).
    pub port_entries: usize,
}

impl Status {
    /// The endpoint of a pod.
    pub fn endpoint(&self, namespace: &str, name: &str) -> Option<&EndpointStatus> {
        self.endpoints.iter().find(|e| e.namespace == namespace && e.name == name)
    }

    /// The endpoint with this address.
    pub fn endpoint_by_ip(&self, ip: IpAddr) -> Option<&EndpointStatus> {
        self.endpoints.iter().find(|e| e.ips.contains(&ip))
    }

    /// The endpoint on this interface.
    pub fn endpoint_by_ifindex(&self, ifindex: u32) -> Option<&EndpointStatus> {
        self.endpoints.iter().find(|e| e.ifindex == ifindex)
    }

    /// Reads a status file.
    pub fn read(path: &Path) -> Result<Status, StatusError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StatusError::Missing { path: path.to_owned() })
            }
            Err(source) => {
                return Err(StatusError::Io { op: "reading", path: path.to_owned(), source })
            }
        };
        serde_json::from_str(&text)
            .map_err(|source| StatusError::Parse { path: path.to_owned(), source })
    }

    /// Writes the file atomically: a temporary file beside it, flushed, then renamed over it.
    pub fn write(&self, path: &Path) -> Result<(), StatusError> {
        let io = |op, source| StatusError::Io { op, path: path.to_owned(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let json = serde_json::to_vec_pretty(self)
            .map_err(|source| StatusError::Parse { path: path.to_owned(), source })?;
        let mut f =
            std::fs::File::create(&tmp).map_err(|e| io("creating a temporary file for", e))?;
        f.write_all(&json).and_then(|()| f.sync_all()).map_err(|e| io("writing", e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io("renaming into", e)
        })
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Status {
        Status {
            node: "n1".into(),
            written_at: 1_700_000_000,
            layout: "v1".into(),
            pin_dir: PathBuf::from("/sys/fs/bpf/netpol/v1"),
            endpoints: vec![EndpointStatus {
                namespace: "prod".into(),
                name: "db".into(),
                ifindex: 7,
                interface: "veth7".into(),
                ips: vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
                generation: 3,
                audit: false,
                ingress: TierSets { admin: 0, network_policy: 5, baseline: 0 },
                egress: TierSets::default(),
                policies: vec![AppliedPolicy {
                    policy: "prod/db-in".into(),
                    directions: vec!["ingress".into()],
                }],
            }],
            pending: vec!["prod/late".into()],
            rules: BTreeMap::from([
                (1, RuleStatus::NodeToPod),
                (
                    0xdead_beef,
                    RuleStatus::Policy {
                        tier: "NetworkPolicy".into(),
                        namespace: "prod".into(),
                        name: "db-in".into(),
                        direction: "ingress".into(),
                        index: 0,
                    },
                ),
            ]),
            peer_entries: 4,
            port_entries: 2,
        }
    }

    #[test]
    fn round_trips_through_the_file() {
        let dir = std::env::temp_dir().join(format!("netpol-status-{}", std::process::id()));
        let path = dir.join("sub/status.json");
        let s = sample();
        s.write(&path).unwrap();
        assert_eq!(Status::read(&path).unwrap(), s);
        // Overwrite leaves no temporary file behind.
        s.write(&path).unwrap();
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(Status::read(&path), Err(StatusError::Missing { .. })));
    }

    #[test]
    fn rule_origins_convert_both_ways() {
        let o = RuleOrigin::Policy {
            tier: Tier::NetworkPolicy,
            policy: PodRef::new("prod", "db-in"),
            direction: Direction::Egress,
            index: 2,
        };
        let s = RuleStatus::from(&o);
        assert_eq!(s.origin(), Some(o));
        assert_eq!(s.describe(), "prod/db-in egress rule 2");
        assert_eq!(RuleStatus::NodeToPod.origin(), Some(RuleOrigin::NodeToPod));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["kind"], "policy");
        let o = RuleOrigin::Service {
            service: PodRef::new("prod", "redis"),
            protocol: crate::model::Protocol::Tcp,
            port: 6379,
        };
        let s = RuleStatus::from(&o);
        assert_eq!(s.origin(), Some(o));
        assert_eq!(s.describe(), "Service prod/redis port 6379/TCP (its backends)");
    }

    #[test]
    fn lookups() {
        let s = sample();
        assert_eq!(s.endpoint("prod", "db").map(|e| e.ifindex), Some(7));
        assert_eq!(
            s.endpoint_by_ip("fd00::2".parse().unwrap()).map(|e| e.pod()),
            Some("prod/db".into())
        );
        assert!(s.endpoint_by_ifindex(8).is_none());
    }
}
