//! A real nginx on a loopback port, optionally expecting a PROXY protocol header and/or serving
//! TLS, with an access log that records `$proxy_protocol_addr`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, wait_until, Workdir};

pub const NGINX: &str = "/usr/sbin/nginx";

pub struct NginxOptions<'a> {
    /// `listen ... proxy_protocol`: every connection must start with a PROXY header.
    pub proxy_protocol: bool,
    /// Serve HTTPS with this certificate and key.
    pub tls: Option<(&'a Path, &'a Path)>,
    /// Listen address (default 127.0.0.1).
    pub ip: &'a str,
    /// Basic authentication with this htpasswd file (`user:{PLAIN}password` lines).
    pub auth_basic: Option<&'a Path>,
    /// The port to listen on (0: a free one); a restarted server takes its old port.
    pub port: u16,
}

impl Default for NginxOptions<'_> {
    fn default() -> Self {
        NginxOptions {
            proxy_protocol: false,
            tls: None,
            ip: "127.0.0.1",
            auth_basic: None,
            port: 0,
        }
    }
}

pub struct Nginx {
    pub port: u16,
    child: Child,
    pub access_log: PathBuf,
    /// The same requests in the format packaging/fail2ban/filter.d/sallyport-nginx-auth.conf
    /// reads (the PROXY protocol's client address first).
    pub fail2ban_log: PathBuf,
    /// Document root; `index.html` holds [`Nginx::PAGE`].
    pub root: PathBuf,
}

impl Nginx {
    pub const PAGE: &'static str =
        "<html><body>served by the real nginx behind Sallyport</body></html>\n";

    pub fn start(dir: &Workdir, name: &str, opts: NginxOptions) -> Nginx {
        assert!(
            Path::new(NGINX).exists(),
            "{NGINX} is missing: run the tests with scripts/test.sh, which installs nginx-light"
        );
        let base = dir.path().join(name);
        let root = base.join("www");
        std::fs::create_dir_all(&root).unwrap();
        for t in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(base.join("tmp").join(t)).unwrap();
        }
        std::fs::write(root.join("index.html"), Self::PAGE).unwrap();
        let port = if opts.port == 0 {
            free_port()
        } else {
            opts.port
        };
        let access_log = base.join("access.log");
        let fail2ban_log = base.join("fail2ban-access.log");
        let auth = match opts.auth_basic {
            Some(file) => format!(
                "auth_basic \"sallyport test\"; auth_basic_user_file {};",
                file.display()
            ),
            None => String::new(),
        };
        let mut listen = format!("{}:{port}", opts.ip);
        let mut tls = String::new();
        if let Some((cert, key)) = opts.tls {
            listen.push_str(" ssl");
            tls = format!(
                "ssl_certificate {}; ssl_certificate_key {}; ssl_protocols TLSv1.2 TLSv1.3;",
                cert.display(),
                key.display()
            );
        }
        if opts.proxy_protocol {
            listen.push_str(" proxy_protocol");
        }
        let b = base.display();
        let config = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {b}/nginx.pid;\nerror_log stderr info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  client_body_temp_path {b}/tmp/body; proxy_temp_path {b}/tmp/proxy;\n\
               fastcgi_temp_path {b}/tmp/fastcgi; uwsgi_temp_path {b}/tmp/uwsgi; scgi_temp_path {b}/tmp/scgi;\n\
               log_format pp 'pp=$proxy_protocol_addr:$proxy_protocol_port remote=$remote_addr \"$request\" $status $body_bytes_sent';\n\
               log_format sallyport '$proxy_protocol_addr - $remote_user [$time_local] \"$request\" $status $body_bytes_sent';\n\
               access_log {} pp;\n  access_log {} sallyport;\n  client_max_body_size 100m;\n\
               server {{ listen {listen}; {tls} root {}; location / {{ {auth} }} }}\n}}\n",
            access_log.display(),
            fail2ban_log.display(),
            root.display()
        );
        let conf = base.join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let mut child = Command::new(NGINX)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&base)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nginx");
        let stderr = child.stderr.take().unwrap();
        let tag = format!("[nginx {name}]");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{tag} {line}");
            }
        });
        let addr = std::net::SocketAddr::new(opts.ip.parse().unwrap(), port);
        assert!(
            wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(
                addr
            )
            .is_ok()),
            "nginx did not start listening on {addr}"
        );
        Nginx {
            port,
            child,
            access_log,
            fail2ban_log,
            root,
        }
    }

    /// Kills the server (by its PID) and waits for it to end.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn access_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the real curl; returns (exit success, stdout, stderr).
pub fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "20"])
        .args(args)
        .output()
        .expect("run curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
