//! What the packet-layer candidates read of a packet before their own
//! protocol: an IPv4 TCP segment's payload extent, its sequence number,
//! whether it closes its connection, and the connection it belongs to,
//! from the pod's side.
use aya_ebpf::programs::SkBuffContext;

const IPPROTO_TCP: u8 = 6;
/// TCP flags (byte 13 of the TCP header).
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
/// An IPv4 header without options and a TCP header without options.
const FIXED_HEADERS: usize = 40;

/// A TCP segment that carries data or closes its connection.
pub(crate) struct TcpSegment {
    /// The connection: the peer's address and port and the pod's port,
    /// read from the headers (no helper needed, unlike the socket
    /// cookie).
    pub key: u64,
    /// Offset of the payload from the start of the packet.
    pub payload: u32,
    /// Offset of the end of the payload.
    pub end: u32,
    /// The sequence number of the payload's first byte.
    pub seq: u32,
    /// FIN or RST: the sender closes the connection (after this
    /// segment's data, if it carries any).
    pub closing: bool,
    /// RST: the connection is gone at once.
    pub reset: bool,
}

impl TcpSegment {
    /// The segment in `ctx`, or `None` for what is not an IPv4 TCP segment
    /// with data or a close (pure ACKs, IPv6, other protocols). `ingress`: the packet
    /// comes into the pod.
    #[inline(always)]
    pub(crate) fn of(ctx: &SkBuffContext, ingress: bool) -> Option<Self> {
        // The IPv4 and TCP headers are in the packet's linear part: read in
        // place. (The payload is in page fragments: TCP copies sent data
        // there, so it takes `bpf_skb_load_bytes`.)
        // SAFETY: the program's own skb; every read below is at a constant
        // offset under the bound tested first, which the verifier checks.
        let (data, end) = unsafe { ((*ctx.skb.skb).data as usize, (*ctx.skb.skb).data_end as usize) };
        if data + FIXED_HEADERS > end {
            return None;
        }
        // SAFETY: as above.
        let head = unsafe { &*(data as *const [u8; FIXED_HEADERS]) };
        if head[0] != 0x45 || head[9] != IPPROTO_TCP {
            return None;
        }
        // A GSO packet out larger than an IPv4 length can say (BIG TCP,
        // on loopback among others) has a total length of 0: its length
        // is the packet's.
        let total = match u32::from(u16::from_be_bytes([head[2], head[3]])) {
            0 => ctx.len(),
            total => total.min(ctx.len()),
        };
        let payload = 20 + u32::from(head[32] >> 4) * 4;
        let flags = head[33];
        let closing = flags & (FIN | RST) != 0;
        if total <= payload && !closing {
            return None;
        }
        let (peer, ports) = if ingress {
            (&head[12..16], [head[20], head[21], head[22], head[23]])
        } else {
            (&head[16..20], [head[22], head[23], head[20], head[21]])
        };
        let key = u64::from(u32::from_ne_bytes([peer[0], peer[1], peer[2], peer[3]])) << 32
            | u64::from(u32::from_ne_bytes(ports));
        let seq = u32::from_be_bytes([head[24], head[25], head[26], head[27]]);
        let end = total.max(payload);
        Some(TcpSegment { key, payload, end, seq, closing, reset: flags & RST != 0 })
    }
}
