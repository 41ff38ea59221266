//! The harness itself: real Redis and PostgreSQL start, answer, restart and
//! go away with the test.

use portico_tests::servers::{Postgres, Redis};

#[test]
fn redis_starts_restarts_and_stops() {
    let mut r = Redis::start();
    let addr = ("127.0.0.1", r.port);
    assert!(std::net::TcpStream::connect(addr).is_ok());
    r.stop();
    assert!(std::net::TcpStream::connect(addr).is_err(), "stopped");
    r.restart();
    assert!(
        std::net::TcpStream::connect(addr).is_ok(),
        "back on the same port"
    );
}

#[tokio::test]
async fn postgres_starts_and_keeps_data_across_restart() {
    let mut pg = Postgres::start();
    let query = |url: String| async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        client
    };
    let c = query(pg.url()).await;
    c.batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (42);")
        .await
        .unwrap();
    drop(c);
    pg.stop();
    assert!(
        tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
            .await
            .is_err(),
        "stopped"
    );
    pg.restart();
    let c = query(pg.url()).await;
    let v: i32 = c.query_one("SELECT v FROM t", &[]).await.unwrap().get(0);
    assert_eq!(v, 42);
}
