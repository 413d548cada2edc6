//! `node-agent docker-opts`: the dockerd flags for this node, from the
//! subnet file, as flannel's mk-docker-opts.sh derives them.

use std::{net::Ipv4Addr, path::Path};

use anyhow::Context as _;

use crate::flannel::{SubnetEnv, subnet_env};

/// The flags, in the order mk-docker-opts.sh writes them. Docker masquerades
/// its containers itself unless weft does (`FLANNEL_IPMASQ=true`): two
/// masquerades would hide container IPs from other nodes.
pub fn flags(env: &SubnetEnv) -> Vec<String> {
    let subnet = env.subnet.trunc();
    let gateway = Ipv4Addr::from(u32::from(subnet.network()).saturating_add(1));
    vec![
        format!("--bip={gateway}/{}", subnet.prefix_len()),
        format!("--ip-masq={}", !env.ipmasq),
        format!("--mtu={}", env.mtu),
    ]
}

/// The `KEY="flags"` line of an environment file (systemd's
/// `EnvironmentFile=` and `/etc/default/docker` both read it).
pub fn env_line(key: &str, flags: &[String]) -> String {
    format!("{key}=\"{}\"\n", flags.join(" "))
}

/// Reads the subnet file and prints the flags, or writes them to `dest`.
pub fn run(subnet_file: &Path, dest: Option<&Path>, key: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(subnet_file).with_context(|| {
        format!(
            "reading {} (is node-agent running on this host?)",
            subnet_file.display()
        )
    })?;
    let env =
        SubnetEnv::parse(&text).with_context(|| format!("parsing {}", subnet_file.display()))?;
    let flags = flags(&env);
    match dest {
        None => println!("{}", flags.join(" ")),
        Some(dest) => subnet_env::write_atomic(dest, &env_line(key, &flags))
            .with_context(|| format!("writing {}", dest.display()))?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(ipmasq: bool) -> SubnetEnv {
        SubnetEnv {
            network: "10.244.0.0/16".parse().expect("network"),
            subnet: "10.244.5.0/24".parse().expect("subnet"),
            mtu: 1450,
            ipmasq,
        }
    }

    #[test]
    fn docker_masquerades_only_when_weft_does_not() {
        assert_eq!(
            flags(&env(true)),
            ["--bip=10.244.5.1/24", "--ip-masq=false", "--mtu=1450"]
        );
        assert_eq!(flags(&env(false))[1], "--ip-masq=true");
    }

    #[test]
    fn env_file_line_quotes_all_flags_under_one_key() {
        assert_eq!(
            env_line("DOCKER_OPTS", &flags(&env(true))),
            "DOCKER_OPTS=\"--bip=10.244.5.1/24 --ip-masq=false --mtu=1450\"\n"
        );
    }

    #[test]
    fn a_missing_subnet_file_names_the_path_and_the_likely_cause() {
        let err = run(
            Path::new("/nonexistent/weft/subnet.env"),
            None,
            "DOCKER_OPTS",
        )
        .expect_err("no file");
        let text = format!("{err:#}");
        assert!(text.contains("/nonexistent/weft/subnet.env"), "{text}");
        assert!(text.contains("node-agent running"), "{text}");
    }
}
