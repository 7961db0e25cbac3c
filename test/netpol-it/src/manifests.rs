//! Writing Namespace, Pod and NetworkPolicy manifests for the agent's `--manifests` source, as
//! the API would show them (nodeName, podIP, container ports).
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::lab::Pod;

/// A manifest directory, removed on drop.
pub struct ManifestDir {
    pub path: PathBuf,
}

impl ManifestDir {
    /// Creates an empty directory named after `test`.
    pub fn new(test: &str) -> Result<ManifestDir> {
        let path =
            std::env::temp_dir().join(format!("netpol-manifests-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(ManifestDir { path })
    }

    /// Writes (or replaces) `name` atomically: written aside, then renamed.
    pub fn write(&self, name: &str, text: &str) -> Result<()> {
        let tmp = self.path.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.path.join(name)).with_context(|| format!("writing {name}"))
    }

    /// Removes `name`.
    pub fn remove(&self, name: &str) -> Result<()> {
        std::fs::remove_file(self.path.join(name)).with_context(|| format!("removing {name}"))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A Namespace manifest.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n{}",
        labels_yaml(labels, 4)
    )
}

fn labels_yaml(labels: &[(&str, &str)], indent: usize) -> String {
    let pad = " ".repeat(indent);
    if labels.is_empty() {
        return format!("{pad}{{}}\n");
    }
    labels.iter().map(|(k, v)| format!("{pad}{k}: \"{v}\"\n")).collect()
}

/// A Pod manifest for a lab pod running on `node`, with TCP container ports.
pub fn pod(
    p: &Pod,
    namespace: &str,
    node: &str,
    labels: &[(&str, &str)],
    ports: &[(&str, u16)],
) -> String {
    let ports: Vec<(&str, u16, &str)> = ports.iter().map(|&(n, p)| (n, p, "TCP")).collect();
    pod_with_protocols(p, namespace, node, labels, &ports)
}

/// A Pod manifest like [`pod`], with container ports as (name, port, protocol); an empty name
/// leaves the port unnamed.
pub fn pod_with_protocols(
    p: &Pod,
    namespace: &str,
    node: &str,
    labels: &[(&str, &str)],
    ports: &[(&str, u16, &str)],
) -> String {
    let mut ips = format!("  - ip: {}\n", p.ip);
    if let Some(v6) = p.ip6 {
        ips.push_str(&format!("  - ip: {v6}\n"));
    }
    let ports: String = ports
        .iter()
        .map(|(n, port, proto)| {
            let name = if n.is_empty() { String::new() } else { format!("name: {n}\n      ") };
            format!("    - {name}containerPort: {port}\n      protocol: {proto}\n")
        })
        .collect();
    let ports = if ports.is_empty() { String::new() } else { format!("    ports:\n{ports}") };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {namespace}\n  labels:\n{}spec:\n  nodeName: {node}\n  containers:\n  - name: main\n    image: lab\n{ports}status:\n  phase: Running\n  podIP: {}\n  podIPs:\n{ips}",
        p.name,
        labels_yaml(labels, 4),
        p.ip,
    )
}
