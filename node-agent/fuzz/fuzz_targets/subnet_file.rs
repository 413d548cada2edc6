//! `/run/flannel/subnet.env` (`SubnetEnv::parse`, `parse_subnet`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use node_agent_fuzz::flannel::subnet_env::{SubnetEnv, parse_subnet};
use node_agent_fuzz::{check_error, text};

fuzz_target!(|data: &[u8]| {
    let contents = text(data);
    match SubnetEnv::parse(&contents) {
        Err(e) => check_error(&e),
        Ok(env) => {
            assert!(env.network.contains(&env.subnet), "{env:?}");
            // What the agent would write for it reads back the same.
            let written = env.render();
            match SubnetEnv::parse(&written) {
                Ok(again) => assert_eq!(again, env, "{written}"),
                Err(e) => panic!("{written}: {e}"),
            }
        }
    }
    match parse_subnet(&contents) {
        Err(e) => check_error(&e),
        Ok(Some(subnet)) => assert_eq!(subnet, subnet.trunc()),
        Ok(None) => {}
    }
});
