//! Loading the model from manifest files: YAML (multi-document) and JSON, including `kind: List`,
//! decoded into k8s-openapi types and converted to [`crate::model`] with the API's validation.
//!
//! Errors are per object: an invalid object is reported (naming the file, the object and the
//! field) and skipped; every other object still loads. Nothing here panics on any input.

mod cluster;
pub(crate) mod convert;

pub(crate) use cluster::cluster_policy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::{ClusterState, ModelError};

/// Largest manifest file read. etcd refuses objects over 1.5 MiB, so this leaves room for files
/// of many objects while bounding what one file can make the agent hold in memory.
pub const MAX_FILE_BYTES: u64 = 8 << 20;

/// Errors of loading manifests.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A file or directory could not be read.
    #[error("{}: {source}", file.display())]
    Read {
        /// The path.
        file: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file is larger than [`MAX_FILE_BYTES`]; it is not read.
    #[error("{}: larger than the limit of {limit} bytes for a manifest file; not loaded", file.display())]
    TooLarge {
        /// The file.
        file: PathBuf,
        /// [`MAX_FILE_BYTES`].
        limit: u64,
    },
    /// A YAML document does not parse.
    #[error("{}: document {document}: {source}", file.display())]
    Yaml {
        /// The file.
        file: PathBuf,
        /// Index of the document in the file (from 0).
        document: usize,
        /// The parser's error.
        #[source]
        source: serde_yaml::Error,
    },
    /// A JSON value does not parse.
    #[error("{}: document {document}: {source}", file.display())]
    Json {
        /// The file.
        file: PathBuf,
        /// Index of the value in the file (from 0).
        document: usize,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A document is not an object with a `kind`.
    #[error("{}: document {document}: not a Kubernetes object (no kind)", file.display())]
    NoKind {
        /// The file.
        file: PathBuf,
        /// Index of the document in the file (from 0).
        document: usize,
    },
    /// An object does not match its kind's schema.
    #[error("{}: {kind} {object}: {source}", file.display())]
    Decode {
        /// The file.
        file: PathBuf,
        /// `kind`.
        kind: String,
        /// `namespace/name` (as far as readable).
        object: String,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// A field fails the API's validation.
    #[error("{}: {kind} {object}: {field}: {source}", file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// `kind`.
        kind: String,
        /// `namespace/name`.
        object: String,
        /// Field path, e.g. `spec.ingress[0].from[1].ipBlock.cidr`.
        field: String,
        /// What is wrong.
        #[source]
        source: ModelError,
    },
    /// The same object was defined twice; the first definition is kept.
    #[error("{}: {kind} {object}: duplicate, already defined in {}", file.display(), first.display())]
    Duplicate {
        /// The file of the second definition.
        file: PathBuf,
        /// `kind`.
        kind: String,
        /// `namespace/name`.
        object: String,
        /// The file of the first definition.
        first: PathBuf,
    },
}

/// Loads every `*.yaml`, `*.yml` and `*.json` file of `dir` (not recursive, in name order).
pub fn load_dir(dir: &Path) -> (ClusterState, Vec<ManifestError>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(source) => {
            return (
                ClusterState::default(),
                vec![ManifestError::Read { file: dir.into(), source }],
            )
        }
    };
    let mut errors = Vec::new();
    let mut files = Vec::new();
    for entry in entries {
        match entry {
            Ok(e) => {
                let path = e.path();
                let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
                if path.is_file() && matches!(ext.as_deref(), Some("yaml" | "yml" | "json")) {
                    files.push(path);
                }
            }
            Err(source) => errors.push(ManifestError::Read { file: dir.into(), source }),
        }
    }
    files.sort();
    let (state, more) = load_files(&files);
    errors.extend(more);
    (state, errors)
}

/// Loads the given files in order.
pub fn load_files(files: &[PathBuf]) -> (ClusterState, Vec<ManifestError>) {
    let mut loader = Loader::default();
    for file in files {
        match read_bounded(file) {
            Ok(Some(text)) => loader.add_text(file, &text),
            Ok(None) => loader
                .errors
                .push(ManifestError::TooLarge { file: file.clone(), limit: MAX_FILE_BYTES }),
            Err(source) => loader.errors.push(ManifestError::Read { file: file.clone(), source }),
        }
    }
    loader.finish()
}

/// The file's text, or `None` if it is larger than [`MAX_FILE_BYTES`]. Reads at most one byte
/// past the limit, so a file growing while it is read cannot make the agent read more.
fn read_bounded(file: &Path) -> std::io::Result<Option<String>> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(file)?.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)?;
    Ok((text.len() as u64 <= MAX_FILE_BYTES).then_some(text))
}

/// Loads manifests from a string; `file` names it in errors, and a `.json` extension selects
/// JSON (anything else is read as YAML, which also accepts JSON documents).
pub fn load_str(file: &str, text: &str) -> (ClusterState, Vec<ManifestError>) {
    let mut loader = Loader::default();
    loader.add_text(Path::new(file), text);
    loader.finish()
}

/// Accumulates objects of several files, detecting duplicates.
#[derive(Default)]
struct Loader {
    state: ClusterState,
    origin: BTreeMap<(String, String), PathBuf>,
    errors: Vec<ManifestError>,
}

impl Loader {
    fn add_text(&mut self, file: &Path, text: &str) {
        let is_json = file.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let mut docs = Vec::new();
        if is_json {
            let stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
            for (document, v) in stream.enumerate() {
                match v {
                    Ok(v) => docs.push((document, v)),
                    Err(source) => {
                        self.errors.push(ManifestError::Json {
                            file: file.into(),
                            document,
                            source,
                        });
                        break;
                    }
                }
            }
        } else {
            for (document, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
                match serde_json::Value::deserialize(de) {
                    Ok(v) => docs.push((document, v)),
                    Err(source) => {
                        self.errors.push(ManifestError::Yaml {
                            file: file.into(),
                            document,
                            source,
                        });
                        break;
                    }
                }
            }
        }
        for (document, value) in docs {
            self.add_value(file, document, value, 0);
        }
    }

    fn add_value(&mut self, file: &Path, document: usize, value: serde_json::Value, depth: usize) {
        if value.is_null() {
            return; // empty document (`---` at the end of a file)
        }
        let Some(kind) = value.get("kind").and_then(|k| k.as_str()).map(str::to_string) else {
            self.errors.push(ManifestError::NoKind { file: file.into(), document });
            return;
        };
        // `kind: List` (and typed lists such as `PodList` from `kubectl get -o yaml`).
        if kind.ends_with("List") && depth < 8 {
            if let Some(serde_json::Value::Array(items)) = value.get("items") {
                for item in items.clone() {
                    self.add_value(file, document, item, depth + 1);
                }
            }
            return;
        }
        let object = convert::object_name(&kind, &value);
        let converted = match kind.as_str() {
            "Pod" => convert::pod(value).map(convert::Object::Pod),
            "Namespace" => convert::namespace(value).map(convert::Object::Namespace),
            "NetworkPolicy" => convert::policy(value).map(convert::Object::Policy),
            "Service" => convert::service(value).map(convert::Object::Service),
            "EndpointSlice" => convert::endpoint_slice(value).map(convert::Object::EndpointSlice),
            k => match crate::model::ClusterKind::parse(k) {
                Some(ck) => cluster::cluster_policy(ck, value).map(convert::Object::Cluster),
                // Other kinds (Deployments, Endpoints, ...) are not policy inputs.
                None => return,
            },
        };
        let obj = match converted {
            Ok(o) => o,
            Err(convert::Failure::Decode(source)) => {
                self.errors.push(ManifestError::Decode { file: file.into(), kind, object, source });
                return;
            }
            Err(convert::Failure::Invalid { field, source }) => {
                self.errors.push(ManifestError::Invalid {
                    file: file.into(),
                    kind,
                    object,
                    field,
                    source,
                });
                return;
            }
        };
        let id = (kind.clone(), object.clone());
        if let Some(first) = self.origin.get(&id) {
            self.errors.push(ManifestError::Duplicate {
                file: file.into(),
                kind,
                object,
                first: first.clone(),
            });
            return;
        }
        self.origin.insert(id, file.into());
        match obj {
            convert::Object::Pod(p) => {
                self.state.pods.insert(p.key(), p);
            }
            convert::Object::Namespace(n) => {
                self.state.namespaces.insert(n.name.clone(), n);
            }
            convert::Object::Policy(p) => {
                self.state.policies.insert(p.key(), p);
            }
            convert::Object::Service(s) => {
                self.state.services.insert(s.key(), s);
            }
            convert::Object::EndpointSlice(s) => {
                self.state.endpoint_slices.insert(s.key(), s);
            }
            convert::Object::Cluster(p) => {
                self.state.cluster_policies.insert(p.key(), p);
            }
        }
    }

    fn finish(self) -> (ClusterState, Vec<ManifestError>) {
        (self.state, self.errors)
    }
}

#[cfg(test)]
mod tests;
