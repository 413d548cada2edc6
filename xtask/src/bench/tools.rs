//! The bench's own traffic tools, run as hidden `xtask` subcommands inside
//! the container namespaces (`ip netns exec <ns> xtask udpgen ...`). Each
//! prints one JSON object on stdout.
//!
//! - `udpgen`: 64-byte UDP payloads with `sendmmsg` from one thread per
//!   core, so the sender is not what limits the packet rate;
//! - `udpsink`: counts what arrives (`recvmmsg`), exits once traffic stops;
//! - `rr-server` / `rr-client`: TCP request/response with 1-byte messages,
//!   every round trip timed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Messages per `sendmmsg`/`recvmmsg` call: enough to amortise the syscall.
const BATCH: usize = 64;

/// The tools as hidden `xtask` subcommands.
#[derive(clap::Subcommand)]
pub enum Tool {
    /// The bench's UDP generator (run inside a namespace by `bench`).
    #[command(hide = true)]
    Udpgen {
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// The bench's UDP sink.
    #[command(hide = true)]
    Udpsink {
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long)]
        max_secs: f64,
        #[arg(long, default_value_t = 500)]
        idle_ms: u64,
    },
    /// The bench's TCP request/response server.
    #[command(hide = true)]
    RrServer {
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long)]
        max_secs: f64,
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// The bench's TCP request/response client.
    #[command(hide = true)]
    RrClient {
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long)]
        secs: f64,
        #[arg(long)]
        cpu: Option<usize>,
    },
}

impl Tool {
    pub fn run(self) -> Result<()> {
        match self {
            Self::Udpgen {
                dst,
                secs,
                threads,
                size,
            } => udpgen(dst, secs, threads, size),
            Self::Udpsink {
                bind,
                max_secs,
                idle_ms,
            } => udpsink(bind, max_secs, idle_ms),
            Self::RrServer {
                bind,
                max_secs,
                cpu,
            } => {
                pin_cpu(cpu)?;
                rr_server(bind, max_secs)
            }
            Self::RrClient { dst, secs, cpu } => {
                pin_cpu(cpu)?;
                rr_client(dst, secs)
            }
        }
    }
}

fn udpgen(dst: SocketAddr, secs: f64, threads: usize, size: usize) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || gen_thread(dst, size, &stop))
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0u64;
    for h in handles {
        sent += h
            .join()
            .map_err(|_| anyhow::anyhow!("generator thread panicked"))??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(r#"{{"sent":{sent},"secs":{elapsed}}}"#);
    Ok(())
}

/// One sender: its own socket (so its own source port, which spreads the
/// flows over receive queues and tunnel source ports), batches of `BATCH`.
fn gen_thread(dst: SocketAddr, size: usize, stop: &AtomicBool) -> Result<u64> {
    let sock = UdpSocket::bind("0.0.0.0:0").context("binding the generator socket")?;
    sock.connect(dst)
        .with_context(|| format!("connecting to {dst}"))?;
    let payload = vec![0x5au8; size];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for m in &mut msgs {
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `msgs` holds BATCH initialised headers whose iovec points
        // at `payload`, both alive for the call; the socket is connected.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                0,
            )
        };
        if n > 0 {
            sent += n as u64;
        }
        // Errors (ENOBUFS, a transient ECONNREFUSED) just mean try again:
        // the count only includes what the kernel accepted.
    }
    Ok(sent)
}

fn udpsink(bind: SocketAddr, max_secs: f64, idle_ms: u64) -> Result<()> {
    let sock = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
    set_rcvbuf(&sock, 8 << 20);
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .context("setting the read timeout")?;
    let mut bufs = vec![[0u8; 256]; BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let deadline = Instant::now() + Duration::from_secs_f64(max_secs);
    let idle = Duration::from_millis(idle_ms);
    let mut received = 0u64;
    let mut last = None::<Instant>;
    loop {
        let now = Instant::now();
        if now > deadline || last.is_some_and(|l| now - l > idle) {
            break;
        }
        // SAFETY: `msgs` holds BATCH headers pointing at live buffers; the
        // socket's receive timeout bounds the wait.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                0,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            received += n as u64;
            last = Some(Instant::now());
        }
    }
    println!(r#"{{"received":{received}}}"#);
    Ok(())
}

fn set_rcvbuf(sock: &UdpSocket, bytes: libc::c_int) {
    // SAFETY: setsockopt with a valid fd and a pointer to a c_int of the
    // size passed. Failure only leaves the default buffer.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const bytes).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Pins the calling process to `cpu`, so client and server sit on fixed,
/// different cores in every mode (as on two real hosts) instead of
/// wherever the scheduler happens to put them, which makes the RTT bimodal.
fn pin_cpu(cpu: Option<usize>) -> Result<()> {
    let Some(cpu) = cpu else { return Ok(()) };
    // SAFETY: cpu_set_t is plain old data; CPU_SET writes within it and
    // sched_setaffinity reads it for the size given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
        }
    }
    Ok(())
}

fn rr_server(bind: SocketAddr, max_secs: f64) -> Result<()> {
    let listener = TcpListener::bind(bind).with_context(|| format!("binding {bind}"))?;
    let deadline = Instant::now() + Duration::from_secs_f64(max_secs);
    listener
        .set_nonblocking(true)
        .context("listener non-blocking")?;
    // One client at a time: the bench runs one rr-client per measurement.
    while Instant::now() < deadline {
        let (mut conn, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => return Err(e).context("accept"),
        };
        conn.set_nonblocking(false).context("blocking conn")?;
        conn.set_nodelay(true).context("TCP_NODELAY")?;
        let mut b = [0u8; 1];
        while let Ok(1) = conn.read(&mut b) {
            if conn.write_all(&b).is_err() {
                break;
            }
        }
    }
    Ok(())
}

fn rr_client(dst: SocketAddr, secs: f64) -> Result<()> {
    let start = Instant::now();
    let mut conn = loop {
        match TcpStream::connect_timeout(&dst, Duration::from_secs(1)) {
            Ok(c) => break c,
            // The server may not listen yet: retry for a while.
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {dst}")),
        }
    };
    conn.set_nodelay(true).context("TCP_NODELAY")?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))
        .context("read timeout")?;
    let mut rtts: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut b = [1u8; 1];
    let begin = Instant::now();
    let run = Duration::from_secs_f64(secs);
    while begin.elapsed() < run {
        let t = Instant::now();
        conn.write_all(&b).context("rr write")?;
        if conn.read(&mut b).context("rr read")? != 1 {
            bail!("rr-server closed the connection");
        }
        rtts.push(u32::try_from(t.elapsed().as_nanos()).unwrap_or(u32::MAX));
    }
    let elapsed = begin.elapsed().as_secs_f64();
    if rtts.is_empty() {
        bail!("no transaction completed");
    }
    rtts.sort_unstable();
    let pct = |p: f64| f64::from(rtts[((rtts.len() - 1) as f64 * p) as usize]) / 1000.0;
    println!(
        r#"{{"transactions":{},"secs":{elapsed},"p50_us":{},"p99_us":{}}}"#,
        rtts.len(),
        pct(0.5),
        pct(0.99)
    );
    Ok(())
}
