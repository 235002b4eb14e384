//! A minimal static file server for tests: serves the files of one directory
//! over HTTP/1.1 on 127.0.0.1 with `HEAD`, `GET` and single `Range: bytes=`
//! requests (206 / 416), keep-alive, one thread per connection. It stands in
//! for any web server or object store holding a lazypull blob directory.

use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// A running server; stops accepting when dropped.
pub struct StaticServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
}

impl StaticServer {
    /// Serves `root` on a free port of 127.0.0.1.
    pub fn start(root: &Path) -> io::Result<StaticServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let root = root.to_path_buf();
        let (stop2, requests2) = (stop.clone(), requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (root, requests) = (root.clone(), requests2.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &root, &requests);
                });
            }
        });
        Ok(StaticServer {
            addr,
            stop,
            requests,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn file_for(root: &Path, target: &str) -> Option<PathBuf> {
    let path = target.split('?').next()?.trim_start_matches('/');
    if path.is_empty()
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return None;
    }
    Some(root.join(path))
}

/// Parses `bytes=a-b` / `bytes=a-` against `size` into `[start, end)`;
/// `Err(())` for an unsatisfiable or malformed range.
fn parse_range(value: &str, size: u64) -> Result<(u64, u64), ()> {
    let spec = value.trim().strip_prefix("bytes=").ok_or(())?;
    let (a, b) = spec.split_once('-').ok_or(())?;
    let start: u64 = a.trim().parse().map_err(|_| ())?;
    let end = if b.trim().is_empty() {
        size
    } else {
        b.trim()
            .parse::<u64>()
            .map_err(|_| ())?
            .saturating_add(1)
            .min(size)
    };
    if start >= size || start >= end {
        return Err(());
    }
    Ok((start, end))
}

fn serve(conn: TcpStream, root: &Path, requests: &AtomicU64) -> io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let mut range = None;
        let mut close = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("range") {
                    range = Some(v.trim().to_owned());
                } else if k.eq_ignore_ascii_case("connection")
                    && v.trim().eq_ignore_ascii_case("close")
                {
                    close = true;
                }
            }
        }
        requests.fetch_add(1, Ordering::Relaxed);
        let head_only = method == "HEAD";
        let file = if method == "GET" || head_only {
            file_for(root, target).and_then(|p| std::fs::File::open(p).ok())
        } else {
            None
        };
        let size = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len());
        match (file, size) {
            (Some(mut f), Some(size)) => {
                let (status, start, end) = match range.as_deref().map(|r| parse_range(r, size)) {
                    None => ("200 OK", 0, size),
                    Some(Ok((s, e))) => ("206 Partial Content", s, e),
                    Some(Err(())) => {
                        write!(
                            out,
                            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{size}\r\nContent-Length: 0\r\n\r\n"
                        )?;
                        out.flush()?;
                        // A client that asked to close waits for EOF.
                        if close {
                            return Ok(());
                        }
                        continue;
                    }
                };
                let mut head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\n",
                    end - start
                );
                if status.starts_with("206") {
                    head.push_str(&format!(
                        "Content-Range: bytes {start}-{}/{size}\r\n",
                        end - 1
                    ));
                }
                head.push_str("\r\n");
                out.write_all(head.as_bytes())?;
                if !head_only {
                    f.seek(SeekFrom::Start(start))?;
                    io::copy(&mut (&mut f).take(end - start), &mut out)?;
                }
            }
            _ => {
                let body = b"not found\n";
                write!(
                    out,
                    "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )?;
                if !head_only {
                    out.write_all(body)?;
                }
            }
        }
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_clamp() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok((0, 10)));
        assert_eq!(parse_range("bytes=90-", 100), Ok((90, 100)));
        assert_eq!(parse_range("bytes=90-500", 100), Ok((90, 100)));
        assert!(parse_range("bytes=100-", 100).is_err());
        assert!(parse_range("bytes=5-1", 100).is_err());
        assert!(parse_range("items=0-1", 100).is_err());
    }

    #[test]
    fn serves_files_and_ranges_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("blob"), b"0123456789").unwrap();
        let server = StaticServer::start(dir.path()).unwrap();
        let get = |req: &str| -> String {
            let mut s = TcpStream::connect(server.addr()).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let r = get("GET /blob HTTP/1.1\r\nRange: bytes=2-4\r\nConnection: close\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 206") && r.ends_with("\r\n\r\n234"),
            "{r}"
        );
        assert!(r.contains("Content-Range: bytes 2-4/10"), "{r}");
        let r = get("HEAD /blob HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(
            r.contains("Content-Length: 10") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
        let r = get("GET /../etc/passwd HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = get("GET /blob HTTP/1.1\r\nRange: bytes=20-\r\nConnection: close\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 416"), "{r}");
        assert_eq!(server.requests(), 4);
    }
}
