//! Cleanup that also runs on SIGINT/SIGTERM: a benchmark interrupted with Ctrl-C must not leave
//! iptables chains, ipsets or lab namespaces behind. Guards register what their `Drop` would do;
//! the signal thread runs every registered action, newest first, then exits.
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex,
};

type Action = Box<dyn Fn() + Send>;

static ACTIONS: Mutex<Vec<(u64, Action)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Registered until dropped (drop it after the normal cleanup ran).
pub struct Registration(u64);

/// Registers `action` to run if the process is interrupted.
pub fn on_signal(action: impl Fn() + Send + 'static) -> Registration {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    ACTIONS.lock().unwrap_or_else(|e| e.into_inner()).push((id, Box::new(action)));
    Registration(id)
}

impl Drop for Registration {
    fn drop(&mut self) {
        ACTIONS.lock().unwrap_or_else(|e| e.into_inner()).retain(|(id, _)| *id != self.0);
    }
}

/// Starts the thread that waits for SIGINT or SIGTERM.
pub fn install() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        eprintln!("interrupted: cleaning up");
        let actions = std::mem::take(&mut *ACTIONS.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, a) in actions.iter().rev() {
            a();
        }
        std::process::exit(130);
    });
    Ok(())
}
