//! Loopback ports and servers.

use tokio_util::sync::CancellationToken;

/// A free port for a server that binds it only seconds later (a Kafka broker's JVM): below the
/// kernel's ephemeral range (32768 and up), so no outgoing connection of the parallel tests takes
/// it meanwhile, as one did to a port from [`free_port`] (the broker then failed to bind).
pub fn free_port_for_later() -> u16 {
    for _ in 0..1000 {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32000")
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Serves a router on 127.0.0.1:0 until `shutdown`; returns its base URL.
pub async fn serve_router(router: axum::Router, shutdown: CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(ostore_orders::sim::serve(listener, router, shutdown));
    format!("http://{addr}")
}
