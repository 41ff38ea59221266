//! SIGTERM to any service binary exits 0 within 10 s while connections are
//! open (issue: foundation).

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use portico_tests::client::{Ws, token};
use portico_tests::servers::{EdgePorts, Service};

const LIMIT: Duration = Duration::from_secs(10);

fn assert_clean_exit(svc: &mut Service) {
    let start = Instant::now();
    svc.proc.signal("TERM");
    let status = svc
        .proc
        .wait_exit(LIMIT)
        .unwrap_or_else(|| panic!("{} still running after {LIMIT:?}", svc.proc.name));
    assert_eq!(
        status.code(),
        Some(0),
        "{} exit status; log:\n{}",
        svc.proc.name,
        svc.proc.log()
    );
    eprintln!("{} stopped in {:?}", svc.proc.name, start.elapsed());
}

/// An idle keep-alive HTTP connection, left open.
fn open_http(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    s
}

#[tokio::test]
async fn chat_drains_websockets_on_sigterm() {
    let (mut svc, port) = Service::chat(&[("PORTICO_CHAT__DEMO", "true".into())]);
    let mut ws = Ws::connect(port, &token("alice")).await.expect("connect");
    assert_eq!(ws.recv().await["type"], "welcome");
    let _idle = open_http(port);
    let waiter = tokio::task::spawn_blocking(move || {
        assert_clean_exit(&mut svc);
        svc
    });
    // Clients are told to reconnect elsewhere (1001 going away).
    assert_eq!(ws.expect_close().await, 1001);
    waiter.await.unwrap();
}

#[test]
fn jobs_exits_cleanly_on_sigterm() {
    let (mut svc, port) = Service::jobs();
    let _idle = open_http(port);
    assert_clean_exit(&mut svc);
}

#[test]
fn gateway_exits_cleanly_on_sigterm() {
    let edge = EdgePorts::free();
    let mut svc = Service::gateway(&[], &edge.env(), &edge);
    let _idle = TcpStream::connect(("127.0.0.1", edge.https)).unwrap();
    let _idle_http = open_http(edge.http);
    assert_clean_exit(&mut svc);
}

#[test]
fn up_exits_cleanly_on_sigterm() {
    let (mut svc, edge) = portico_tests::servers::up();
    let _idle = TcpStream::connect(("127.0.0.1", edge.https)).unwrap();
    assert_clean_exit(&mut svc);
}
