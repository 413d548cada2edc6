//! The etcd connection: endpoints, TLS and authentication under flanneld's
//! flag and environment names, request deadlines, and errors that name the
//! file or user at fault without ever printing a secret.

use std::{
    error::Error as _,
    fmt, fs, io,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of every unary request. A member cut off from its quorum
/// otherwise leaves a request hanging for as long as the partition lasts.
/// It bounds the time to the response headers, so watch streams live on.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The `--etcd-*` flags of `node-agent run`.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdSettings {
    /// etcd client URLs, comma separated. List every member: requests go to
    /// any healthy one, so one member's failure does not stop the agent.
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// PEM CA certificate that signed etcd's server certificate.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,
    /// PEM client certificate, for etcd's `--client-cert-auth`.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE", requires = "etcd_keyfile")]
    pub etcd_certfile: Option<PathBuf>,
    /// PEM private key of `--etcd-certfile`.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE", requires = "etcd_certfile")]
    pub etcd_keyfile: Option<PathBuf>,
    /// etcd user, for etcd's authentication.
    #[arg(long, env = "FLANNELD_ETCD_USERNAME", requires = "etcd_password")]
    pub etcd_username: Option<String>,
    /// Password of `--etcd-username`. Prefer the environment variable: a
    /// command line is visible to every user of the host.
    #[arg(
        long,
        env = "FLANNELD_ETCD_PASSWORD",
        hide_env_values = true,
        requires = "etcd_username"
    )]
    pub etcd_password: Option<Secret>,
}

/// A string that never appears in `Debug` or `Display` output.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<hidden>")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("{flag} {}: cannot read it: {source}", path.display())]
    ReadFile {
        flag: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{flag} {}: no PEM {want} block in it", path.display())]
    NotPem {
        flag: &'static str,
        path: PathBuf,
        want: &'static str,
    },
    #[error(
        "TLS files are given but endpoint {endpoint} is not https://: the connection would \
         not use them"
    )]
    TlsWithoutHttps { endpoint: String },
    #[error(
        "endpoint {endpoint} is https:// but no --etcd-cafile is given: this build trusts no \
         system CA store, so name the CA that signed etcd's certificate"
    )]
    HttpsWithoutCa { endpoint: String },
    #[error("endpoint {endpoint}: only http:// and https:// URLs are supported")]
    Scheme { endpoint: String },
    #[error(
        "--etcd-endpoints {endpoint:?} is not a URL: {reason} (expected e.g. \
         http://198.18.0.1:2379)"
    )]
    NotUrl {
        endpoint: String,
        reason: &'static str,
    },
    #[error("cannot reach etcd at {endpoints}: {reason}")]
    Unreachable { endpoints: String, reason: String },
    #[error(
        "etcd rejected user {user:?}: wrong password or no such user \
         (--etcd-username / --etcd-password)"
    )]
    AuthFailed { user: String },
    #[error(
        "TLS with etcd failed: {reason}. Check that --etcd-cafile {} signed etcd's server \
         certificate, and that etcd trusts --etcd-certfile{}",
        cafile.display(),
        certfile.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default()
    )]
    Tls {
        reason: String,
        cafile: PathBuf,
        certfile: Option<PathBuf>,
    },
    #[error(
        "etcd requires a client certificate and none is given (it answered with TLS alert \
         {alert}): give --etcd-certfile and --etcd-keyfile"
    )]
    ClientCertMissing { alert: String },
    #[error(
        "etcd refused the client certificate --etcd-certfile {} (TLS alert {alert}): check \
         that etcd's --trusted-ca-file holds the CA that signed it and that it is valid for \
         client authentication",
        certfile.display()
    )]
    ClientCertRefused { alert: String, certfile: PathBuf },
    /// Boxed: etcd's error is large, and this enum travels by value.
    #[error("etcd: {}", describe(.0))]
    Client(Box<etcd_client::Error>),
}

impl EtcdError {
    /// Errors that retrying cannot fix: the configuration is wrong.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, EtcdError::Client(_) | EtcdError::Unreachable { .. })
    }
}

impl EtcdSettings {
    /// Checks the flags and reads the TLS files into connection options.
    pub fn connect_options(&self) -> Result<ConnectOptions, EtcdError> {
        let tls_given = self.etcd_cafile.is_some() || self.etcd_certfile.is_some();
        for endpoint in &self.etcd_endpoints {
            check_url(endpoint)?;
            let scheme = endpoint.split_once("://").map(|(s, _)| s);
            match scheme {
                Some("https") if self.etcd_cafile.is_none() => {
                    return Err(EtcdError::HttpsWithoutCa {
                        endpoint: endpoint.clone(),
                    });
                }
                Some("http") | None if tls_given => {
                    return Err(EtcdError::TlsWithoutHttps {
                        endpoint: endpoint.clone(),
                    });
                }
                Some("http" | "https") | None => {}
                Some(_) => {
                    return Err(EtcdError::Scheme {
                        endpoint: endpoint.clone(),
                    });
                }
            }
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            // A member without a leader answers watches with an error
            // instead of a silent stream, so the agent moves on.
            .with_require_leader(true);
        if let Some(ca) = &self.etcd_cafile {
            let ca_pem = read_pem(ca, "--etcd-cafile", "CERTIFICATE")?;
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca_pem));
            if let (Some(cert), Some(key)) = (&self.etcd_certfile, &self.etcd_keyfile) {
                let cert_pem = read_pem(cert, "--etcd-certfile", "CERTIFICATE")?;
                let key_pem = read_pem(key, "--etcd-keyfile", "PRIVATE KEY")?;
                tls = tls.identity(Identity::from_pem(cert_pem, key_pem));
            }
            opts = opts.with_tls(tls);
        }
        if let (Some(user), Some(password)) = (&self.etcd_username, &self.etcd_password) {
            opts = opts.with_user(user.clone(), password.expose());
        }
        Ok(opts)
    }

    /// Connects and makes one request, so that a wrong CA, certificate or
    /// password shows now, classified, rather than on the first read.
    pub async fn connect(&self, opts: ConnectOptions) -> Result<Client, EtcdError> {
        let attempt = async {
            let mut client = Client::connect(&self.etcd_endpoints, Some(opts)).await?;
            client.status().await?;
            Ok::<_, etcd_client::Error>(client)
        };
        attempt.await.map_err(|e| self.classify(e))
    }

    fn classify(&self, error: etcd_client::Error) -> EtcdError {
        if let (Some(user), etcd_client::Error::GRpcStatus(status)) = (&self.etcd_username, &error)
        {
            // etcd's ErrGRPCAuthFailed (server/etcdserver/api/v3rpc/
            // rpctypes): InvalidArgument from Authenticate.
            if status.code() == tonic::Code::InvalidArgument {
                return EtcdError::AuthFailed { user: user.clone() };
            }
        }
        if self.etcd_cafile.is_some()
            && let Some(alert) = client_refused(&error)
        {
            return match &self.etcd_certfile {
                None => EtcdError::ClientCertMissing { alert },
                Some(certfile) => EtcdError::ClientCertRefused {
                    alert,
                    certfile: certfile.clone(),
                },
            };
        }
        if let Some(cafile) = &self.etcd_cafile
            && let Some(reason) = tls_failure(&error)
        {
            return EtcdError::Tls {
                reason,
                cafile: cafile.clone(),
                certfile: self.etcd_certfile.clone(),
            };
        }
        if is_unreachable(&error) {
            return EtcdError::Unreachable {
                endpoints: self.etcd_endpoints.join(", "),
                reason: describe(&error),
            };
        }
        EtcdError::Client(Box::new(error))
    }
}

/// Whether `error` says no endpoint could be reached at all (refused, no
/// route, timed out) rather than that one answered with an error.
fn is_unreachable(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ) && status.source().is_some()
        }
        _ => false,
    }
}

/// Refuses an endpoint that is no `[scheme://]host:port` URL, which
/// etcd-client would otherwise retry forever ("invalid uri character").
/// The scheme itself is checked by the caller.
fn check_url(endpoint: &str) -> Result<(), EtcdError> {
    let bad = |reason| EtcdError::NotUrl {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let authority = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    if authority.is_empty() {
        return Err(bad("no host"));
    }
    if authority.contains(['/', '?', '#', '@']) {
        return Err(bad(
            "etcd endpoints are scheme://host:port, without a path or user",
        ));
    }
    let (host, port) = match authority.rsplit_once(':') {
        // An IPv6 literal without a port: the last colon is inside brackets.
        Some((host, port)) if !port.ends_with(']') => (host, Some(port)),
        _ => (authority, None),
    };
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return Err(bad("the port is not a number from 0 to 65535"));
    }
    let valid_host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        }
    };
    if !valid_host {
        return Err(bad("the host is not a name or an IP address"));
    }
    Ok(())
}

/// `error` with its causes: a gRPC status alone often says only
/// "transport error"; its metadata map and (empty) details are left out.
pub fn describe(error: &etcd_client::Error) -> String {
    // A status's own text lists its (empty) details and metadata map: say
    // only its code and message.
    let mut text = match error {
        etcd_client::Error::GRpcStatus(status) if status.message().is_empty() => {
            format!("{:?}", status.code())
        }
        etcd_client::Error::GRpcStatus(status) => {
            format!("{:?}: {}", status.code(), status.message())
        }
        other => other.to_string(),
    };
    let mut next = causes(error);
    while let Some(e) = next {
        let cause = e.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        next = e.source();
    }
    text
}

/// The first cause of `error`; a status's, for a gRPC status.
fn causes(error: &etcd_client::Error) -> Option<&(dyn std::error::Error + 'static)> {
    match error {
        etcd_client::Error::GRpcStatus(status) => status.source(),
        other => other.source(),
    }
}

/// The TLS error somewhere in `error`'s source chain (rustls reports it as
/// an `io::Error` wrapping a `rustls::Error`; a balanced channel hands it
/// back inside an `Unavailable` status), described.
fn tls_failure(error: &etcd_client::Error) -> Option<String> {
    let mut next = causes(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        // h2's source() skips the io::Error it wraps; ask for it.
        let io = e
            .downcast_ref::<io::Error>()
            .or_else(|| e.downcast_ref::<h2::Error>().and_then(h2::Error::get_io));
        if let Some(tls) = io
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls.to_string());
        }
        next = e.source();
    }
    None
}

/// TLS alerts a server sends when it refuses the client's certificate (or
/// its absence), as rustls names them: no retry changes that answer.
const CLIENT_CERT_ALERTS: &[&str] = &[
    "BadCertificate",
    "UnsupportedCertificate",
    "CertificateRevoked",
    "CertificateExpired",
    "CertificateUnknown",
    "UnknownCA",
    "AccessDenied",
    "CertificateRequired",
];

/// The alert, if `error` is etcd refusing this client's certificate. In
/// TLS 1.3 the server checks the client's certificate after the client has
/// finished its handshake, so the refusal arrives as an alert on the first
/// read of the HTTP/2 connection. h2 keeps only the kind and text of the
/// io::Error it read (it must be Clone), so what reaches us is an
/// `InvalidData` error reading "received fatal alert: <name>" (rustls's
/// wording) rather than the `rustls::Error` itself. Either form counts.
fn client_refused(error: &etcd_client::Error) -> Option<String> {
    let mut next = causes(error);
    while let Some(e) = next {
        let alert = match e.downcast_ref::<rustls::Error>() {
            Some(rustls::Error::AlertReceived(alert)) => Some(format!("{alert:?}")),
            Some(_) => None,
            None => e
                .downcast_ref::<io::Error>()
                .filter(|io| io.kind() == io::ErrorKind::InvalidData)
                .and_then(|io| {
                    io.to_string()
                        .strip_prefix("received fatal alert: ")
                        .map(str::to_owned)
                }),
        };
        if let Some(alert) = alert.filter(|a| CLIENT_CERT_ALERTS.contains(&a.as_str())) {
            return Some(alert);
        }
        next = e.source();
    }
    None
}

/// The file's bytes, if it holds a PEM block of kind `want` (any kind ending
/// so, for keys: "PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY").
fn read_pem(path: &Path, flag: &'static str, want: &'static str) -> Result<Vec<u8>, EtcdError> {
    let bytes = fs::read(path).map_err(|source| EtcdError::ReadFile {
        flag,
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let has_block = text.lines().any(|l| {
        l.strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|kind| kind.ends_with(want))
    });
    if !has_block {
        return Err(EtcdError::NotPem {
            flag,
            path: path.to_owned(),
            want,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        etcd: EtcdSettings,
    }

    fn settings(args: &[&str]) -> Result<EtcdSettings, clap::Error> {
        Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied())).map(|c| c.etcd)
    }

    #[test]
    fn the_password_never_shows_in_debug_output() {
        let s = settings(&[
            "--etcd-endpoints",
            "http://a:2379",
            "--etcd-username",
            "weft",
            "--etcd-password",
            "hunter2",
        ])
        .expect("valid flags");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn paired_flags_are_required_together() {
        for args in [
            &["--etcd-endpoints", "https://a", "--etcd-certfile", "c"][..],
            &["--etcd-endpoints", "https://a", "--etcd-keyfile", "k"][..],
            &["--etcd-endpoints", "http://a", "--etcd-username", "u"][..],
            &["--etcd-endpoints", "http://a", "--etcd-password", "p"][..],
        ] {
            assert!(settings(args).is_err(), "{args:?} accepted");
        }
    }

    #[test]
    fn schemes_must_match_the_tls_settings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let ca = ca.to_string_lossy().into_owned();
        let err = |args: &[&str]| {
            settings(args)
                .expect("flags parse")
                .connect_options()
                .err()
                .map(|e| e.to_string())
        };
        let e = err(&["--etcd-endpoints", "https://a:2379"]).expect("https without CA");
        assert!(e.contains("--etcd-cafile"), "{e}");
        let e = err(&["--etcd-endpoints", "http://a:2379", "--etcd-cafile", &ca])
            .expect("TLS over http");
        assert!(e.contains("http://a:2379"), "{e}");
        let e = err(&["--etcd-endpoints", "unix:///x"]).expect("unix socket");
        assert!(e.contains("unix:///x"), "{e}");
        assert_eq!(
            err(&["--etcd-endpoints", "https://a:2379", "--etcd-cafile", &ca]),
            None
        );
    }

    /// An error as etcd-client hands it over when the server's alert came
    /// through h2: a status around an io::Error holding only the text.
    fn alert_status(text: &str) -> etcd_client::Error {
        let io = io::Error::new(io::ErrorKind::InvalidData, text.to_owned());
        etcd_client::Error::GRpcStatus(tonic::Status::from_error(Box::new(io)))
    }

    #[test]
    fn a_refused_client_certificate_is_fatal_and_named() {
        let tls = settings(&[
            "--etcd-endpoints",
            "https://a:2379",
            "--etcd-cafile",
            "/etc/weft/ca.pem",
        ])
        .expect("flags parse");
        let e = tls.classify(alert_status("received fatal alert: BadCertificate"));
        assert!(e.is_fatal(), "{e}");
        assert!(
            e.to_string().contains("--etcd-certfile") && e.to_string().contains("BadCertificate"),
            "{e}"
        );
        let with_cert = settings(&[
            "--etcd-endpoints",
            "https://a:2379",
            "--etcd-cafile",
            "/etc/weft/ca.pem",
            "--etcd-certfile",
            "/etc/weft/client.pem",
            "--etcd-keyfile",
            "/etc/weft/client-key.pem",
        ])
        .expect("flags parse");
        let e = with_cert.classify(alert_status("received fatal alert: UnknownCA"));
        assert!(e.is_fatal(), "{e}");
        let text = e.to_string();
        assert!(text.contains("/etc/weft/client.pem"), "{text}");
        assert!(!text.contains("client-key.pem"), "{text}");
        // Anything else on the wire stays retryable: a closed connection,
        // an alert that is not about certificates, or no TLS configured.
        for retryable in [
            alert_status("connection closed"),
            alert_status("received fatal alert: InternalError"),
        ] {
            assert!(!with_cert.classify(retryable).is_fatal());
        }
        let plain = settings(&["--etcd-endpoints", "http://a:2379"]).expect("flags parse");
        assert!(
            !plain
                .classify(alert_status("received fatal alert: BadCertificate"))
                .is_fatal()
        );
    }

    #[test]
    fn endpoints_that_are_not_urls_are_refused_up_front() {
        for good in [
            "http://198.18.0.1:2379",
            "https://etcd-1.example:2379/",
            "198.18.0.1:2379",
            "http://[fd00::1]:2379",
            "http://localhost",
        ] {
            assert!(check_url(good).is_ok(), "{good} refused");
        }
        for bad in [
            "http://",
            "http://198.18.0.1:23x9",
            "http://198.18.0.1:2379/v3",
            "http://a b:2379",
            "http://user@host:2379",
            "198.18.0.1:99999",
            "http://[fd00::zz]:2379",
        ] {
            let e = check_url(bad).expect_err(bad);
            assert!(e.is_fatal());
            assert!(e.to_string().contains(bad), "{e}");
        }
        let e = settings(&["--etcd-endpoints", "http://198.18.0.1:2379,not a url"])
            .expect("flags parse")
            .connect_options()
            .expect_err("not a URL");
        assert!(e.to_string().contains("\"not a url\""), "{e}");
    }

    #[test]
    fn unreadable_and_non_pem_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let e = read_pem(&missing, "--etcd-cafile", "CERTIFICATE").expect_err("missing");
        assert!(
            e.to_string().contains("--etcd-cafile") && e.to_string().contains("missing.pem"),
            "{e}"
        );
        let key_as_cert = dir.path().join("key.pem");
        fs::write(
            &key_as_cert,
            "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n",
        )
        .expect("write");
        let e = read_pem(&key_as_cert, "--etcd-certfile", "CERTIFICATE").expect_err("a key");
        assert!(e.to_string().contains("no PEM CERTIFICATE block"), "{e}");
        assert!(read_pem(&key_as_cert, "--etcd-keyfile", "PRIVATE KEY").is_ok());
        let rsa = dir.path().join("rsa.pem");
        fs::write(
            &rsa,
            "-----BEGIN RSA PRIVATE KEY-----\nAA==\n-----END RSA PRIVATE KEY-----\n",
        )
        .expect("write");
        assert!(read_pem(&rsa, "--etcd-keyfile", "PRIVATE KEY").is_ok());
    }
}
