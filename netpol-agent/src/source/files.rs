//! The manifest-directory source: the embedded mode used by the lab, the demo and the tests.
//!
//! Reads every `*.yaml`, `*.yml` and `*.json` file of a directory (multi-document YAML and
//! `kind: List` included) with [`crate::manifest::load_dir`], and sends the whole state again
//! whenever files change. File events are debounced, and the directory is also rescanned
//! periodically in case an event was missed. A bad object is reported with file, object and
//! field and left out; everything else stays enforced.
use std::{path::PathBuf, time::Duration};

use notify::{
    event::{AccessKind, AccessMode},
    EventKind, RecursiveMode, Watcher as _,
};
use tokio::sync::mpsc;

use super::SourceEvent;
use crate::{manifest, model::ClusterState};

/// Errors of the manifest-directory source.
#[derive(Debug, thiserror::Error)]
pub enum FilesSourceError {
    /// The directory cannot be watched.
    #[error("watching manifest directory {dir}")]
    Watch {
        /// The directory.
        dir: PathBuf,
        /// Cause.
        #[source]
        source: notify::Error,
    },
}

/// Settings of the manifest-directory source.
#[derive(Clone, Debug)]
pub struct FilesSourceOptions {
    /// The directory.
    pub dir: PathBuf,
    /// How long to wait for a burst of file events to end before reloading.
    pub debounce: Duration,
    /// Rescan period, a safety net for missed events.
    pub rescan: Duration,
}

impl FilesSourceOptions {
    /// Defaults for `dir`: 20 ms debounce, 10 s rescan. The events of one write (create, modify,
    /// close, rename) arrive within microseconds of each other, so 20 ms still coalesces them,
    /// while the debounce was most of the change-to-enforcement latency at 50 ms (`cargo xtask
    /// bench apply`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            debounce: Duration::from_millis(20),
            rescan: Duration::from_secs(10),
        }
    }
}

fn load(dir: &std::path::Path) -> (ClusterState, Vec<String>) {
    let (state, errors) = manifest::load_dir(dir);
    (state, errors.iter().map(ToString::to_string).collect())
}

/// Whether a file event may change what the directory holds. inotify also reports opens and
/// read-only closes, and `load` itself opens every file: waking on those would reload the
/// directory forever, one debounce apart, and make the latency of a real change depend on
/// where in that cycle it falls.
fn changes_files(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Watches the directory and sends a snapshot at start and after every change, until the
/// receiver is dropped.
pub async fn run(
    opts: FilesSourceOptions,
    tx: mpsc::Sender<SourceEvent>,
) -> Result<(), FilesSourceError> {
    let (wake_tx, mut wake_rx) = mpsc::channel::<()>(16);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Called on notify's own thread: a full channel already holds a pending wake-up.
        if res.is_ok_and(|e| changes_files(&e.kind)) {
            let _ = wake_tx.try_send(());
        }
    })
    .map_err(|source| FilesSourceError::Watch { dir: opts.dir.clone(), source })?;
    watcher
        .watch(&opts.dir, RecursiveMode::NonRecursive)
        .map_err(|source| FilesSourceError::Watch { dir: opts.dir.clone(), source })?;

    let mut last: Option<(ClusterState, Vec<String>)> = None;
    let mut since = std::time::Instant::now();
    loop {
        let current = load(&opts.dir);
        if last.as_ref() != Some(&current) {
            for e in &current.1 {
                tracing::warn!(error = %e, "manifest ignored");
            }
            let event = SourceEvent::Snapshot {
                state: current.0.clone(),
                errors: current.1.clone(),
                since,
            };
            if tx.send(event).await.is_err() {
                return Ok(());
            }
            last = Some(current);
        }
        tokio::select! {
            woke = wake_rx.recv() => {
                if woke.is_none() {
                    return Ok(());
                }
                since = std::time::Instant::now();
                // Let the burst of events of one write (create, modify, rename) settle.
                tokio::time::sleep(opts.debounce).await;
                while wake_rx.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(opts.rescan) => since = std::time::Instant::now(),
            _ = tx.closed() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, name: &str, text: &str) {
        // Write then rename, as editors and the lab do, so no half-written file is read.
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }

    async fn next(rx: &mut mpsc::Receiver<SourceEvent>) -> (ClusterState, Vec<String>) {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(SourceEvent::Snapshot { state, errors, .. })) => (state, errors),
            other => panic!("expected a snapshot, got {other:?}"),
        }
    }

    const NS: &str =
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: prod\n  labels: {env: prod}\n";
    const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny\n  namespace: prod\nspec:\n  podSelector: {}\n";
    const BAD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: bad\n  namespace: prod\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/33}\n";

    #[test]
    fn reading_a_file_is_no_change() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, ModifyKind, RemoveKind, RenameMode,
        };
        // What `load` itself causes: opens and read-only closes.
        assert!(!changes_files(&EventKind::Access(AccessKind::Open(AccessMode::Any))));
        assert!(!changes_files(&EventKind::Access(AccessKind::Close(AccessMode::Read))));
        assert!(!changes_files(&EventKind::Access(AccessKind::Read)));
        // What a write, a rename or a removal causes.
        assert!(changes_files(&EventKind::Access(AccessKind::Close(AccessMode::Write))));
        assert!(changes_files(&EventKind::Create(CreateKind::File)));
        assert!(changes_files(&EventKind::Modify(ModifyKind::Name(RenameMode::To))));
        assert!(changes_files(&EventKind::Remove(RemoveKind::File)));
    }

    #[tokio::test]
    async fn snapshots_follow_file_changes_and_report_bad_objects() {
        let dir = std::env::temp_dir().join(format!("netpol-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        write(&dir, "ns.yaml", NS);
        let (tx, mut rx) = mpsc::channel(8);
        let task = tokio::spawn(run(FilesSourceOptions::new(&dir), tx));

        let (state, errors) = next(&mut rx).await;
        assert_eq!((state.namespaces.len(), state.policies.len(), errors.len()), (1, 0, 0));

        write(&dir, "policy.yaml", POLICY);
        let (state, _) = next(&mut rx).await;
        assert_eq!(state.policies.len(), 1);

        // A bad object is reported and left out; the good policy stays.
        write(&dir, "bad.yaml", BAD);
        let (state, errors) = next(&mut rx).await;
        assert_eq!(state.policies.len(), 1);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("bad.yaml") && errors[0].contains("cidr"), "{errors:?}");

        std::fs::remove_file(dir.join("policy.yaml")).unwrap();
        let (state, _) = next(&mut rx).await;
        assert_eq!(state.policies.len(), 0);

        drop(rx);
        let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
