use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::support::{AppOptions, TestDb, assert_problem, spawn_app, spawn_app_with};

/// A TCP proxy to PostgreSQL that can cut every connection and refuse new ones.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, _) = watch::channel(0u64);
        let (up2, cut2) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut rx = cut2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect("127.0.0.1:5432").await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = rx.changed() => {}
                    }
                });
            }
        });
        Proxy { port, up, cut }
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.send_modify(|v| *v += 1);
    }

    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn livez_answers_while_the_process_runs() {
    let app = spawn_app().await;
    let r = app.get("/livez", None).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn readyz_is_503_while_the_database_is_unreachable_and_200_once_it_is_back() {
    let db = TestDb::new().await;
    let proxy = Proxy::start().await;
    let url = format!("postgres://postgres@127.0.0.1:{}/{}", proxy.port, db.name);
    let app = spawn_app_with(AppOptions {
        app_db_url: Some(url),
        ..Default::default()
    })
    .await;
    let r = app.get("/readyz", None).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    proxy.down();
    let r = app.get("/readyz", None).await;
    let body = assert_problem(r, 503).await;
    assert_ne!(body["checks"]["postgres"], "ok");
    // A protected route fails cleanly, never with driver text.
    let r = app
        .post_json(
            "/auth/login",
            &serde_json::json!({"email": "a@b.c", "password": "x"}),
            None,
        )
        .await;
    let body = assert_problem(r, 503).await;
    assert!(!body.to_string().to_lowercase().contains("sqlx"));

    proxy.up();
    let mut ok = false;
    for _ in 0..50 {
        if app.get("/readyz", None).await.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "readyz did not recover without a restart");
}

#[tokio::test]
async fn readyz_is_503_when_migrations_are_missing() {
    let app = spawn_app().await;
    app.exec("delete from _sqlx_migrations").await;
    let r = app.get("/readyz", None).await;
    assert_eq!(r.status(), 503);
}

#[tokio::test]
async fn openapi_document_lists_the_endpoints() {
    let app = spawn_app().await;
    let r = app.get("/openapi.json", None).await;
    assert_eq!(r.status(), 200);
    let doc: serde_json::Value = r.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for p in [
        "/auth/login",
        "/auth/refresh",
        "/auth/logout",
        "/me",
        "/livez",
        "/readyz",
    ] {
        assert!(
            doc["paths"].get(p).is_some(),
            "{p} missing from the OpenAPI document"
        );
    }
}
