//! The packet-layer candidates' last word on a connection: a
//! `cgroup/sock_release` program that runs when a pod's socket is
//! released, so that a connection that ends without a FIN or RST the
//! packet programs could see (a peer gone from the network, a socket
//! closed in repair mode, a process killed while the wire is down) still
//! ends its open requests and leaves no state behind.
//!
//! A `sock_release` program may not read the socket's addresses or ports,
//! the key the packet programs file a connection under; both sides can
//! ask for the socket's cookie, so a connection's first packet files its
//! key under its cookie here (one helper call per connection, none per
//! packet).
use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie,
    macros::{cgroup_sock, map},
    maps::LruHashMap,
    programs::{SkBuffContext, SockContext},
};

use crate::{packet_h1, packet_h2};

/// The packet programs' connection key, by socket cookie.
#[map]
static CONNECTION_OF_SOCKET: LruHashMap<u64, u64> = LruHashMap::with_max_entries(65_536, 0);

/// Files connection `key`, whose packet `ctx` is, under its socket's
/// cookie.
#[inline(always)]
pub(crate) fn remember(ctx: &SkBuffContext, key: u64) {
    // SAFETY: the program's own skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    let _ = CONNECTION_OF_SOCKET.insert(&cookie, &key, 0);
}

#[cgroup_sock(sock_release)]
pub fn packet_released(ctx: SockContext) -> i32 {
    // SAFETY: the program's own socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock as *mut _) };
    // SAFETY: a plain u64 map value, copied out.
    let Some(&key) = (unsafe { CONNECTION_OF_SOCKET.get(&cookie) }) else { return 1 };
    packet_h1::released(key);
    packet_h2::released(key);
    let _ = CONNECTION_OF_SOCKET.remove(&cookie);
    1
}
