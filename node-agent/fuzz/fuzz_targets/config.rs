//! The network config at `<prefix>/config` (`NetworkConfig::parse`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use node_agent_fuzz::flannel::config::{
    Backend, MAX_MTU, MAX_SUBNET_LEN, MAX_VNI, MIN_VXLAN_MTU, NetworkConfig,
};
use node_agent_fuzz::{check_error, text};

fuzz_target!(|data: &[u8]| {
    let json = text(data);
    let cfg = match NetworkConfig::parse(&json) {
        Ok(cfg) => cfg,
        Err(e) => return check_error(&e),
    };
    // What every accepted config promises the allocator.
    assert!((2..=MAX_SUBNET_LEN).contains(&cfg.subnet_len), "{cfg:?}");
    assert!(cfg.network.prefix_len() + 2 <= cfg.subnet_len, "{cfg:?}");
    assert_eq!(cfg.network, cfg.network.trunc(), "{cfg:?}");
    assert!(cfg.subnet_min <= cfg.subnet_max, "{cfg:?}");
    assert!(cfg.network.contains(&cfg.subnet_min), "{cfg:?}");
    assert!(cfg.network.contains(&cfg.subnet_max), "{cfg:?}");
    let size = cfg.subnet_size();
    assert_eq!(u32::from(cfg.subnet_min) % size, 0, "{cfg:?}");
    assert_eq!(u32::from(cfg.subnet_max) % size, 0, "{cfg:?}");
    assert!(cfg.subnet_count() >= 1, "{cfg:?}");
    let backend = match cfg.backend {
        Backend::Vxlan(v) => {
            assert!(v.vni <= MAX_VNI && v.port != 0, "{cfg:?}");
            assert!(
                v.mtu
                    .is_none_or(|mtu| (MIN_VXLAN_MTU..=MAX_MTU).contains(&mtu)),
                "{cfg:?}"
            );
            let mtu = v
                .mtu
                .map(|mtu| format!(r#","MTU":{mtu}"#))
                .unwrap_or_default();
            format!(
                r#"{{"Type":"vxlan","VNI":{},"Port":{},"DirectRouting":{}{mtu}}}"#,
                v.vni, v.port, v.direct_routing
            )
        }
        Backend::HostGw => r#"{"Type":"host-gw"}"#.to_owned(),
        Backend::Ipip => r#"{"Type":"ipip"}"#.to_owned(),
    };
    // The config written out explicitly reads back the same.
    let explicit = format!(
        r#"{{"Network":"{}","SubnetLen":{},"SubnetMin":"{}","SubnetMax":"{}","Backend":{backend}}}"#,
        cfg.network, cfg.subnet_len, cfg.subnet_min, cfg.subnet_max
    );
    match NetworkConfig::parse(&explicit) {
        Ok(again) => assert_eq!(again, cfg, "{explicit}"),
        Err(e) => panic!("{explicit}: {e}"),
    }
});
