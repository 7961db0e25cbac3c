//! Restart and upgrade under traffic: the real agent binary is killed with SIGKILL (or stopped
//! with SIGTERM and replaced by one loading a changed program object) while a TCP stream and a
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
    agent::{AgentProcess, RemovePins},
    lab::{Lab, Pod},
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

/// A `TcpExt` counter of network namespace `netns` (/proc/net/netstat as seen from inside it).
fn tcp_ext(netns: &str, field: &str) -> u64 {
    let text = in_netns(netns, || std::fs::read_to_string("/proc/thread-self/net/netstat"))
        .unwrap()
        .expect("reading netstat");
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().expect("TcpExt names"), lines.next().expect("values"));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == field)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no TcpExt {field} in netstat"))
}

/// What the traffic threads measured.
#[derive(Debug, Default)]
struct Traffic {
    tcp_sent: u64,
    tcp_received: u64,
    tcp_retransmits: u32,
    /// Retransmissions the receiver reported as duplicates (D-SACK): the original had arrived.
    tcp_spurious: u64,
    udp_sent: u64,
    udp_missing: Vec<u64>,
    denied_attempts: u64,
    denied_successes: u64,
    stranger_udp_received: u64,
}

/// Three pods under one policy: `client` may reach `server` on TCP and UDP, `stranger` may not.
struct Node {
    pins: RemovePins,
    dir: ManifestDir,
    client: Pod,
    stranger: Pod,
    server: Pod,
    _lab: Lab,
}

impl Node {
    fn new(test: &str) -> Node {
        let mut lab = Lab::new().unwrap();
        let client = lab.add_pod("client").unwrap();
        let stranger = lab.add_pod("stranger").unwrap();
        let server = lab.add_pod("server").unwrap();
        let dir = ManifestDir::new(test).unwrap();
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
        let pins = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/netpol-test-{}-{test}",
            std::process::id()
        ));
        let _ = netpol_agent::dataplane::remove_pins(&pins);
        Node { pins: RemovePins(pins), dir, client, stranger, server, _lab: lab }
    }

    fn agent(&self, extra: &[&str]) -> AgentProcess {
        AgentProcess::start(&self.dir, NODE, &self.pins.0, extra)
    }
}

/// The flows of one test: started once the first agent enforces, measured at the end.
struct Flows {
    client_netns: String,
    stop: Arc<AtomicBool>,
    tcp_sent: Arc<AtomicU64>,
    receiver: thread::JoinHandle<Result<u64, String>>,
    sender: thread::JoinHandle<Result<u32, String>>,
    udp_sender: thread::JoinHandle<u64>,
    udp_receiver: thread::JoinHandle<(Vec<u64>, u64)>,
    prober: thread::JoinHandle<(u64, u64)>,
}

impl Flows {
    fn start(node: &Node) -> Flows {
        let (client, stranger, server) = (&node.client, &node.stranger, &node.server);
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
        netpol_it::probe::eventually(stranger, tcp_to, false, "stranger denied");

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

        // UDP: the client sends numbered datagrams, one per millisecond; the server records
        // them and counts any datagram from the stranger.
        let udp_tx = in_netns(&client.netns, || UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
        let stranger_udp =
            in_netns(&stranger.netns, || UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
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
        Flows {
            client_netns: client.netns.clone(),
            stop,
            tcp_sent,
            receiver,
            sender,
            udp_sender,
            udp_receiver,
            prober,
        }
    }

    /// Stops the flows and checks that nothing allowed was lost and nothing denied got through.
    fn finish(self, what: &str) -> Traffic {
        self.stop.store(true, Ordering::Relaxed);
        let (mut seen, from_stranger) = self.udp_receiver.join().unwrap();
        seen.sort_unstable();
        seen.dedup();
        let (denied_attempts, denied_successes) = self.prober.join().unwrap();
        let mut t = Traffic {
            tcp_retransmits: self.sender.join().unwrap().expect("the TCP stream was never broken"),
            tcp_sent: self.tcp_sent.load(Ordering::Relaxed),
            tcp_received: self.receiver.join().unwrap().expect("the TCP stream arrived intact"),
            udp_sent: self.udp_sender.join().unwrap(),
            stranger_udp_received: from_stranger,
            denied_attempts,
            denied_successes,
            ..Traffic::default()
        };
        t.udp_missing = (0..t.udp_sent).filter(|s| seen.binary_search(s).is_err()).collect();
        // The D-SACKs for the last retransmissions may still be on their way.
        thread::sleep(Duration::from_millis(300));
        // Only this test's stream uses TCP in the client's namespace.
        t.tcp_spurious = tcp_ext(&self.client_netns, "TCPDSACKRecv");
        println!(
            "{what}: TCP {} bytes sent, {} received, {} retransmitted segments ({} of them \
             duplicates the receiver already had); UDP {} datagrams sent, {} missing; denied TCP probes {} / {} succeeded; stranger UDP datagrams \
             received {}",
            t.tcp_sent,
            t.tcp_received,
            t.tcp_retransmits,
            t.tcp_spurious,
            t.udp_sent,
            t.udp_missing.len(),
            t.denied_successes,
            t.denied_attempts,
            t.stranger_udp_received
        );
        assert_eq!(t.tcp_received, t.tcp_sent, "every TCP byte arrived");
        // A retransmission is a loss unless the receiver reports it as a duplicate: on a loaded
        // machine a delayed ACK can trigger a spurious retransmission (tail loss probe, RTO).
        assert_eq!(
            u64::from(t.tcp_retransmits).saturating_sub(t.tcp_spurious),
            0,
            "no TCP segment was dropped (every retransmission was a spurious duplicate): {t:?}"
        );
        assert!(t.udp_missing.is_empty(), "UDP datagrams lost: {:?}", t.udp_missing);
        assert!(t.denied_attempts > 10, "the denied port was probed throughout: {t:?}");
        assert_eq!(t.denied_successes, 0, "a denied connection succeeded: {t:?}");
        assert_eq!(t.stranger_udp_received, 0, "denied UDP datagrams arrived: {t:?}");
        assert!(t.udp_sent > 1000 && t.tcp_sent > 1 << 20, "traffic ran: {t:?}");
        t
    }
}

#[test]
fn kill_9_and_restart_lose_no_packet_and_never_open_a_denied_port() {
    let node = Node::new("killed");
    let mut first = node.agent(&[]);
    first.wait_ready();
    let flows = Flows::start(&node);

    thread::sleep(Duration::from_secs(2));
    let programs_before = attached(&node.server.host_if);
    let pid = first.pid();
    first.kill();
    println!("agent {pid} killed with SIGKILL");
    // No agent at all for a while: the kernel enforces the pinned state alone.
    thread::sleep(Duration::from_secs(2));
    let mut second = node.agent(&[]);
    second.wait_ready();
    thread::sleep(Duration::from_secs(2));
    second.kill();
    // A crash in the middle of adopting: killed 50 ms after it started.
    let early = node.agent(&[]);
    thread::sleep(Duration::from_millis(50));
    early.kill();
    let mut last = node.agent(&[]);
    last.wait_ready();
    thread::sleep(Duration::from_secs(2));
    // The last agent loaded its own programs and swapped them into the pinned links: one
    // program per direction, not the first agent's.
    let programs_after = attached(&node.server.host_if);
    flows.finish("restart under traffic (4 agents, 3 SIGKILLs, one during adoption)");
    println!(
        "programs on the server's interface: {programs_before:?} before, {programs_after:?} after"
    );
    assert_eq!((programs_before.0.len(), programs_before.1.len()), (1, 1));
    assert_eq!((programs_after.0.len(), programs_after.1.len()), (1, 1));
    assert_ne!(programs_before, programs_after, "the new agent's programs replaced the old ones");
}

/// An upgrade as a DaemonSet rolling update does it: the old agent gets SIGTERM and exits, no
/// agent runs for a while, and the new one loads a *changed* program object (netpol-ebpf built
/// with `upgrade-variant`: different code, one more map) and swaps it into the pinned links,
/// reusing the pinned maps (conntrack included). Then a rollback to the original object.
#[test]
fn upgrade_to_a_changed_object_and_back_loses_no_packet() {
    let variant = std::path::Path::new(netpol_it::UPGRADE_VARIANT_OBJECT);
    assert!(
        std::fs::metadata(variant).is_ok_and(|m| m.len() > 0),
        "{} is missing: netpol-it was built with AYA_BUILD_SKIP=1; rebuild without it",
        variant.display()
    );
    let variant_arg = variant.to_str().expect("UTF-8 path");
    let node = Node::new("upgrade");
    let iface = node.server.host_if.clone();
    let mut old = node.agent(&[]);
    old.wait_ready();
    let flows = Flows::start(&node);
    thread::sleep(Duration::from_secs(2));
    let original = attached(&iface);
    assert!(variant_counter(&iface).is_none(), "the shipped object has no np_variant map");

    assert!(old.terminate().success(), "the old agent exits cleanly on SIGTERM");
    // The old pod is gone, the new one is not running yet: the pinned links enforce alone.
    thread::sleep(Duration::from_secs(2));
    let mut new = node.agent(&["--bpf-object", variant_arg]);
    new.wait_ready();
    let upgraded = attached(&iface);
    let seen_then = variant_counter(&iface).expect("the variant's programs use np_variant");
    thread::sleep(Duration::from_secs(2));
    let seen_later = variant_counter(&iface).expect("np_variant still there");

    assert!(new.terminate().success(), "the upgraded agent exits cleanly on SIGTERM");
    // A botched upgrade: the next agent is given a file that is no eBPF object. It must refuse
    // to start, name the file, and leave what the kernel enforces alone.
    let bogus = node.dir.path().join("policy.yaml");
    let mut broken = node.agent(&["--bpf-object", bogus.to_str().expect("UTF-8 path")]);
    let status = broken.wait_exit(Duration::from_secs(10));
    let log = broken.log_text();
    assert!(!status.success(), "an agent with a broken object must fail: {log}");
    let named = format!("loading the eBPF object {}", bogus.display());
    assert!(log.contains(&named), "the error names the object file: {log}");
    assert_eq!(attached(&iface), upgraded, "a failed start leaves the attached programs alone");
    thread::sleep(Duration::from_secs(1));
    let mut rolled_back = node.agent(&[]);
    rolled_back.wait_ready();
    thread::sleep(Duration::from_secs(2));
    let after = attached(&iface);
    flows.finish("upgrade to a changed program object and back, under traffic");

    println!(
        "programs (id, tag) on the server's interface: original {original:?}, upgraded \
         {upgraded:?}, rolled back {after:?}; packets through the upgraded programs: \
         {seen_then} when ready, {seen_later} 2 s later"
    );
    for progs in [&original, &upgraded, &after] {
        assert_eq!((progs.0.len(), progs.1.len()), (1, 1), "one program per direction");
    }
    let tags = |p: &Attached| (p.0[0].1, p.1[0].1);
    assert_ne!(tags(&original), tags(&upgraded), "the changed object's code is what is attached");
    assert_eq!(tags(&original), tags(&after), "the rollback attached the original code again");
    assert!(seen_later > seen_then, "the changed programs handle the traffic");
}

/// (id, tag) of the programs attached with TCX to an interface, per direction.
type Attached = (Vec<(u32, u64)>, Vec<(u32, u64)>);

fn attached(iface: &str) -> Attached {
    use aya::programs::{tc::TcAttachType, SchedClassifier};
    let progs = |at| {
        SchedClassifier::query_tcx(iface, at)
            .map(|(_, progs)| progs.iter().map(|p| (p.id(), p.tag())).collect())
            .unwrap_or_default()
    };
    (progs(TcAttachType::Ingress), progs(TcAttachType::Egress))
}

/// The sum over CPUs of `np_variant`, the packet counter only the variant object has, found
/// through the maps of the program attached at `iface`'s ingress; `None` if that program has no
/// such map.
fn variant_counter(iface: &str) -> Option<u64> {
    use aya::{
        maps::{MapData, PerCpuArray},
        programs::{tc::TcAttachType, SchedClassifier},
    };
    let (_, progs) = SchedClassifier::query_tcx(iface, TcAttachType::Ingress).ok()?;
    let ids = progs.first()?.map_ids().expect("map ids").unwrap_or_default();
    ids.into_iter().find_map(|m| {
        let map = MapData::from_id(m).ok()?;
        let name = map.info().ok()?.name_as_str()?.to_owned();
        if name != "np_variant" {
            return None;
        }
        let arr: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map)).ok()?;
        Some(arr.get(&0, 0).ok()?.iter().sum())
    })
}
