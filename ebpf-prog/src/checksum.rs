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

#[cfg(test)]
mod tests {
    use super::*;

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
