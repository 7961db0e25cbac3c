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
    /// Listens on `port` on every IPv4 address of the pod's namespace.
    pub fn start(netns: &str, port: u16) -> Result<TcpServer> {
        TcpServer::start_on(netns, "0.0.0.0", port)
    }

    /// Listens on `addr`:`port` in the pod's namespace (`::` for both families).
    pub fn start_on(netns: &str, addr: &str, port: u16) -> Result<TcpServer> {
        let listener = in_netns(netns, || TcpListener::bind((addr, port)))?
            .with_context(|| format!("listening on port {port} in {netns}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    // One thread per connection: a connection held open (the restart tests keep
                    // one) must not stall the others.
                    Ok((mut s, _)) => {
                        std::thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                            let mut buf = [0u8; 64];
                            while let Ok(n) = s.read(&mut buf) {
                                if n == 0 || s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(TcpServer { stop, thread: Some(thread) })
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

/// A UDP echo server running in a pod until dropped.
pub struct UdpServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpServer {
    /// Echoes datagrams on `port` (all addresses, both families where the pod has them).
    pub fn start(netns: &str, port: u16) -> Result<UdpServer> {
        let sock = in_netns(netns, || std::net::UdpSocket::bind(("::", port)))?
            .with_context(|| format!("binding UDP {port} in {netns}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Ok(UdpServer { stop, thread: Some(thread) })
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends a datagram from a pod to `to` and expects it echoed back within `timeout`.
pub fn udp_echo(netns: &str, to: SocketAddr, timeout: Duration) -> Result<bool> {
    udp_echo_from(netns, 0, to, timeout)
}

/// [`udp_echo`] from a fixed source port (0: any), so that repeated probes are one flow.
pub fn udp_echo_from(netns: &str, sport: u16, to: SocketAddr, timeout: Duration) -> Result<bool> {
    in_netns(netns, || {
        let ip: std::net::IpAddr = if to.is_ipv4() { [0u8; 4].into() } else { [0u16; 8].into() };
        let Ok(s) = std::net::UdpSocket::bind((ip, sport)) else { return false };
        let _ = s.set_read_timeout(Some(timeout));
        if s.send_to(b"netpol", to).is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(s.recv_from(&mut buf), Ok((6, from)) if from == to && &buf[..6] == b"netpol")
    })
}

/// Opens a raw socket for IP protocol `proto` inside a pod (IPv4).
pub fn raw_socket(netns: &str, proto: i32) -> Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    in_netns(netns, || Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(proto))))?
        .with_context(|| format!("raw socket for protocol {proto} in {netns}"))
}

/// Receives on a raw IPv4 socket until a packet satisfying `want` (given the IP payload) arrives
/// or `timeout` passes.
pub fn raw_receive(
    sock: &socket2::Socket,
    timeout: Duration,
    want: impl Fn(&[u8]) -> bool,
) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        if sock.set_read_timeout(Some(left.max(Duration::from_millis(1)))).is_err() {
            return false;
        }
        let Ok(n) = sock.recv(&mut buf) else { return false };
        // SAFETY: recv initialised the first n bytes.
        let pkt: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
        let ihl = ((pkt.first().copied().unwrap_or(0) & 0x0f) as usize) * 4;
        if pkt.len() > ihl && want(&pkt[ihl..]) {
            return true;
        }
    }
    false
}

/// Sends an SCTP INIT from a pod to `to` (raw socket: the kernel has no SCTP) and reports
/// whether a raw SCTP socket in the destination pod received it.
pub fn sctp_init(from_ns: &str, to_ns: &str, to: SocketAddr, timeout: Duration) -> Result<bool> {
    let rx = raw_socket(to_ns, 132)?;
    let tx = raw_socket(from_ns, 132)?;
    let sport = 40000 + (std::process::id() % 20000) as u16;
    let init = crate::packet::L4::Sctp { sport, dport: to.port(), chunk: 1 }.bytes();
    tx.send_to(&init, &to.into()).context("sending SCTP INIT")?;
    Ok(raw_receive(&rx, timeout, |p| {
        p.len() >= 13
            && p[0..2] == sport.to_be_bytes()
            && p[2..4] == to.port().to_be_bytes()
            && p[12] == 1
    }))
}

/// Pings `to` from a pod (raw ICMP echo) and reports whether the echo reply came back.
pub fn ping(netns: &str, to: std::net::Ipv4Addr, timeout: Duration) -> Result<bool> {
    let sock = raw_socket(netns, libc::IPPROTO_ICMP)?;
    let id = (std::process::id() & 0xffff) as u16;
    let mut req = vec![8u8, 0, 0, 0];
    req.extend_from_slice(&id.to_be_bytes());
    req.extend_from_slice(&1u16.to_be_bytes());
    req.extend_from_slice(b"netpol-ping");
    let sum = icmp_checksum(&req);
    req[2..4].copy_from_slice(&sum.to_be_bytes());
    sock.send_to(&req, &SocketAddr::from((to, 0)).into()).context("sending ICMP echo")?;
    Ok(raw_receive(&sock, timeout, |p| p.len() >= 8 && p[0] == 0 && p[4..6] == id.to_be_bytes()))
}

fn icmp_checksum(b: &[u8]) -> u16 {
    let mut sum: u32 =
        b.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends a raw Ethernet frame out of the pod's `eth0` (AF_PACKET): how the tests inject
/// malformed packets and fragments that no socket API would produce.
pub fn inject(netns: &str, frame: &[u8]) -> Result<()> {
    use socket2::{Domain, Socket, Type};
    in_netns(netns, || -> Result<()> {
        let s = Socket::new(Domain::PACKET, Type::RAW, None).context("AF_PACKET socket")?;
        // SAFETY: plain libc call with a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        anyhow::ensure!(ifindex != 0, "no eth0 in {netns}");
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid starting value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: addr is a valid sockaddr_ll of the length passed.
        let sa = unsafe {
            socket2::SockAddr::try_init(|storage, len| {
                std::ptr::copy_nonoverlapping(
                    (&addr as *const libc::sockaddr_ll).cast::<u8>(),
                    storage.cast::<u8>(),
                    std::mem::size_of::<libc::sockaddr_ll>(),
                );
                *len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                Ok(())
            })
        }
        .map(|((), sa)| sa)
        .context("building sockaddr_ll")?;
        s.send_to(frame, &sa).context("sending raw frame")?;
        Ok(())
    })?
}

/// Polls for up to 5 s until a TCP echo from `from` to `to` succeeds (`want` true) or fails
/// (`want` false): policy changes take effect asynchronously. Panics naming `what` otherwise.
#[track_caller]
pub fn eventually(from: &crate::lab::Pod, to: SocketAddr, want: bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = tcp_echo(&from.netns, to, Duration::from_millis(400)).expect("probe");
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {} -> {to} expected {}",
            from.name,
            if want { "reach" } else { "blocked" }
        );
    }
}
