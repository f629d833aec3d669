//! No-op programs on the probes' hooks, for the overhead benchmarks:
//! attached alone, they measure the cost of the hook itself, the floor
//! under a probe's overhead: on the request probe's socket-layer raw
//! tracepoints (`bench-probes`), and on the raw `sys_enter`/`sys_exit`
//! the driver path uses (every syscall on the node passes through those).
//! Also the packet-layer candidate designs for HTTP/1.1 and HTTP/2
//! (`attach_packet_candidate`), priced in the same benchmark.
use std::collections::BTreeMap;
use std::path::Path;

use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock};
use aya::Ebpf;
use podgpu_common::packet::{H1Connection, H2Connection, PacketPodRequests};

use super::{BpfProgramStats, ProbeError};

/// The request probe's raw tracepoints (`probes/requests`).
const SOCKET_HOOKS: [&str; 4] = ["inet_sock_set_state", "tcp_destroy_sock", "sock_recv_length", "sock_send_length"];
/// (program, raw tracepoint): the driver path's hooks.
const SYSCALL_HOOKS: [(&str, &str); 2] = [("baseline_enter", "sys_enter"), ("baseline_exit", "sys_exit")];

/// The syscalls the request and driver probes acted on while both hooked
/// the syscall path: the per-syscall row of `bench-syscalls`.
pub const PROBED_SYSCALLS: [&str; 12] = [
    "read", "write", "close", "ioctl", "readv", "writev", "accept", "accept4", "sendto", "recvfrom", "sendmsg",
    "recvmsg",
];

/// Which packet-layer candidate: the protocol it delimits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketProtocol {
    /// `packet_ingress`/`packet_egress`: a request is a packet in that
    /// starts with a method, answered by the answer's last packet out
    /// (its head's `Content-Length`, chunking or close).
    Http1,
    /// `packet_h2_ingress`/`packet_h2_egress`: frame headers walked in
    /// the packets, a request per stream.
    Http2,
}

impl PacketProtocol {
    /// (ingress, egress) program names.
    fn programs(self) -> (&'static str, &'static str) {
        match self {
            PacketProtocol::Http1 => ("packet_ingress", "packet_egress"),
            PacketProtocol::Http2 => ("packet_h2_ingress", "packet_h2_egress"),
        }
    }
}

/// What the connections a packet-layer candidate follows hold for one
/// pod.
#[derive(Clone, Copy, Debug, Default)]
struct LiveRequests {
    /// Requests started on them (not yet in the pod's own count).
    started: u64,
    /// Requests open on them now.
    open: u64,
}

/// The attached no-op programs; dropping detaches them.
pub struct HookBaseline {
    /// Keeps the programs attached.
    ebpf: Ebpf,
    /// The packet-layer candidate attached, if that is what this is.
    packet: Option<PacketProtocol>,
}

impl HookBaseline {
    /// Loads a no-op program and attaches it to the request probe's four
    /// socket-layer raw tracepoints.
    pub fn attach() -> Result<Self, ProbeError> {
        const NAME: &str = "baseline_enter";
        let mut ebpf = object()?;
        let program = super::load_raw_tracepoint(&mut ebpf, NAME)?;
        for hook in SOCKET_HOOKS {
            program.attach(hook).map_err(|source| ProbeError::Program { name: NAME, source })?;
        }
        Ok(Self { ebpf, packet: None })
    }

    /// Loads a packet-layer candidate and attaches it to `cgroup`, a
    /// cgroup v2 directory: its programs run for the packets of that
    /// cgroup's sockets only, so other processes' I/O never reaches them.
    pub fn attach_packet_candidate(cgroup: &Path, protocol: PacketProtocol) -> Result<Self, ProbeError> {
        let mut ebpf = object()?;
        let directory =
            std::fs::File::open(cgroup).map_err(|source| ProbeError::Library { path: cgroup.to_path_buf(), source })?;
        let (ingress, egress) = protocol.programs();
        for (name, side) in [(ingress, CgroupSkbAttachType::Ingress), (egress, CgroupSkbAttachType::Egress)] {
            let program: &mut CgroupSkb = super::program_of(&mut ebpf, name)?;
            program.load().map_err(|source| ProbeError::Program { name, source })?;
            program
                .attach(&directory, side, CgroupAttachMode::Single)
                .map_err(|source| ProbeError::Program { name, source })?;
        }
        // Connections that end without a FIN or RST on the wire end at
        // their socket's release.
        const RELEASED: &str = "packet_released";
        let program: &mut CgroupSock = super::program_of(&mut ebpf, RELEASED)?;
        program.load().map_err(|source| ProbeError::Program { name: RELEASED, source })?;
        program
            .attach(&directory, CgroupAttachMode::Single)
            .map_err(|source| ProbeError::Program { name: RELEASED, source })?;
        Ok(Self { ebpf, packet: Some(protocol) })
    }

    /// The kernel's accounting of the attached programs.
    pub fn program_stats(&self) -> Vec<BpfProgramStats> {
        super::program_stats(&self.ebpf)
    }

    /// Requests the packet-layer candidate delimited and answered, summed
    /// over every pod and CPU.
    pub fn packet_requests(&self) -> Result<u64, ProbeError> {
        Ok(self.packet_requests_by_cgroup()?.values().sum())
    }

    /// Requests the packet-layer candidate answered, by the cgroup v2 id
    /// of the answering socket (the container's cgroup); empty when no
    /// candidate is attached.
    pub fn packet_requests_by_cgroup(&self) -> Result<BTreeMap<u64, u64>, ProbeError> {
        Ok(self.packet_pods()?.into_iter().map(|(cgroup_id, pod)| (cgroup_id, pod.answered())).collect())
    }

    /// What the packet-layer candidate counted per pod, by the cgroup v2
    /// id of the answering socket; empty when no candidate is attached.
    /// `started` includes the requests of connections still followed
    /// (they join the pod's count only when their state is removed). A
    /// connection removed while its state is read would count twice, in
    /// the pod's count and as live: the pods are read before and after
    /// the connections, and the read is retried (three times at most)
    /// until no pod's count moved in between; after that the excess
    /// stands for this read, and a reader of the cumulative count keeps
    /// it from going back.
    pub fn packet_pods(&self) -> Result<BTreeMap<u64, PacketPodRequests>, ProbeError> {
        if self.packet.is_none() {
            return Ok(BTreeMap::new());
        }
        let mut pods = self.pod_counts()?;
        let mut live = self.live_connections()?;
        for _ in 0..3 {
            let after = self.pod_counts()?;
            let settled =
                after.iter().all(|(cgroup_id, pod)| pods.get(cgroup_id).map(|p| p.started) == Some(pod.started));
            pods = after;
            if settled {
                break;
            }
            live = self.live_connections()?;
        }
        for (cgroup_id, live) in live {
            pods.entry(cgroup_id).or_insert(PacketPodRequests::EMPTY).started += live.started;
        }
        Ok(pods)
    }

    /// The pods' own counts (connections not followed any more).
    fn pod_counts(&self) -> Result<BTreeMap<u64, PacketPodRequests>, ProbeError> {
        let mut pods = BTreeMap::new();
        self.each_entry("PACKET_POD_REQUESTS", |cgroup_id, pod: PacketPodRequests| {
            pods.insert(cgroup_id, pod);
        })?;
        Ok(pods)
    }

    /// Requests open now, by the cgroup v2 id of the socket that will
    /// answer them: counted from the connections' own state, so that a
    /// connection whose end was never seen (its state pushed out of the
    /// LRU map) drops out of the level with it instead of holding it up,
    /// as a difference of cumulative counts would. Empty when no candidate
    /// is attached.
    pub fn packet_open_requests(&self) -> Result<BTreeMap<u64, u64>, ProbeError> {
        Ok(self
            .live_connections()?
            .into_iter()
            .filter(|(_, live)| live.open > 0)
            .map(|(cgroup_id, live)| (cgroup_id, live.open))
            .collect())
    }

    /// The followed connections' requests, by cgroup v2 id.
    fn live_connections(&self) -> Result<BTreeMap<u64, LiveRequests>, ProbeError> {
        let mut live: BTreeMap<u64, LiveRequests> = BTreeMap::new();
        let mut add = |cgroup_id: u64, started: u64, open: u64| {
            let pod = live.entry(cgroup_id).or_default();
            pod.started += started;
            pod.open += open;
        };
        match self.packet {
            None => {}
            Some(PacketProtocol::Http1) => self.each_entry("PACKET_CONNECTIONS", |_, connection: H1Connection| {
                let open = connection.request_started_ns != 0 && connection.client == 0;
                add(connection.cgroup_id, connection.requests_started, u64::from(open));
            })?,
            Some(PacketProtocol::Http2) => {
                self.each_entry("H2_PACKET_CONNECTIONS", |_, connection: H2Connection| {
                    let open = connection.streams.iter().filter(|slot| slot.stream != 0).count() as u64;
                    add(connection.cgroup_id, connection.requests_started, open);
                })?
            }
        }
        Ok(live)
    }

    /// Calls `each` with every entry of the hash map `name` (u64 keys).
    fn each_entry<V: aya::Pod>(&self, name: &'static str, mut each: impl FnMut(u64, V)) -> Result<(), ProbeError> {
        let map = self.ebpf.map(name).ok_or(ProbeError::MissingMap(name))?;
        let values: aya::maps::HashMap<_, u64, V> =
            aya::maps::HashMap::try_from(map).map_err(|source| ProbeError::Map { name, source })?;
        for entry in values.iter() {
            let (key, value) = entry.map_err(|source| ProbeError::Map { name, source })?;
            each(key, value);
        }
        Ok(())
    }

    /// What the HTTP/2 candidate could not follow: connections whose frame
    /// boundary it lost, open requests reset or pushed out of their slot,
    /// packets with more frames than one run reads.
    pub fn packet_h2_losses(&self) -> Result<[u64; 3], ProbeError> {
        let sums = self.per_cpu_sum("H2_PACKET_LOST", 3)?;
        Ok([sums[0], sums[1], sums[2]])
    }

    /// Each of the first `entries` slots of the per-CPU array `name`,
    /// summed over the CPUs.
    fn per_cpu_sum(&self, name: &'static str, entries: u32) -> Result<Vec<u64>, ProbeError> {
        let map = self.ebpf.map(name).ok_or(ProbeError::MissingMap(name))?;
        let values: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(map).map_err(|source| ProbeError::Map { name, source })?;
        (0..entries)
            .map(|index| {
                let per_cpu = values.get(&index, 0).map_err(|source| ProbeError::Map { name, source })?;
                Ok(per_cpu.iter().sum::<u64>())
            })
            .collect()
    }

    /// Loads and attaches no-op programs on raw `sys_enter`/`sys_exit`.
    pub fn attach_syscall_hooks() -> Result<Self, ProbeError> {
        let mut ebpf = object()?;
        super::attach_raw_tracepoints(&mut ebpf, &SYSCALL_HOOKS)?;
        Ok(Self { ebpf, packet: None })
    }

    /// Loads one no-op program and attaches it to the socket tracepoints
    /// `sock:sock_recv_length` and `sock:sock_send_length`: hooks that run
    /// on socket I/O only and leave the syscall path alone. Needs tracefs.
    pub fn attach_socket_tracepoints() -> Result<Self, ProbeError> {
        Self::attach_tracepoints(&[("sock", "sock_recv_length"), ("sock", "sock_send_length")])
    }

    /// Loads one no-op program and attaches it to the per-syscall
    /// tracepoints (`syscalls:sys_enter_NAME` and `sys_exit_NAME`) of each
    /// of `syscalls`: the hooks a probe would use if it ran only on the
    /// calls it needs. Needs tracefs (`/sys/kernel/tracing`).
    pub fn attach_per_syscall(syscalls: &[&str]) -> Result<Self, ProbeError> {
        let names: Vec<(&str, String)> = syscalls
            .iter()
            .flat_map(|syscall| ["enter", "exit"].map(|side| ("syscalls", format!("sys_{side}_{syscall}"))))
            .collect();
        let names: Vec<(&str, &str)> = names.iter().map(|(category, name)| (*category, name.as_str())).collect();
        Self::attach_tracepoints(&names)
    }

    /// Feasibility of request probes off the syscall path: attaches
    /// `socket_call_args` to the socket tracepoints, runs `io` (which should
    /// make one socket call from this process), and returns the syscall
    /// registers the program read from the task at the tracepoint: (dx,
    /// si, di, orig_ax), i.e. (count, buffer, fd, syscall number) for a
    /// `read` or `write`. `None` when the program saw no call.
    pub fn socket_call_args(io: impl FnOnce()) -> Result<Option<[u64; 4]>, ProbeError> {
        const NAME: &str = "socket_call_args";
        const MAP: &str = "SOCKET_CALL";
        let mut ebpf = object()?;
        {
            let map = ebpf.map_mut(MAP).ok_or(ProbeError::MissingMap(MAP))?;
            let mut slots: aya::maps::Array<_, u64> =
                aya::maps::Array::try_from(map).map_err(|source| ProbeError::Map { name: MAP, source })?;
            slots.set(0, u64::from(std::process::id()), 0).map_err(|source| ProbeError::Map { name: MAP, source })?;
        }
        let program = super::load_tracepoint(&mut ebpf, NAME)?;
        for name in ["sock_recv_length", "sock_send_length"] {
            program.attach("sock", name).map_err(|source| ProbeError::Program { name: NAME, source })?;
        }
        io();
        let map = ebpf.map(MAP).ok_or(ProbeError::MissingMap(MAP))?;
        let slots: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(map).map_err(|source| ProbeError::Map { name: MAP, source })?;
        let mut values = [0u64; 4];
        for (index, value) in values.iter_mut().enumerate() {
            *value = slots.get(&(index as u32 + 1), 0).map_err(|source| ProbeError::Map { name: MAP, source })?;
        }
        Ok((values != [0; 4]).then_some(values))
    }

    /// Loads the no-op tracepoint program and attaches it to each
    /// (category, name).
    fn attach_tracepoints(tracepoints: &[(&str, &str)]) -> Result<Self, ProbeError> {
        const NAME: &str = "baseline_tracepoint";
        let mut ebpf = object()?;
        let program = super::load_tracepoint(&mut ebpf, NAME)?;
        for (category, name) in tracepoints {
            program.attach(category, name).map_err(|source| ProbeError::Program { name: NAME, source })?;
        }
        Ok(Self { ebpf, packet: None })
    }
}

/// The baseline object, loaded (maps created, no program loaded yet).
fn object() -> Result<Ebpf, ProbeError> {
    Ok(Ebpf::load(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podgpu-baseline")))?)
}
