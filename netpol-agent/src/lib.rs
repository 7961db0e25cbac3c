//! netpol's node agent as a library: the binary (`main.rs`) only wires these modules together.
//!
//! Data flow: API objects or manifest files → [`model::ClusterState`] → [`compile`] (pure) →
//! [`layout::KernelMaps`] (desired map contents) → [`dataplane`] (writes the diff to the kernel).

pub mod agent;
pub mod cli;
pub mod compile;
pub mod dataplane;
pub mod events;
pub mod explain;
pub mod foreign;
pub mod iface;
pub mod inspect;
pub mod layout;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod source;
pub mod status;
pub mod uninstall;
