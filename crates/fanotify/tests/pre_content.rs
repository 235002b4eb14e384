//! fanotify pre-content events against this host's kernel (Linux 6.14+,
//! ext4): what the fanotify transport will rely on, each behaviour shown
//! with a real reader process.

use std::fs;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lazypull_fanotify::group::Pending;
use lazypull_fanotify::{Group, Response};

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "these tests mark files with fanotify pre-content events: run them as root"
    );
}

/// A sparse 1 MiB file on a file system that supports pre-content events
/// (/var/tmp: this machine's root ext4; tmpfs does not).
fn sparse_file(dir: &Path) -> PathBuf {
    let path = dir.join("blob");
    let f = fs::File::create(&path).unwrap();
    f.set_len(1 << 20).unwrap();
    path
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lpfan")
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// A reader process: `dd` reading 4 KiB at 64 KiB of `path`.
fn reader(path: &Path) -> Child {
    Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["bs=4096", "skip=16", "count=1", "status=none"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running dd")
}

/// The events that arrive within 10 s (at least one), or a failure.
fn wait_events(group: &Group) -> Vec<Pending> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 4096];
    loop {
        match group.read_events(&mut buf) {
            Ok(ev) if !ev.is_empty() => return ev,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("reading events: {e}"),
        }
        assert!(Instant::now() < deadline, "no event within 10 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn output(child: Child) -> (bool, Vec<u8>, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A sparse file, a group marking it, and a reader process waiting on it.
struct Scene {
    _dir: tempfile::TempDir,
    group: Group,
    child: Child,
}

fn marked_file_and_a_reader() -> Scene {
    require_root();
    let dir = tempdir();
    let path = sparse_file(dir.path());
    let group = Group::new(true).unwrap();
    group.mark_pre_access(&path).unwrap();
    let child = reader(&path);
    Scene {
        _dir: dir,
        group,
        child,
    }
}

/// The reader's read failed with EIO.
fn assert_denied_with_eio(child: Child) {
    let (ok, stdout, err) = output(child);
    assert!(!ok && stdout.is_empty(), "the read failed: {err}");
    assert!(err.contains("Input/output error"), "with EIO: {err}");
}

#[test]
fn a_read_waits_for_its_range_to_be_filled_through_the_events_fd() {
    let Scene { _dir, group, child } = marked_file_and_a_reader();
    let pid = child.id() as i32;
    let mut events = wait_events(&group);
    let p = events.remove(0);
    assert!(p.event.is_pre_access(), "{:?}", p.event);
    assert_eq!(p.event.pid, pid, "the reader's pid");
    let (off, count) = p
        .event
        .range
        .expect("a pre-content event carries its range");
    assert!(
        off <= 65536 && off + count >= 65536 + 4096,
        "the range {off}+{count} covers the read"
    );
    // Fill exactly the range through the event's own fd: it raises no event
    // (or this would wait on itself).
    let file = fs::File::from(p.file.expect("an fd"));
    let fill: Vec<u8> = (0..count).map(|i| ((off + i) % 251) as u8).collect();
    file.write_all_at(&fill, off).unwrap();
    group.respond(p.event.fd, Response::Allow).unwrap();
    drop(file);
    let (ok, stdout, err) = output(child);
    assert!(ok, "{err}");
    let want: Vec<u8> = (65536..65536 + 4096u64).map(|i| (i % 251) as u8).collect();
    assert!(stdout == want, "the reader got the filled bytes");
}

#[test]
fn a_denied_read_fails_with_the_errno_given() {
    let Scene { _dir, group, child } = marked_file_and_a_reader();
    for p in wait_events(&group) {
        group
            .respond(p.event.fd, Response::DenyErrno(libc::EIO))
            .unwrap();
    }
    assert_denied_with_eio(child);
}

/// Why the group fd must outlive the daemon (the fd store): a group that
/// closes with an event pending lets the reader through, to the hole: zeros.
#[test]
fn a_group_closed_with_an_event_pending_lets_the_reader_read_zeros() {
    let Scene { _dir, group, child } = marked_file_and_a_reader();
    let events = wait_events(&group);
    assert!(!events.is_empty());
    drop(events);
    drop(group);
    let (ok, stdout, err) = output(child);
    assert!(ok, "{err}");
    assert_eq!(stdout, vec![0u8; 4096], "fails open: zeros from the hole");
}

/// The kernel decides at open whether a file raises pre-content events: a
/// file opened before the mark reads (and writes) without any.
#[test]
fn a_file_opened_before_the_mark_raises_no_events() {
    require_root();
    let dir = tempdir();
    let path = sparse_file(dir.path());
    let early = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let group = Group::new(true).unwrap();
    group.mark_pre_access(&path).unwrap();
    early.write_all_at(b"filled early", 0).unwrap();
    let mut got = [0u8; 12];
    early.read_exact_at(&mut got, 0).unwrap();
    assert_eq!(&got, b"filled early");
    let mut buf = vec![0u8; 4096];
    match group.read_events(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("expected no event, got {other:?}"),
    }
    // A file opened after the mark does raise them (the reader above).
    let mut late = fs::File::open(&path).unwrap();
    let t = std::thread::spawn(move || {
        let mut b = [0u8; 12];
        late.read_exact(&mut b).map(|_| b)
    });
    let events = wait_events(&group);
    for p in &events {
        group.respond(p.event.fd, Response::Allow).unwrap();
    }
    assert_eq!(&t.join().unwrap().unwrap(), b"filled early");
}

/// How a successor fails closed: it holds the same group (a dup, as the fd
/// store keeps), answers by fd number an event its predecessor read and never
/// answered (here the predecessor's copy of the group and the event's fd are
/// gone), and a number with no pending event is refused with ENOENT.
#[test]
fn a_successor_on_the_same_group_answers_its_predecessors_event_by_number() {
    let Scene {
        _dir,
        group: predecessor,
        child,
    } = marked_file_and_a_reader();
    let parked = predecessor.as_fd().try_clone_to_owned().unwrap();
    let mut events = wait_events(&predecessor);
    let p = events.remove(0);
    let number = p.event.fd;
    // The predecessor dies: its group fd and the event's fd close.
    drop(p);
    drop(events);
    drop(predecessor);
    // The reader still waits: the group lives on in the parked fd.
    std::thread::sleep(Duration::from_millis(100));
    let mut child = child;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the reader was let through"
    );
    let successor = Group::from_fd(parked);
    // It cannot know what the event asked for (nothing was recorded here),
    // so it denies it with EIO rather than let the reader read a hole.
    let err = successor
        .respond(number + 1000, Response::DenyErrno(libc::EIO))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    successor
        .respond(number, Response::DenyErrno(libc::EIO))
        .unwrap();
    assert_denied_with_eio(child);
}

/// The whole failover of the fanotify transport on the kernel: a daemon takes
/// on two events and records one before it dies; its successor, holding the
/// same group, fills and allows the recorded one (its reader gets the bytes)
/// and denies the other by number (its reader gets EIO, not zeros).
#[test]
fn a_successor_finishes_recorded_events_and_denies_the_rest() {
    use lazypull_fanotify::journal::{recover, Journal, Record};
    require_root();
    let dir = tempdir();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for p in [&a, &b] {
        fs::File::create(p).unwrap().set_len(1 << 20).unwrap();
    }
    // Opened before the marks: fills through it raise no events.
    let filler = fs::OpenOptions::new().write(true).open(&a).unwrap();
    let group = Group::new(true).unwrap();
    let parked = group.as_fd().try_clone_to_owned().unwrap();
    group.mark_pre_access(&a).unwrap();
    group.mark_pre_access(&b).unwrap();
    let journal_path = dir.path().join("journal");
    let (mut journal, inherited) = Journal::open(&journal_path).unwrap();
    assert!(inherited.is_empty());
    let (reader_a, reader_b) = (reader(&a), reader(&b));
    let (pid_a, pid_b) = (reader_a.id() as i32, reader_b.id() as i32);
    let mut taken = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while taken.len() < 2 {
        taken.extend(wait_events(&group));
        assert!(Instant::now() < deadline, "two events");
    }
    let of = |pid: i32| taken.iter().find(|p| p.event.pid == pid).unwrap();
    let ev_a = &of(pid_a).event;
    let (off, count) = ev_a.range.unwrap();
    journal
        .begin(&Record {
            fd: ev_a.fd,
            offset: off,
            count,
            key: "a".into(),
        })
        .unwrap();
    let _ = of(pid_b);
    // The daemon dies before filling anything.
    drop(taken);
    drop(journal);
    drop(group);

    let successor = Group::from_fd(parked);
    let (mut journal, inherited) = Journal::open(&journal_path).unwrap();
    assert_eq!(inherited.len(), 1, "{inherited:?}");
    let done = recover(&successor, &inherited, 1024, |r| {
        assert_eq!(r.key, "a");
        let fill: Vec<u8> = (0..r.count).map(|i| ((r.offset + i) % 251) as u8).collect();
        filler.write_all_at(&fill, r.offset)
    })
    .unwrap();
    journal.clear().unwrap();
    assert_eq!((done.allowed, done.denied_unknown), (1, 1), "{done:?}");
    let (ok, stdout, err) = output(reader_a);
    assert!(ok, "{err}");
    let want: Vec<u8> = (65536..65536 + 4096u64).map(|i| (i % 251) as u8).collect();
    assert!(stdout == want, "reader a got the filled bytes");
    assert_denied_with_eio(reader_b);
}
