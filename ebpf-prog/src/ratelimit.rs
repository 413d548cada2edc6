//! A per-CPU fixed-window limiter, for what a program may do only so often:
//! ICMP errors it generates (RFC 1122 section 3.2.2 asks for a limit) and
//! error log lines (which must never come once per packet).

/// One second, in `bpf_ktime_get_ns` units.
pub const SECOND_NS: u64 = 1_000_000_000;

/// ICMP "fragmentation needed" replies admitted per second and CPU. Path MTU
/// discovery needs one reply per flow and route change; Linux's own budget
/// is `net.ipv4.icmp_msgs_per_sec` = 1000 per host.
pub const ICMP_PER_SECOND: u64 = 100;

/// Error log lines admitted per second and CPU.
pub const LOGS_PER_SECOND: u64 = 1;

/// Admits at most `limit` events per window of `window_ns`. The state lives
/// in a per-CPU map slot, so the plain read-modify-write never races.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateWindow {
    /// When the current window began, `bpf_ktime_get_ns` time.
    pub start_ns: u64,
    /// Events admitted in the current window.
    pub used: u64,
}
const _: () = assert!(size_of::<RateWindow>() == 16);

impl RateWindow {
    /// Whether one more event fits; counts it if so.
    #[inline(always)]
    pub fn admit(&mut self, now_ns: u64, window_ns: u64, limit: u64) -> bool {
        // `wrapping_sub`: a zeroed slot (start 0) opens a window at once, and
        // the monotonic clock never goes backwards on one CPU.
        if now_ns.wrapping_sub(self.start_ns) >= window_ns {
            self.start_ns = now_ns;
            self.used = 0;
        }
        if self.used < limit {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_per_window_then_refills() {
        let mut w = RateWindow::default();
        let t0 = 5 * SECOND_NS;
        assert!((0..3).all(|i| w.admit(t0 + i, SECOND_NS, 3)));
        assert!(!w.admit(t0 + 10, SECOND_NS, 3), "fourth in the window");
        assert!(!w.admit(t0 + SECOND_NS - 1, SECOND_NS, 3));
        assert!(w.admit(t0 + SECOND_NS, SECOND_NS, 3), "next window");
        assert_eq!(w.used, 1);
    }

    #[test]
    fn a_zero_limit_admits_nothing() {
        let mut w = RateWindow::default();
        assert!(!w.admit(SECOND_NS, SECOND_NS, 0));
    }
}
