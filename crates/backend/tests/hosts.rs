//! One client and one connection limit per host: every `HttpBlob` and
//! `Registry` of one host, sharing one `Hosts`, shares its client and its
//! `max_connections`; different hosts do not share a limit.
//!
//! The server holds every gated request until the test opens the gate, and
//! the test waits for states (requests held at the server, readers blocked at
//! the limit), never for time: the only timeout is a deadline for failing.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use lazypull_backend::{ClientOptions, Hosts, HttpBlob, Registry, RetryPolicy};
use lazypull_source::RangeRead;

const DEADLINE: Duration = Duration::from_secs(20);

#[derive(Default)]
struct GateState {
    /// Gated requests at the server now, and the most there ever were.
    in_flight: usize,
    peak: usize,
    /// Gated requests answered.
    served: usize,
    open: bool,
}

/// Serves `data` by Range on any path, one request per connection. Range
/// requests other than the `bytes=0-0` size probe wait for the gate.
struct GateServer {
    port: u16,
    state: Arc<(Mutex<GateState>, Condvar)>,
}

impl GateServer {
    fn start(data: Arc<Vec<u8>>) -> GateServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new((Mutex::new(GateState::default()), Condvar::new()));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (st, data) = (st.clone(), data.clone());
                std::thread::spawn(move || serve(conn, &st, &data));
            }
        });
        GateServer { port, state }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.0.lock().unwrap()
    }

    fn open(&self) {
        self.lock().open = true;
        self.state.1.notify_all();
    }

    fn peak(&self) -> usize {
        self.lock().peak
    }

    fn served(&self) -> usize {
        self.lock().served
    }
}

fn serve(conn: TcpStream, st: &(Mutex<GateState>, Condvar), data: &[u8]) {
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut range = None;
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("range") {
                let v = v.trim().strip_prefix("bytes=").unwrap_or("");
                let (a, b) = v.split_once('-').unwrap();
                range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
            }
        }
    }
    let (a, b) = range.expect("a Range request");
    let gated = (a, b) != (0, 0);
    if gated {
        let (m, cv) = st;
        let mut g = m.lock().unwrap();
        g.in_flight += 1;
        g.peak = g.peak.max(g.in_flight);
        cv.notify_all();
        while !g.open {
            g = cv.wait(g).unwrap();
        }
    }
    let mut w = conn;
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nConnection: close\r\nContent-Range: bytes {a}-{b}/{}\r\nContent-Length: {}\r\n\r\n",
        data.len(),
        b - a + 1
    );
    let _ = w.write_all(head.as_bytes());
    let _ = w.write_all(&data[a..=b]);
    let _ = w.flush();
    if gated {
        let (m, cv) = st;
        let mut g = m.lock().unwrap();
        g.in_flight -= 1;
        g.served += 1;
        cv.notify_all();
    }
    let _ = w.shutdown(std::net::Shutdown::Both);
}

/// Waits until `cond` holds of (the servers' in-flight counts, the pool's
/// load); panics with `what` and the last state at the deadline.
fn wait_for(
    servers: &[&GateServer],
    hosts: &Hosts,
    what: &str,
    cond: impl Fn(&[usize], usize, usize) -> bool,
) {
    let start = Instant::now();
    loop {
        let in_flight: Vec<usize> = servers.iter().map(|s| s.lock().in_flight).collect();
        let load = hosts.load();
        let busy: usize = load.iter().map(|l| l.in_flight).sum();
        let waiting: usize = load.iter().map(|l| l.waiting).sum();
        if cond(&in_flight, busy, waiting) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "never got to {what}: servers hold {in_flight:?}, pool {load:?}"
        );
        // Wake on the next server event, or look again shortly for the
        // client side (the pool has no condition variable of its own).
        let s = servers[0];
        let g = s.lock();
        let _ = s.state.1.wait_timeout(g, Duration::from_millis(5)).unwrap();
    }
}

fn opts(max_connections: usize) -> ClientOptions {
    ClientOptions {
        max_connections,
        retry: RetryPolicy {
            attempts: 1,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(1),
        },
        request_timeout: 3 * DEADLINE,
        ..ClientOptions::default()
    }
}

fn data(len: usize) -> Arc<Vec<u8>> {
    Arc::new((0..len).map(|i| (i * 7 % 251) as u8).collect())
}

/// Opens the gates when dropped, so that a failing check does not leave the
/// readers waiting at a closed gate.
struct OpenOnDrop<'a>(&'a [&'a GateServer]);

impl Drop for OpenOnDrop<'_> {
    fn drop(&mut self) {
        for s in self.0 {
            s.open();
        }
    }
}

/// Reads 1000 bytes at `off` of each (reader, off), each on its own thread,
/// all at once, and checks them against `data`; `then` runs meanwhile, and
/// the `gates` open after it.
fn read_all(
    readers: &[(Arc<dyn RangeRead>, u64)],
    data: &[u8],
    gates: &[&GateServer],
    then: impl FnOnce(),
) {
    std::thread::scope(|s| {
        let _open = OpenOnDrop(gates);
        for (r, off) in readers {
            let off = *off as usize;
            s.spawn(move || {
                let mut buf = vec![0u8; 1000];
                r.read_exact_at(&mut buf, off as u64).unwrap();
                assert!(buf[..] == data[off..off + 1000]);
            });
        }
        then();
    });
}

#[test]
fn blobs_of_one_host_share_one_client_and_one_limit() {
    let d = data(100_000);
    let srv = GateServer::start(d.clone());
    let o = opts(2);
    let a: Arc<dyn RangeRead> = Arc::new(HttpBlob::open(&srv.url("/a"), &o).unwrap());
    let b: Arc<dyn RangeRead> = Arc::new(HttpBlob::open(&srv.url("/b"), &o).unwrap());
    // A registry on the same host, through a clone of the options, too.
    let reg = Registry::new(&srv.host(), "r", None, &o.clone()).unwrap();
    let c = reg.blob_reader(&format!("sha256:{}", "0".repeat(64)), d.len() as u64);
    assert_eq!(o.hosts.clients_created(), 1, "{:?}", o.hosts.load());

    // 6 reads at once, 2 per reader, 2 connections allowed to the host.
    let readers: Vec<_> = (0..6u64)
        .map(|i| {
            let r = [&a, &b, &c][i as usize % 3].clone();
            (r, i * 10_000)
        })
        .collect();
    read_all(&readers, &d, &[&srv], || {
        // Two at the server and the other four held by the pool's limit.
        wait_for(&[&srv], &o.hosts, "2 in flight, 4 waiting", |s, busy, w| {
            s[0] == 2 && busy == 2 && w == 4
        });
    });
    assert_eq!(srv.served(), 6);
    assert_eq!(srv.peak(), 2, "more than max_connections at once");
    let load = o.hosts.load();
    assert_eq!(load.len(), 1);
    assert_eq!(load[0].origin, format!("http://{}", srv.host()));
    assert_eq!((load[0].in_flight, load[0].waiting), (0, 0));
    assert_eq!(o.hosts.clients_created(), 1);

    // Options built afresh have a pool of their own, as before.
    let other = opts(2);
    let _d = HttpBlob::open(&srv.url("/d"), &other).unwrap();
    assert_eq!(other.hosts.clients_created(), 1);
    assert_eq!(o.hosts.clients_created(), 1);
}

#[test]
fn different_hosts_do_not_share_a_limit() {
    let d = data(50_000);
    let (s1, s2) = (GateServer::start(d.clone()), GateServer::start(d.clone()));
    let o = opts(1);
    let a: Arc<dyn RangeRead> = Arc::new(HttpBlob::open(&s1.url("/x"), &o).unwrap());
    let b: Arc<dyn RangeRead> = Arc::new(HttpBlob::open(&s2.url("/x"), &o).unwrap());
    assert_eq!(o.hosts.clients_created(), 2);
    let readers: Vec<_> = (0..4u64)
        .map(|i| {
            let r = if i % 2 == 0 { a.clone() } else { b.clone() };
            (r, i * 1000)
        })
        .collect();
    read_all(&readers, &d, &[&s1, &s2], || {
        // One request at each host at the same time, one waiting at each.
        wait_for(&[&s1, &s2], &o.hosts, "1 + 1 in flight", |s, busy, w| {
            s == [1, 1] && busy == 2 && w == 2
        });
        let load = o.hosts.load();
        assert!(
            load.iter().all(|l| (l.in_flight, l.waiting) == (1, 1)),
            "{load:?}"
        );
    });
    assert_eq!((s1.peak(), s2.peak()), (1, 1));
    assert_eq!((s1.served(), s2.served()), (2, 2));
}

#[test]
fn different_client_settings_get_different_clients() {
    let d = data(10_000);
    let srv = GateServer::start(d);
    let o = opts(2);
    let _a = HttpBlob::open(&srv.url("/a"), &o).unwrap();
    let _b = HttpBlob::open(
        &srv.url("/b"),
        &ClientOptions {
            max_connections: 3,
            ..o.clone()
        },
    )
    .unwrap();
    let _c = HttpBlob::open(
        &srv.url("/c"),
        &ClientOptions {
            // Not a client setting: the same client.
            retry: RetryPolicy::default(),
            insecure_hosts: vec!["elsewhere.example".into()],
            ..o.clone()
        },
    )
    .unwrap();
    assert_eq!(o.hosts.clients_created(), 2, "{:?}", o.hosts.load());
    let load = o.hosts.load();
    let mut limits: Vec<_> = load.iter().map(|l| l.max_connections).collect();
    limits.sort();
    assert_eq!(limits, [2, 3]);
}
