//! A steady UDP stream between two containers, numbered so the receiver
//! can count what was lost: the yardstick for "forwarding never stops"
//! while the control plane is disturbed (agents killed and restarted, etcd
//! members failing).

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::cluster::{Container, python3};
use crate::process::Background;

/// The port [`UdpStream::start`] sends to.
pub const STREAM_PORT: u16 = 7788;

/// argv: bind address, port, seconds to listen. Prints the number of
/// distinct sequence numbers received.
const RECEIVER: &str = r#"
import socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind((host, port))
s.settimeout(0.5)
seen = set()
end = time.time() + secs
while time.time() < end:
    try:
        data = s.recv(64)
        seen.add(int.from_bytes(data[:8], "big"))
    except socket.timeout:
        pass
print(len(seen), flush=True)
"#;

/// argv: destination, port, packets per second, count. Sends on an
/// absolute schedule (no drift), prints how many it handed to the kernel.
const SENDER: &str = r#"
import socket, sys, time
dst, port, pps, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
start = time.time()
sent = 0
for seq in range(count):
    delay = start + seq / pps - time.time()
    if delay > 0:
        time.sleep(delay)
    try:
        s.sendto(seq.to_bytes(8, "big") + bytes(56), (dst, port))
        sent += 1
    except OSError:
        pass
print(sent, flush=True)
"#;

/// A running stream; [`UdpStream::finish`] waits for it and counts.
pub struct UdpStream {
    receiver: Background,
    sender: Background,
    packets: u64,
    duration: Duration,
    dst: Ipv4Addr,
}

/// What a stream delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamStats {
    /// Packets the sender tried to send.
    pub packets: u64,
    /// Distinct packets the receiver got.
    pub received: u64,
}

impl StreamStats {
    pub fn lost(&self) -> u64 {
        self.packets.saturating_sub(self.received)
    }
}

impl UdpStream {
    /// Starts `pps` packets per second from `src` to `dst` for `duration`.
    pub fn start(
        src: &Container<'_>,
        dst: &Container<'_>,
        pps: u32,
        duration: Duration,
    ) -> Result<Self> {
        Self::start_on_port(src, dst, STREAM_PORT, pps, duration)
    }

    /// [`Self::start`] to UDP `port`: several streams into one container
    /// each need their own.
    pub fn start_on_port(
        src: &Container<'_>,
        dst: &Container<'_>,
        port: u16,
        pps: u32,
        duration: Duration,
    ) -> Result<Self> {
        ensure!(pps > 0, "a stream needs a rate");
        let port = port.to_string();
        let python = python3();
        // The receiver listens past the sender's end, for the last packets.
        let listen = (duration + Duration::from_secs(2))
            .as_secs_f64()
            .to_string();
        let dst_ip = dst.ip().to_string();
        let receiver = Background::spawn(
            dst.ns()
                .command(&[python, "-c", RECEIVER, &dst_ip, &port, &listen]),
        )?;
        // Give the receiver time to bind.
        std::thread::sleep(Duration::from_millis(300));
        let packets = u64::from(pps) * duration.as_secs().max(1);
        let sender = Background::spawn(src.ns().command(&[
            python,
            "-c",
            SENDER,
            &dst_ip,
            &port,
            &pps.to_string(),
            &packets.to_string(),
        ]))?;
        Ok(Self {
            receiver,
            sender,
            packets,
            duration,
            dst: dst.ip(),
        })
    }

    /// Waits for both ends and counts.
    pub fn finish(self) -> Result<StreamStats> {
        let slack = Duration::from_secs(15);
        let sent = self
            .sender
            .finish(self.duration + slack)
            .context("UDP stream sender")?;
        let received = self
            .receiver
            .finish(self.duration + slack)
            .with_context(|| format!("UDP stream receiver at {}", self.dst))?;
        let parse = |what: &str, text: &str| -> Result<u64> {
            text.trim()
                .parse()
                .with_context(|| format!("{what} printed {text:?}"))
        };
        let handed = parse("sender", &sent)?;
        ensure!(
            handed == self.packets,
            "the sender could hand only {handed} of {} packets to its kernel",
            self.packets
        );
        Ok(StreamStats {
            packets: self.packets,
            received: parse("receiver", &received)?,
        })
    }
}
