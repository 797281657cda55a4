//! Loopback ports for the servers tests start: picking a free one, and
//! telling whether the intended child process, not some other one, got it.
//!
//! A port is free when picked, but any process may bind it before the
//! child does. So a start does not take "something answers on the port"
//! for success: it waits until the child itself holds the listening socket,
//! or exits (then the caller tries another port).

use std::net::TcpListener;

/// Where [`free_port`] looks: below Linux's ephemeral range (32768 and
/// up), which the kernel hands to port-0 binds and outgoing connections.
/// librdkafka's mock brokers bind port 0, and a mock broker taken down and
/// up again must get its old port back: once a test server picked that
/// port while it was down, and librdkafka aborted the whole test process
/// ("Failed to create mock broker listener").
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port nothing listens on, never the same twice in this
/// process (the kernel may hand a just-closed port out again, and two
/// Kafka nodes once got the same controller port that way), outside the
/// ephemeral range (see [`PORTS`]). Processes start at different places
/// in the range, so that test binaries and benches running side by side
/// rarely try the same ports.
pub fn free_port() -> u16 {
    static NEXT: std::sync::Mutex<Option<u16>> = std::sync::Mutex::new(None);
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    let span = PORTS.end - PORTS.start;
    let mut port = next.unwrap_or(PORTS.start + (std::process::id() % u32::from(span)) as u16);
    for _ in 0..span {
        let candidate = port;
        port = if port + 1 >= PORTS.end {
            PORTS.start
        } else {
            port + 1
        };
        if TcpListener::bind(("127.0.0.1", candidate)).is_ok() {
            *next = Some(port);
            return candidate;
        }
    }
    panic!("no free loopback port in {PORTS:?}");
}

/// Whether process `pid` holds a socket listening on TCP `port` (IPv4),
/// from `/proc/net/tcp` and the process's open files.
pub fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    // `sl local_address rem_address st ... inode`: address as hex
    // `ADDR:PORT`, state 0A is LISTEN, the inode is the tenth field.
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit_once(':')?.1;
            let listening = *fields.get(3)? == "0A";
            let inode = fields.get(9)?;
            (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| format!("socket:[{inode}]"))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}
