//! Restart under traffic: the real agent binary is killed with SIGKILL while a TCP stream and a
//! sequence-numbered UDP flow (both allowed by policy) run between lab pods and a third pod
//! keeps trying a denied port. A new agent then adopts the pinned attachments and maps.
//! Nothing of the allowed flows may be lost (TCP: every byte arrives in order, no reset, and
//! the sender's kernel retransmitted nothing; UDP: no sequence number missing), and the denied
//! probes never succeed — not while no agent runs, not while the next one starts.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use netpol_it::{
    agent::AgentProcess,
    lab::Lab,
    manifests::{namespace, pod_with_protocols, ManifestDir},
    netns::in_netns,
};

const NODE: &str = "lab-node";
const TCP_PORT: u16 = 5001;
const UDP_PORT: u16 = 5002;
const POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client, namespace: prod}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: client}}
    ports:
    - {port: 5001, protocol: TCP}
    - {port: 5002, protocol: UDP}
";

/// The byte at offset `i` of the TCP stream: a pattern the receiver checks, so a lost or
/// duplicated segment would show.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// Retransmitted segments of a TCP socket so far (`tcpi_total_retrans`).
fn total_retrans(s: &TcpStream) -> u32 {
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a tcp_info of `len` bytes, as TCP_INFO expects.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_total_retrans
}

/// What the traffic threads measured.
#[derive(Debug, Default)]
struct Traffic {
    tcp_sent: u64,
    tcp_received: u64,
    tcp_retransmits: u32,
    udp_sent: u64,
    udp_missing: Vec<u64>,
    denied_attempts: u64,
    denied_successes: u64,
    stranger_udp_received: u64,
}

#[test]
fn kill_9_and_restart_lose_no_packet_and_never_open_a_denied_port() {
    let mut lab = Lab::new().unwrap();
    let client = lab.add_pod("client").unwrap();
    let stranger = lab.add_pod("stranger").unwrap();
    let server = lab.add_pod("server").unwrap();
    let dir = ManifestDir::new("restart-traffic").unwrap();
    dir.write("ns.yaml", &namespace("prod", &[])).unwrap();
    let ports = [("", TCP_PORT, "TCP"), ("", UDP_PORT, "UDP")];
    for (p, app, ports) in [
        (&client, "client", &[][..]),
        (&stranger, "stranger", &[][..]),
        (&server, "server", &ports),
    ] {
        dir.write(
            &format!("{app}.yaml"),
            &pod_with_protocols(p, "prod", NODE, &[("app", app)], ports),
        )
        .unwrap();
    }
    dir.write("policy.yaml", POLICY).unwrap();
    let pins =
        std::path::PathBuf::from(format!("/sys/fs/bpf/netpol-test-{}-killed", std::process::id()));
    let _ = netpol_agent::dataplane::remove_pins(&pins);
    let _cleanup = RemovePins(pins.clone());

    let mut first = AgentProcess::start(&dir, NODE, &pins, &[]);
    first.wait_ready();
    let tcp_to = SocketAddr::from((server.ip, TCP_PORT));
    let udp_to = SocketAddr::from((server.ip, UDP_PORT));

    // Servers in the server pod.
    let listener =
        in_netns(&server.netns, || TcpListener::bind(("0.0.0.0", TCP_PORT))).unwrap().unwrap();
    let udp_rx =
        in_netns(&server.netns, || UdpSocket::bind(("0.0.0.0", UDP_PORT))).unwrap().unwrap();
    udp_rx.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    // A receive buffer large enough that a starved receiver thread cannot lose datagrams: a
    // loss must come from the datapath.
    let size: libc::c_int = 16 << 20;
    // SAFETY: SO_RCVBUFFORCE takes an int; the socket is open.
    let rc = unsafe {
        libc::setsockopt(
            udp_rx.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
    // Enforced before the traffic starts.
    netpol_it::probe::eventually(&stranger, tcp_to, false, "stranger denied");

    let stop = Arc::new(AtomicBool::new(false));
    let tcp_sent = Arc::new(AtomicU64::new(0));

    // TCP: the client streams the pattern at a steady pace; the server checks every byte.
    let receiver = thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 65536];
        let mut at = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(at),
                Ok(n) => {
                    for (i, b) in buf[..n].iter().enumerate() {
                        if *b != pattern(at + i as u64) {
                            return Err(format!("byte {} differs", at + i as u64));
                        }
                    }
                    at += n as u64;
                }
                Err(e) => return Err(format!("after {at} bytes: {e}")),
            }
        }
    });
    let mut stream =
        in_netns(&client.netns, || TcpStream::connect_timeout(&tcp_to, Duration::from_secs(1)))
            .unwrap()
            .expect("client connects");
    let sender = {
        let stop = stop.clone();
        let sent = tcp_sent.clone();
        thread::spawn(move || {
            let mut at = 0u64;
            let mut chunk = vec![0u8; 16384];
            while !stop.load(Ordering::Relaxed) {
                for (i, b) in chunk.iter_mut().enumerate() {
                    *b = pattern(at + i as u64);
                }
                if let Err(e) = stream.write_all(&chunk) {
                    return Err(format!("write after {at} bytes: {e}"));
                }
                at += chunk.len() as u64;
                sent.store(at, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(2));
            }
            let retrans = total_retrans(&stream);
            stream.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
            Ok(retrans)
        })
    };

    // UDP: the client sends numbered datagrams, one per millisecond; the server records them
    // and counts any datagram from the stranger.
    let udp_tx = in_netns(&client.netns, || UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    let stranger_udp = in_netns(&stranger.netns, || UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    let udp_sender = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                udp_tx.send_to(&seq.to_be_bytes(), udp_to).expect("udp send");
                // The stranger's datagrams must never arrive.
                let _ = stranger_udp.send_to(&u64::MAX.to_be_bytes(), udp_to);
                seq += 1;
                thread::sleep(Duration::from_millis(1));
            }
            seq
        })
    };
    let stranger_ip = stranger.ip;
    let udp_receiver = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut seen = Vec::new();
            let mut from_stranger = 0u64;
            let mut buf = [0u8; 16];
            let mut idle_after_stop = 0;
            loop {
                match udp_rx.recv_from(&mut buf) {
                    Ok((8, from)) if from.ip() == std::net::IpAddr::V4(stranger_ip) => {
                        from_stranger += 1
                    }
                    Ok((8, _)) => seen.push(u64::from_be_bytes(buf[..8].try_into().unwrap())),
                    Ok(_) => {}
                    Err(_) if stop.load(Ordering::Relaxed) => {
                        idle_after_stop += 1;
                        if idle_after_stop >= 3 {
                            return (seen, from_stranger);
                        }
                    }
                    Err(_) => {}
                }
            }
        })
    };

    // The denied probe: the stranger keeps trying the TCP port.
    let prober = {
        let stop = stop.clone();
        let ns = stranger.netns.clone();
        thread::spawn(move || {
            in_netns(&ns, || {
                let (mut attempts, mut successes) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    attempts += 1;
                    if TcpStream::connect_timeout(&tcp_to, Duration::from_millis(100)).is_ok() {
                        successes += 1;
                    }
                }
                (attempts, successes)
            })
            .unwrap()
        })
    };

    thread::sleep(Duration::from_secs(2));
    let programs_before = attached_programs(&server.host_if);
    let pid = first.pid();
    first.kill();
    println!("agent {pid} killed with SIGKILL");
    // No agent at all for a while: the kernel enforces the pinned state alone.
    thread::sleep(Duration::from_secs(2));
    let mut second = AgentProcess::start(&dir, NODE, &pins, &[]);
    second.wait_ready();
    thread::sleep(Duration::from_secs(2));
    second.kill();
    // A crash in the middle of adopting: killed 50 ms after it started.
    let early = AgentProcess::start(&dir, NODE, &pins, &[]);
    thread::sleep(Duration::from_millis(50));
    early.kill();
    let mut last = AgentProcess::start(&dir, NODE, &pins, &[]);
    last.wait_ready();
    thread::sleep(Duration::from_secs(2));
    // The last agent loaded its own programs and swapped them into the pinned links: one
    // program per direction, not the first agent's.
    let programs_after = attached_programs(&server.host_if);
    stop.store(true, Ordering::Relaxed);

    let (mut seen, from_stranger) = udp_receiver.join().unwrap();
    seen.sort_unstable();
    seen.dedup();
    let (denied_attempts, denied_successes) = prober.join().unwrap();
    let mut t = Traffic {
        tcp_retransmits: sender.join().unwrap().expect("the TCP stream was never broken"),
        tcp_sent: tcp_sent.load(Ordering::Relaxed),
        tcp_received: receiver.join().unwrap().expect("the TCP stream arrived intact"),
        udp_sent: udp_sender.join().unwrap(),
        stranger_udp_received: from_stranger,
        denied_attempts,
        denied_successes,
        ..Traffic::default()
    };
    t.udp_missing = (0..t.udp_sent).filter(|s| seen.binary_search(s).is_err()).collect();
    println!(
        "restart under traffic (4 agents, 3 SIGKILLs, one during adoption): TCP {} bytes sent, {} received, {} \
         retransmitted segments; UDP {} datagrams sent, {} missing; denied TCP probes {} / {} \
         succeeded; stranger UDP datagrams received {}",
        t.tcp_sent,
        t.tcp_received,
        t.tcp_retransmits,
        t.udp_sent,
        t.udp_missing.len(),
        t.denied_successes,
        t.denied_attempts,
        t.stranger_udp_received
    );
    assert_eq!(t.tcp_received, t.tcp_sent, "every TCP byte arrived");
    assert_eq!(t.tcp_retransmits, 0, "no TCP segment was dropped (nothing retransmitted)");
    assert!(t.udp_missing.is_empty(), "UDP datagrams lost: {:?}", t.udp_missing);
    assert!(t.denied_attempts > 10, "the denied port was probed throughout: {t:?}");
    assert_eq!(t.denied_successes, 0, "a denied connection succeeded: {t:?}");
    assert_eq!(t.stranger_udp_received, 0, "denied UDP datagrams arrived: {t:?}");
    assert!(t.udp_sent > 1000 && t.tcp_sent > 1 << 20, "traffic ran: {t:?}");
    println!(
        "programs on the server's interface: {programs_before:?} before, {programs_after:?} after"
    );
    assert_eq!((programs_before.0.len(), programs_before.1.len()), (1, 1));
    assert_eq!((programs_after.0.len(), programs_after.1.len()), (1, 1));
    assert_ne!(programs_before, programs_after, "the new agent's programs replaced the old ones");
}

/// Ids of the programs attached with TCX to `iface` (ingress, egress).
fn attached_programs(iface: &str) -> (Vec<u32>, Vec<u32>) {
    use aya::programs::{tc::TcAttachType, SchedClassifier};
    let ids = |at| {
        SchedClassifier::query_tcx(iface, at)
            .map(|(_, progs)| progs.iter().map(|p| p.id()).collect())
            .unwrap_or_default()
    };
    (ids(TcAttachType::Ingress), ids(TcAttachType::Egress))
}

struct RemovePins(std::path::PathBuf);

impl Drop for RemovePins {
    fn drop(&mut self) {
        let _ = netpol_agent::dataplane::remove_pins(&self.0);
    }
}
