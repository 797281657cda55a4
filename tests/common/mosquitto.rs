//! A real mosquitto broker on a free loopback port, stopped on drop.

use super::ports::{free_port, listens_on};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Mosquitto {
    child: Child,
    /// The plain listener (anonymous clients: the tests' publishers).
    pub port: u16,
    /// The TLS listener, with [`Options::tls`].
    pub tls_port: Option<u16>,
    dir: tempfile::TempDir,
}

/// A second listener speaking TLS, beside the plain one.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// The CA whose certificates the broker accepts from clients.
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Clients must present a certificate the CA signed; its common name
    /// becomes their username (`use_identity_as_username`), which is what
    /// ACLs and [`Options::refuse_for`] apply to.
    pub require_certificate: bool,
}

/// Broker settings beyond the defaults of [`Mosquitto::start`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The text of an ACL file (mosquitto's `acl_file` syntax). Lines before
    /// any `user` line apply to anonymous clients, which is what tests use;
    /// e.g. `topic readwrite #` then `topic deny some/tree/#`. MQTT 5
    /// publishes the ACL denies are answered with reason code 0x87.
    pub acl: Option<String>,
    /// Subscription filters the broker refuses (SUBACK reason 0x87), by
    /// pattern (`site/#` refuses `site/+/x`). mosquitto's ACL file never
    /// refuses a SUBSCRIBE (it filters what is delivered instead), so this
    /// uses its dynamic-security plugin, shipped in the same package.
    pub refuse_subscriptions: Vec<String>,
    /// Usernames (certificate common names on a TLS listener that requires
    /// certificates) [`Self::refuse_subscriptions`] applies to, instead of
    /// anonymous clients.
    pub refuse_for: Vec<String>,
    /// A TLS listener on [`Mosquitto::tls_port`].
    pub tls: Option<TlsListener>,
    /// Lines added to mosquitto.conf, e.g. `max_packet_size 100000` or
    /// `log_type debug`.
    pub extra_config: String,
}

/// Debian installs the broker in /usr/sbin, which is not on every PATH.
fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("MOSQUITTO") {
        return path.into();
    }
    for candidate in ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    "mosquitto".into()
}

impl Mosquitto {
    /// Starts mosquitto with a config fit for load: no queue limit for
    /// offline persistent sessions (mosquitto drops QoS>0 messages past
    /// `max_queued_messages`, 1000 by default) and a large in-flight window.
    pub fn start() -> Self {
        Self::start_with(&Options::default())
    }

    /// [`Self::start`] with an ACL and extra configuration lines.
    pub fn start_with(options: &Options) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut extra = options.extra_config.clone();
        if let Some(acl) = &options.acl {
            let path = dir.path().join("acl");
            std::fs::write(&path, acl).expect("write the ACL file");
            extra.push_str(&format!("\nacl_file {}\n", path.display()));
        }
        if !options.refuse_subscriptions.is_empty() {
            let path = dir.path().join("dynamic-security.json");
            std::fs::write(
                &path,
                dynamic_security(&options.refuse_subscriptions, &options.refuse_for),
            )
            .expect("write the dynamic-security file");
            extra.push_str(&format!(
                "\nplugin {}\nplugin_opt_config_file {}\n",
                dynamic_security_plugin(),
                path.display()
            ));
        }
        for _attempt in 0..5 {
            let port = free_port();
            let tls_port = options.tls.as_ref().map(|_| free_port());
            let tls_listener = match (&options.tls, tls_port) {
                (Some(tls), Some(tls_port)) => format!(
                    "\nlistener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
                     require_certificate {}\nuse_identity_as_username {}\n",
                    tls.ca_file.display(),
                    tls.cert_file.display(),
                    tls.key_file.display(),
                    tls.require_certificate,
                    tls.require_certificate,
                ),
                _ => String::new(),
            };
            let conf = dir.path().join("mosquitto.conf");
            // `user root`: started as root, mosquitto would switch to its
            // own user, and a change of user clears the parent-death signal
            // (prctl(2)): a test process that died abnormally (librdkafka's
            // mock aborting it) left its brokers running.
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                     user root\n\
                     max_queued_messages 0\nmax_inflight_messages 0\n\
                     log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n{extra}\n\
                     {tls_listener}",
                ),
            )
            .expect("write mosquitto.conf");
            let mut child = spawn(&conf, &dir);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                // Its own socket, not just any answer: another process may
                // have taken the port, and then mosquitto exits.
                let tls_up = tls_port.is_none_or(|p| listens_on(child.id(), p));
                if listens_on(child.id(), port) && tls_up {
                    return Self {
                        child,
                        port,
                        tls_port,
                        dir,
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // Port taken in the meantime: try another.
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let log = std::fs::read_to_string(dir.path().join("mosquitto.log")).unwrap_or_default();
        panic!("mosquitto did not start; its log:\n{log}");
    }

    /// Asserts the broker saw `client_id` connect exactly once: the
    /// bridge was never disconnected (for a packet the broker refused, a
    /// missed keep-alive...) and had to reconnect.
    pub fn assert_connected_once(&self, client_id: &str) {
        let log = self.log();
        // "New client connected from 127.0.0.1:port as <id> (p2, c0, k5)."
        // The parenthesis keeps `bridge-1-1` from matching `bridge-1-10`.
        assert_eq!(
            log.matches(&format!(" as {client_id} (")).count(),
            1,
            "{client_id} did not connect exactly once:\n{log}"
        );
    }

    /// Stops the broker (SIGKILL: no goodbye to its clients), keeping its
    /// port and configuration for [`Self::restart`].
    /// The broker's process id (for CPU figures in benches).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the broker again on its port, after [`Self::stop`]. Panics if
    /// it does not listen within 10 s (the port taken meanwhile).
    pub fn restart(&mut self) {
        self.stop();
        let conf = self.dir.path().join("mosquitto.conf");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            self.child = spawn(&conf, &self.dir);
            while Instant::now() < deadline {
                let tls_up = self.tls_port.is_none_or(|p| listens_on(self.child.id(), p));
                if listens_on(self.child.id(), self.port) && tls_up {
                    return;
                }
                if let Ok(Some(_)) = self.child.try_wait() {
                    break; // The port is still in TIME_WAIT or taken: again.
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "mosquitto did not restart on port {}:\n{}",
            self.port,
            self.log()
        );
    }

    /// The broker's log, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

/// A dynamic-security configuration that lets clients do anything but
/// subscribe to `refused`: anonymous clients, or the `users` named.
fn dynamic_security(refused: &[String], users: &[String]) -> String {
    let acls: Vec<_> = refused
        .iter()
        .map(|topic| {
            serde_json::json!({"acltype": "subscribePattern", "topic": topic, "priority": 0, "allow": false})
        })
        .collect();
    let refused_role = serde_json::json!([{"rolename": "refused", "priority": 0}]);
    let clients: Vec<_> = users
        .iter()
        .map(|user| serde_json::json!({"username": user, "roles": refused_role}))
        .collect();
    let anonymous_roles = if users.is_empty() {
        refused_role
    } else {
        serde_json::json!([])
    };
    serde_json::json!({
        "defaultACLAccess": {"publishClientSend": true, "publishClientReceive": true, "subscribe": true, "unsubscribe": true},
        "clients": clients,
        "groups": [{"groupname": "anonymous", "roles": anonymous_roles}],
        "roles": [{"rolename": "refused", "acls": acls}],
        "anonymousGroup": "anonymous"
    })
    .to_string()
}

/// Where Debian's mosquitto package puts the plugin.
fn dynamic_security_plugin() -> String {
    glob::glob("/usr/lib/*/mosquitto_dynamic_security.so")
        .ok()
        .and_then(|mut paths| paths.find_map(Result::ok))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "mosquitto_dynamic_security.so".into())
}

/// Starts mosquitto with `conf`, appending its stderr to the log in `dir`.
fn spawn(conf: &std::path::Path, dir: &tempfile::TempDir) -> Child {
    // stderr, not `log_dest file`: stderr is unbuffered, so the log is
    // complete while mosquitto runs.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("mosquitto.log"))
        .expect("log file");
    let mut command = Command::new(binary());
    command
        .arg("-c")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    super::die_with_parent(&mut command);
    command.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot start mosquitto ({e}); install it with `apt-get install -y mosquitto` or set MOSQUITTO=/path/to/mosquitto"
        )
    })
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
