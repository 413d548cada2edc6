//! Certificates for a TLS etcd, made by the test with `openssl`: a CA, a
//! server certificate for etcd's address, a client certificate for the
//! agents, and a second, unrelated CA (with a client certificate of its
//! own) for "wrong CA" cases. ECDSA P-256, valid for one day.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::process;

/// The files, all PEM, in a directory the caller owns.
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed neither etcd's certificate nor one etcd trusts.
    pub other_ca: PathBuf,
    /// A client certificate and key signed by `other_ca`: one etcd's
    /// `--client-cert-auth` refuses (unknown CA).
    pub other_client_cert: PathBuf,
    pub other_client_key: PathBuf,
}

impl Pki {
    /// Generates everything in `dir`, one server certificate for every
    /// address in `server_ips` (the members of a cluster share it).
    pub fn generate(dir: &Path, server_ips: &[Ipv4Addr]) -> Result<Self> {
        crate::require_tools(&["openssl"])?;
        let path = |name: &str| dir.join(name);
        let pki = Self {
            ca: path("ca.pem"),
            server_cert: path("server.pem"),
            server_key: path("server-key.pem"),
            client_cert: path("client.pem"),
            client_key: path("client-key.pem"),
            other_ca: path("other-ca.pem"),
            other_client_cert: path("other-client.pem"),
            other_client_key: path("other-client-key.pem"),
        };
        let ca_key = path("ca-key.pem");
        self_signed_ca(&pki.ca, &ca_key, "weft-test-ca")?;
        let other_ca_key = path("other-ca-key.pem");
        self_signed_ca(&pki.other_ca, &other_ca_key, "weft-test-other-ca")?;
        issue(
            dir,
            (&pki.ca, &ca_key),
            (&pki.server_cert, &pki.server_key),
            "etcd",
            &format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth\n",
                server_ips
                    .iter()
                    .map(|ip| format!("IP:{ip}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        )?;
        issue(
            dir,
            (&pki.ca, &ca_key),
            (&pki.client_cert, &pki.client_key),
            "weft-agent",
            "extendedKeyUsage=clientAuth\n",
        )?;
        issue(
            dir,
            (&pki.other_ca, &other_ca_key),
            (&pki.other_client_cert, &pki.other_client_key),
            "weft-agent-other-ca",
            "extendedKeyUsage=clientAuth\n",
        )?;
        Ok(pki)
    }
}

fn openssl(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("openssl");
    cmd.args(args);
    process::run(cmd).map(drop)
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn self_signed_ca(cert: &Path, key: &Path, name: &str) -> Result<()> {
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &path_str(key),
        "-out",
        &path_str(cert),
        "-days",
        "1",
        "-subj",
        &format!("/CN={name}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ])
    .with_context(|| format!("making CA {name}"))
}

/// A key and a certificate for `name`, signed by `ca`, with `extensions`
/// (openssl extension-file syntax).
fn issue(
    dir: &Path,
    (ca, ca_key): (&Path, &Path),
    (cert, key): (&Path, &Path),
    name: &str,
    extensions: &str,
) -> Result<()> {
    let csr = dir.join(format!("{name}.csr"));
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{extensions}"),
    )
    .with_context(|| format!("writing {}", ext.display()))?;
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &path_str(key),
        "-out",
        &path_str(&csr),
        "-subj",
        &format!("/CN={name}"),
    ])
    .with_context(|| format!("making {name}'s key"))?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path_str(&csr),
        "-CA",
        &path_str(ca),
        "-CAkey",
        &path_str(ca_key),
        "-CAcreateserial",
        "-out",
        &path_str(cert),
        "-days",
        "1",
        "-extfile",
        &path_str(&ext),
    ])
    .with_context(|| format!("signing {name}'s certificate"))
}
