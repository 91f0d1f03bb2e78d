//! Kernel buffers of the endpoint's UDP socket.
//!
//! TCP's receiver window stops a sender before the kernel's socket buffer fills. QUIC's flow
//! control counts stream bytes the application has not read, in megabytes, so nothing stops a
//! burst of datagrams at the socket: when the endpoint task waits for a core, what does not fit
//! in the buffer is dropped by the kernel without a trace on the wire, and the sender has to
//! detect the loss and resend (with its congestion controller reading it as congestion). The
//! Linux default (`net.core.rmem_default`, 208 KiB on common distributions) holds about a
//! hundred full datagrams. In the lab's `lan` profile, with both nodes sharing two cores, the
//! follower's socket dropped tens of thousands of datagrams per closed-loop row.

use std::net::UdpSocket;

use nix::sys::socket::{GetSockOpt, SetSockOpt, getsockopt, setsockopt, sockopt};

/// Bytes of kernel buffer asked for in each direction. quic-go asks for 7 MiB for the same
/// reason; 8 MiB holds about 5,000 full datagrams.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// Bytes `getsockopt` reports per byte of buffer asked for: Linux reports twice the value
/// set, the other half being its bookkeeping allowance.
const REPORTED_PER_BYTE: usize = if cfg!(any(target_os = "linux", target_os = "android")) {
    2
} else {
    1
};

/// The kernel's buffer sizes of a socket as `getsockopt` reports them (see
/// [`REPORTED_PER_BYTE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketBuffers {
    pub recv: usize,
    pub send: usize,
}

impl SocketBuffers {
    pub fn of(socket: &UdpSocket) -> std::io::Result<SocketBuffers> {
        Ok(SocketBuffers {
            recv: getsockopt(socket, sockopt::RcvBuf)?,
            send: getsockopt(socket, sockopt::SndBuf)?,
        })
    }

    /// The sizes as set, receive and send: what compares with [`SOCKET_BUFFER`].
    pub fn granted(&self) -> (usize, usize) {
        (self.recv / REPORTED_PER_BYTE, self.send / REPORTED_PER_BYTE)
    }

    /// Whether both directions got [`SOCKET_BUFFER`]. A reported 8 MiB on Linux is 4 MiB set:
    /// not enough.
    pub fn are_enough(&self) -> bool {
        let (recv, send) = self.granted();
        recv >= SOCKET_BUFFER && send >= SOCKET_BUFFER
    }

    /// What to tell an operator when the buffers are short of what the endpoint asks for.
    pub fn shortfall(&self) -> Option<String> {
        let (recv, send) = self.granted();
        (!self.are_enough()).then(|| {
            format!(
                "the kernel holds UDP socket buffers to {} KiB (receive) and {} KiB (send) where \
                 QUIC asks for {} KiB, so bursts may be dropped; raise net.core.rmem_max and \
                 net.core.wmem_max, or grant CAP_NET_ADMIN",
                recv / 1024,
                send / 1024,
                SOCKET_BUFFER / 1024
            )
        })
    }
}

/// Raises both of the socket's buffers towards [`SOCKET_BUFFER`]. The plain option is capped
/// by `net.core.rmem_max` / `wmem_max`; the forcing one, allowed with `CAP_NET_ADMIN`, is not.
/// A buffer is never made smaller than it was. Returns what the kernel granted.
pub fn enlarge_buffers(socket: &UdpSocket) -> std::io::Result<SocketBuffers> {
    raise(socket, sockopt::RcvBuf, |_s| {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let _ = setsockopt(_s, sockopt::RcvBufForce, &SOCKET_BUFFER);
    })?;
    raise(socket, sockopt::SndBuf, |_s| {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let _ = setsockopt(_s, sockopt::SndBufForce, &SOCKET_BUFFER);
    })?;
    SocketBuffers::of(socket)
}

/// One direction: the plain option first, then `force` if the kernel capped it.
fn raise<O>(socket: &UdpSocket, plain: O, force: impl FnOnce(&UdpSocket)) -> nix::Result<()>
where
    O: GetSockOpt<Val = usize> + SetSockOpt<Val = usize> + Copy,
{
    let goal = SOCKET_BUFFER * REPORTED_PER_BYTE;
    if getsockopt(socket, plain)? >= goal {
        return Ok(());
    }
    let _ = setsockopt(socket, plain, &SOCKET_BUFFER);
    if getsockopt(socket, plain)? < goal {
        force(socket);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The kernel's cap on the plain option, as `getsockopt` would report it.
    fn plain_cap(sysctl: &str) -> Option<usize> {
        let v: usize = std::fs::read_to_string(format!("/proc/sys/net/core/{sysctl}"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(v * REPORTED_PER_BYTE)
    }

    #[test]
    fn shortfall_names_the_sizes_set_and_is_none_when_enough() {
        // Linux's default cap of 212,992 bytes, reported doubled.
        let small = SocketBuffers {
            recv: 425_984,
            send: 425_984,
        };
        let advice = small.shortfall().unwrap();
        assert!(advice.contains("208 KiB (receive)"), "{advice}");
        assert!(advice.contains("8192 KiB"), "{advice}");
        let big = SocketBuffers {
            recv: REPORTED_PER_BYTE * SOCKET_BUFFER,
            send: REPORTED_PER_BYTE * SOCKET_BUFFER,
        };
        assert_eq!(big.shortfall(), None);
        // Half of it set, which Linux reports as the full figure, is short.
        if REPORTED_PER_BYTE == 2 {
            let half = SocketBuffers {
                recv: SOCKET_BUFFER,
                send: 2 * SOCKET_BUFFER,
            };
            let advice = half.shortfall().unwrap();
            assert!(
                advice.contains("4096 KiB (receive) and 8192 KiB (send)"),
                "{advice}"
            );
        }
    }

    #[test]
    fn buffers_grow_to_what_the_kernel_allows_and_never_shrink() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = SocketBuffers::of(&socket).unwrap();
        let after = enlarge_buffers(&socket).unwrap();
        assert_eq!(after, SocketBuffers::of(&socket).unwrap());
        assert!(after.recv >= before.recv && after.send >= before.send);
        // Without privilege the plain option still reaches the sysctl cap (or the goal).
        if let (Some(rcap), Some(wcap)) = (plain_cap("rmem_max"), plain_cap("wmem_max")) {
            assert!(
                after.recv >= rcap.min(REPORTED_PER_BYTE * SOCKET_BUFFER),
                "{after:?} cap {rcap}"
            );
            assert!(
                after.send >= wcap.min(REPORTED_PER_BYTE * SOCKET_BUFFER),
                "{after:?} cap {wcap}"
            );
        }
        // A second call changes nothing that is already enough.
        if after.are_enough() {
            assert_eq!(enlarge_buffers(&socket).unwrap(), after);
        }
    }
}
