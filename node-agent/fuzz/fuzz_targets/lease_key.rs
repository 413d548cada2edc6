//! Lease keys (`KeyLayout::parse_lease_key`) and etcd prefixes (`KeyLayout::new`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use node_agent_fuzz::flannel::keys::KeyLayout;
use node_agent_fuzz::{check_error, text};

fuzz_target!(|data: &[u8]| {
    let input = text(data);
    let keys = KeyLayout::default();
    // As a whole key, and as the name under the default prefix, so that mutations need not
    // keep the prefix intact to reach the subnet parsing.
    for key in [
        input.to_string(),
        format!("{}{input}", keys.subnets_prefix()),
    ] {
        check_key(&keys, &key);
    }
    match KeyLayout::new(&input) {
        Err(e) => check_error(&e),
        Ok(layout) => {
            // Normalised, and stable under normalising again.
            assert!(!layout.prefix().ends_with('/'), "{layout:?}");
            let again = KeyLayout::new(&format!("{}/", layout.prefix()));
            assert_eq!(again.as_ref().ok(), Some(&layout), "{again:?}");
            check_key(&layout, &format!("{}{input}", layout.subnets_prefix()));
        }
    }
});

fn check_key(keys: &KeyLayout, key: &str) {
    match keys.parse_lease_key(key) {
        Err(e) => {
            check_error(&e);
            assert!(keys.parse_subnet_key(key).is_err(), "{key}");
        }
        Ok(parsed) => {
            // Keys are canonical: the subnets format back into exactly the key.
            assert_eq!(format!("{}{}", keys.subnets_prefix(), parsed.name()), key);
            assert_eq!(keys.parse_subnet_key(key).ok(), Some(parsed.ipv4), "{key}");
            if parsed.ipv6.is_none() {
                assert_eq!(keys.subnet_key(parsed.ipv4), key);
            }
        }
    }
}
