//! RFC 1071 Internet checksum.

/// Checksum of an IPv4 header without options. The checksum field (bytes
/// 10..12) must be zero or is treated as zero: callers compute it over the
/// header they are about to write.
#[inline(always)]
pub fn ipv4_header(hdr: &[u8; 20]) -> u16 {
    let mut sum: u32 = 0;
    // Fixed trip count so the BPF verifier sees a bounded loop (LLVM unrolls it).
    let mut i = 0;
    while i < 20 {
        if i != 10 {
            sum += u32::from(u16::from_be_bytes([hdr[i], hdr[i + 1]]));
        }
        i += 2;
    }
    fold(sum)
}

/// Checksum of `bytes` (an even number of them, as for ICMP with an even
/// quote). The caller passes a fixed-size buffer, so the loop bound is a
/// constant the verifier can see.
#[inline(always)]
pub fn internet(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    fold(sum)
}

/// Folds a 32-bit one's-complement sum to 16 bits and complements it.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// True when an IPv4 header (checksum included) verifies.
pub fn ipv4_header_is_valid(hdr: &[u8; 20]) -> bool {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([hdr[i], hdr[i + 1]]));
        i += 2;
    }
    fold(sum) == 0
}

/// Bytes 8..12 of an IPv4 header (TTL, protocol, checksum) after one hop
/// of forwarding: TTL one less and the checksum updated incrementally
/// (RFC 1624 eqn. 3, as the kernel's `ip_decrease_ttl` does), so a
/// program that forwards a packet itself writes them back in one store.
/// `None` when the TTL is too low to forward (0 or 1): the kernel's
/// forwarding path then answers with ICMP "time exceeded".
#[inline(always)]
pub fn ipv4_ttl_decremented(word: [u8; 4]) -> Option<[u8; 4]> {
    let [ttl, proto, c0, c1] = word;
    if ttl <= 1 {
        return None;
    }
    // ~HC' = ~HC + ~m + m' where m = (ttl, proto) and m' = (ttl - 1, proto).
    let old = u16::from_be_bytes([ttl, proto]);
    let new = u16::from_be_bytes([ttl - 1, proto]);
    let sum = u32::from(!u16::from_be_bytes([c0, c1])) + u32::from(!old) + u32::from(new);
    let check = fold(sum).to_be_bytes();
    Some([ttl - 1, proto, check[0], check[1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_decrement_keeps_the_checksum_valid() {
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        // Every TTL and protocol, including the carries around 0x0100.
        for ttl in 0..=255u8 {
            for proto in [0u8, 1, 6, 17, 0xff] {
                hdr[8] = ttl;
                hdr[9] = proto;
                hdr[10..12].fill(0);
                let check = ipv4_header(&hdr);
                hdr[10..12].copy_from_slice(&check.to_be_bytes());
                let word = [hdr[8], hdr[9], hdr[10], hdr[11]];
                match ipv4_ttl_decremented(word) {
                    None => assert!(ttl <= 1, "ttl {ttl} refused"),
                    Some(new) => {
                        assert_eq!(new[0], ttl - 1);
                        assert_eq!(new[1], proto);
                        let mut after = hdr;
                        after[8..12].copy_from_slice(&new);
                        assert!(ipv4_header_is_valid(&after), "ttl {ttl} proto {proto}");
                        // The same checksum a full recomputation gives.
                        after[10..12].fill(0);
                        assert_eq!(ipv4_header(&after).to_be_bytes(), [new[2], new[3]]);
                    }
                }
            }
        }
    }

    #[test]
    fn rfc1071_example_header() {
        // A well-known capture: 45 00 00 73 00 00 40 00 40 11 [b8 61] c0 a8 00 01 c0 a8 00 c7
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header(&hdr), 0xb861);
        let mut with = hdr;
        with[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert!(ipv4_header_is_valid(&with));
        // The stored checksum is ignored when computing.
        assert_eq!(ipv4_header(&with), 0xb861);
        with[15] ^= 1;
        assert!(!ipv4_header_is_valid(&with));
    }
}
