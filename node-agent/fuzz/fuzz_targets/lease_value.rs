//! A lease's value (`LeaseAttrs::parse`) and the VtepMAC inside it (`parse_mac`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use node_agent_fuzz::flannel::lease::{LeaseAttrs, format_mac, parse_mac};
use node_agent_fuzz::{check_error, text};

fuzz_target!(|data: &[u8]| {
    let json = text(data);
    match LeaseAttrs::parse(&json) {
        Err(e) => check_error(&e),
        Ok(lease) => {
            assert_eq!(lease.backend_data.is_some(), lease.is_vxlan(), "{lease:?}");
            // What the agent would write for it reads back the same.
            let written = lease.to_json();
            match LeaseAttrs::parse(&written) {
                Ok(again) => assert_eq!(again, lease, "{written}"),
                Err(e) => panic!("{written}: {e}"),
            }
        }
    }
    match parse_mac(&json) {
        Err(e) => check_error(&e),
        Ok(mac) => {
            let written = format_mac(&mac);
            assert_eq!(written, json.to_ascii_lowercase().replace('-', ":"));
            assert_eq!(parse_mac(&written).ok(), Some(mac), "{written}");
        }
    }
});
