//! The TCP fault proxy against a local echo server: pass, cut, stall, slow, refuse.

use std::time::{Duration, Instant};

use outbox_testkit::proxy::FaultProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn roundtrip(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    s.write_all(b"ping").await.ok()?;
    let mut buf = [0u8; 4];
    match tokio::time::timeout(within, s.read_exact(&mut buf)).await {
        Ok(Ok(_)) => Some(buf.to_vec()),
        _ => None,
    }
}

#[tokio::test]
async fn the_proxy_forwards_cuts_stalls_slows_and_refuses() {
    let upstream = echo_server().await;
    let proxy = FaultProxy::start(&upstream).await.unwrap();
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(
        roundtrip(&mut c, Duration::from_secs(2)).await.as_deref(),
        Some(&b"ping"[..])
    );
    assert!(proxy.bytes_forwarded() >= 8);

    proxy.stall();
    assert_eq!(
        roundtrip(&mut c, Duration::from_millis(300)).await,
        None,
        "a stall let bytes through"
    );
    proxy.heal();
    let mut late = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut late))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&late, b"ping", "held bytes are delivered after healing");

    proxy.slow(Duration::from_millis(150));
    let t = Instant::now();
    assert!(roundtrip(&mut c, Duration::from_secs(2)).await.is_some());
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "slow mode did not delay both directions"
    );
    proxy.heal();

    proxy.cut();
    let mut buf = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "the connection survived a cut: {r:?}"
    );

    proxy.refuse();
    let mut c2 = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(
        roundtrip(&mut c2, Duration::from_millis(300)).await,
        None,
        "a refused connection worked"
    );
    proxy.heal();
    let mut c3 = TcpStream::connect(proxy.addr()).await.unwrap();
    assert!(roundtrip(&mut c3, Duration::from_secs(2)).await.is_some());
    assert!(proxy.accepted() >= 3);
}
