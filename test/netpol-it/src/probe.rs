//! Real traffic between pods: TCP servers and connection attempts with a short timeout.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::netns::in_netns;

/// A TCP echo server running in a pod until dropped.
pub struct TcpServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpServer {
    /// Listens on `port` on every address of the pod's namespace.
    pub fn start(netns: &str, port: u16) -> Result<TcpServer> {
        let listener = in_netns(netns, || TcpListener::bind(("0.0.0.0", port)))?
            .with_context(|| format!("listening on port {port} in {netns}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 64];
                        if let Ok(n) = s.read(&mut buf) {
                            let _ = s.write_all(&buf[..n]);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(TcpServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens a TCP connection from a pod to `to`, sends a line and expects it echoed back.
/// `Ok(false)` if the connection was not established within `timeout` (dropped or refused).
pub fn tcp_echo(netns: &str, to: SocketAddr, timeout: Duration) -> Result<bool> {
    in_netns(netns, || {
        let Ok(mut s) = TcpStream::connect_timeout(&to, timeout) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(timeout));
        if s.write_all(b"netpol\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"netpol\n"
    })
}
