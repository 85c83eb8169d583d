//! Loopback ports and servers.

use tokio_util::sync::CancellationToken;

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
