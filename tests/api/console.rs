//! The ops console (`/console`): sessions, CSRF, escaping, and the stuck-saga drill in a real
//! browser (headless Chromium driven by `tests/console/drill.mjs`).

use std::time::Duration;

use serde_json::json;

use crate::support::{AppOptions, TestApp, spawn_app, spawn_app_with, spawn_app_with_flags};
use ostore_orders::auth::Role;

const ADMIN: (&str, &str) = ("ops@example.com", "password-123");

/// A client that shows redirects instead of following them.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// An `application/x-www-form-urlencoded` body.
fn form(pairs: &[(&str, &str)]) -> String {
    use ostore_orders::console::html::url_enc;
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", url_enc(k), url_enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Signs in through the console's form; returns the session token from the cookie.
async fn console_login(app: &TestApp, email: &str, password: &str) -> reqwest::Response {
    console_login_from(app, &app.base, email, password).await
}

/// Signs in through the console's form as posted from a page of `origin`.
async fn console_login_from(app: &TestApp, origin: &str, email: &str, password: &str) -> reqwest::Response {
    client()
        .post(app.url("/console/login"))
        .header("origin", origin)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("email", email), ("password", password)]))
        .send()
        .await
        .unwrap()
}

/// GETs a console page in the session `token`.
async fn get_page(app: &TestApp, path: &str, token: &str) -> reqwest::Response {
    client()
        .get(app.url(path))
        .header("cookie", format!("ostore_console={token}"))
        .send()
        .await
        .unwrap()
}

/// The text of a console page read in the session `token`.
async fn page_text(app: &TestApp, path: &str, token: &str) -> String {
    get_page(app, path, token).await.text().await.unwrap()
}

fn session_of(resp: &reqwest::Response) -> String {
    let cookie = resp
        .headers()
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()
        .unwrap()
        .to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(cookie.contains(attr), "cookie {cookie} lacks {attr}");
    }
    cookie
        .split(';')
        .next()
        .unwrap()
        .strip_prefix("ostore_console=")
        .unwrap()
        .to_string()
}

/// Posts a console form from the console's own pages in the session `token`.
async fn submit(app: &TestApp, path: &str, token: &str, form: &[(&str, &str)]) -> reqwest::Response {
    post_form(app, path, token, &app.base, form).await
}

async fn post_form(
    app: &TestApp,
    path: &str,
    token: &str,
    origin: &str,
    form: &[(&str, &str)],
) -> reqwest::Response {
    client()
        .post(app.url(path))
        .header("cookie", format!("ostore_console={token}"))
        .header("origin", origin)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(self::form(form))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn console_pages_need_an_admin_session_and_forms_need_the_session_csrf_token() {
    let app = spawn_app().await;
    app.create_user(ADMIN.0, ADMIN.1, Role::Admin).await;
    app.create_user("cust@example.com", "password-123", Role::User)
        .await;

    let r = client().get(app.url("/console/sagas")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/console/login");
    assert_eq!(
        r.headers()["content-security-policy"],
        ostore_orders::console::CSP
    );

    // A customer gets no session.
    let r = console_login(&app, "cust@example.com", "password-123").await;
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("set-cookie").is_none());
    // Wrong password: the API's answer, as a page.
    let r = console_login(&app, ADMIN.0, "wrong").await;
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("invalid email or password"));
    // A sign-in posted from another site is refused.
    let r = console_login_from(&app, "https://evil.example", ADMIN.0, ADMIN.1).await;
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("set-cookie").is_none());

    let r = console_login(&app, ADMIN.0, ADMIN.1).await;
    assert_eq!(r.status(), 303);
    let token = session_of(&r);
    let csrf = ostore_orders::console::csrf_of(&token);
    let r = get_page(&app, "/console/sagas", &token).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-security-policy"],
        ostore_orders::console::CSP
    );
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    let page = r.text().await.unwrap();
    assert!(page.contains(&csrf), "forms carry the session's CSRF token");
    assert!(!page.contains("<script"), "the console runs no script");

    // A stuck-free saga id is enough: refused requests must not reach it.
    let id = uuid::Uuid::now_v7();
    let path = format!("/console/sagas/{id}/retry");
    let reason = ("reason", "drill");
    let r = submit(&app, &path, &token, &[("csrf", "forged"), reason]).await;
    assert_eq!(r.status(), 403, "a wrong CSRF token is refused");
    let r = submit(&app, &path, &token, &[reason]).await;
    assert_eq!(r.status(), 403, "a missing CSRF token is refused");
    let r = post_form(
        &app,
        &path,
        &token,
        "https://evil.example",
        &[("csrf", &csrf), reason],
    )
    .await;
    assert_eq!(r.status(), 403, "a post from another origin is refused");
    let r = submit(&app, &path, &token, &[("csrf", &csrf), ("reason", "  ")]).await;
    assert_eq!(r.status(), 422, "a reason is required");
    let r = submit(&app, &path, &token, &[("csrf", &csrf), reason]).await;
    assert_eq!(r.status(), 404, "checks passed: the saga is looked up");
    assert_eq!(app.count("select count(*) from audit_log").await, 0);

    // Bad filter input: a clear message, nothing else.
    let r = get_page(&app, "/console/sagas?state=lost", &token).await;
    assert_eq!(r.status(), 422);
    assert!(r.text().await.unwrap().contains("state must be one of"));

    // Signing out ends the session at once.
    let r = submit(&app, "/console/logout", &token, &[("csrf", &csrf)]).await;
    assert_eq!(r.status(), 303);
    let r = get_page(&app, "/console/sagas", &token).await;
    assert_eq!(
        r.status(),
        303,
        "a signed-out session is sent back to the sign-in form"
    );
}

#[tokio::test]
async fn hostile_payloads_and_audit_values_are_shown_escaped() {
    let app = spawn_app().await;
    app.create_user(ADMIN.0, ADMIN.1, Role::Admin).await;
    app.exec("insert into audit_log (actor, action, target) values (1, 'x', '<script>alert(1)</script>')")
        .await;
    sqlx::query(
        "insert into dead_letters (topic, payload, reason) values ('t', convert_to('<img src=x onerror=alert(2)>', 'UTF8'), '\"><b>r</b>')",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let token = session_of(&console_login(&app, ADMIN.0, ADMIN.1).await);
    for (path, raw, escaped) in [
        (
            "/console/audit",
            "<script>alert(1)",
            "&lt;script&gt;alert(1)&lt;/script&gt;",
        ),
        (
            "/console/pipeline",
            "<img src=x",
            "&lt;img src=x onerror=alert(2)&gt;",
        ),
        ("/console/pipeline", "<b>r</b>", "&quot;&gt;&lt;b&gt;r&lt;/b&gt;"),
    ] {
        let page = page_text(&app, path, &token).await;
        assert!(!page.contains(raw), "{path} shows {raw} unescaped");
        assert!(page.contains(escaped), "{path} lacks {escaped}");
    }
}

#[tokio::test]
async fn the_stuck_saga_drill_passes_in_a_real_browser() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/console");
    assert!(
        std::path::Path::new(dir)
            .join("node_modules/playwright-core")
            .exists(),
        "playwright-core is not installed in {dir}: run scripts/setup"
    );
    let chromium = std::env::var("CHROMIUM_PATH").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "no Chromium at {chromium}: run scripts/setup (Debian package chromium)"
    );
    let app = spawn_app_with(AppOptions {
        kafka: true,
        ..Default::default()
    })
    .await;
    app.product(1, 10, "5.00");
    app.create_user(ADMIN.0, ADMIN.1, Role::Admin).await;
    let (_, customer) = app.customer("cust@example.com").await;
    // The shipper refuses the shipment, and the catalog keeps failing the release: stuck.
    app.shipment_faults(json!({"failNext": 1, "failStatus": 422, "endpoint": "create"}))
        .await;
    app.catalog_faults(json!({"failNext": 1000, "endpoint": "release"}))
        .await;
    let r = app
        .place(&customer, "drill-1", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert!(r.status() == 202 || r.status() == 409);
    app.eventually_eq("select state from sagas", "stuck", 60).await;
    let saga_id: uuid::Uuid = sqlx::query_scalar("select saga_id from sagas")
        .fetch_one(&app.db)
        .await
        .unwrap();
    // A second order waits: the shipper answers 503 with Retry-After: 600, so the saga's next
    // attempt is ten minutes away (this PUT replaces the shipper's faults; the catalog's stay).
    app.shipment_faults(
        json!({"failNext": 1, "failStatus": 503, "retryAfterSeconds": 600, "endpoint": "create"}),
    )
    .await;
    let r = app
        .place(&customer, "drill-2", json!([{"productID": 1, "quantity": 2}]))
        .await;
    assert_eq!(r.status(), 202, "the order waits for its shipment");
    app.eventually_eq(
        "select count(*)::text from sagas where state = 'running' and next_attempt_at > now() + interval '5 minutes'",
        "1",
        30,
    )
    .await;
    let waiting_id: uuid::Uuid = sqlx::query_scalar("select saga_id from sagas where state = 'running'")
        .fetch_one(&app.db)
        .await
        .unwrap();

    // A tracking event that could not be applied, with a hostile payload: shown as text, and a
    // replay is refused with the reason.
    sqlx::query(
        r#"insert into dead_letters (topic, partition, "offset", payload, reason)
           values ('shipments.tracking-events', 0, 7, convert_to('{"eventID": "<script>alert(1)</script>"}', 'UTF8'),
                   'malformed TrackingEvent: missing field `orderID`')"#,
    )
    .execute(&app.db)
    .await
    .unwrap();

    let out = tokio::process::Command::new("node")
        .arg("drill.mjs")
        .current_dir(dir)
        .env("CONSOLE_BASE", &app.base)
        .env("ADMIN_EMAIL", ADMIN.0)
        .env("ADMIN_PASSWORD", ADMIN.1)
        .env("CATALOG_URL", &app.catalog_url)
        .env("SAGA_ID", saga_id.to_string())
        .env("WAITING_SAGA_ID", waiting_id.to_string())
        .env("SHIPMENTS_URL", &app.shipments_url)
        .env("CHROMIUM_PATH", &chromium)
        .kill_on_drop(true)
        .output()
        .await
        .expect("node runs (Node.js 20 is on the machine)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the browser drill failed\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("drill: done"));

    // What the browser saw is what the database holds.
    assert_eq!(
        app.count("select count(*) from sagas where state = 'failed'")
            .await,
        1
    );
    assert_eq!(
        app.count("select count(*) from sagas where state = 'completed'")
            .await,
        1
    );
    for (id, why) in [
        (saga_id, "catalog release endpoint back after the outage (drill)"),
        (waiting_id, "shipper back; no need to wait ten minutes (drill)"),
    ] {
        let (action, reason): (String, String) =
            sqlx::query_as("select action, after->>'reason' from audit_log where target = $1")
                .bind(format!("saga:{id}"))
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert_eq!(action, "saga.retry");
        assert_eq!(reason, why);
    }
    let reservations: Vec<serde_json::Value> = app.reservations().await;
    let statuses: Vec<&str> = reservations
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert!(
        statuses.contains(&"released") && statuses.contains(&"active"),
        "{statuses:?}"
    );
    let shipped: i64 = sqlx::query_scalar("select count(*) from orders where shipment_id is not null")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(shipped, 1);
}

#[tokio::test]
async fn bulk_re_drive_shows_its_dry_run_before_the_real_run_and_every_action_keeps_its_reason() {
    let app = spawn_app().await;
    app.product(1, 10, "5.00");
    app.create_user(ADMIN.0, ADMIN.1, Role::Admin).await;
    let (_, customer) = app.customer("cust@example.com").await;
    app.shipment_faults(json!({"failNext": 3, "failStatus": 422, "endpoint": "create"}))
        .await;
    app.catalog_faults(json!({"failNext": 1000, "endpoint": "release"}))
        .await;
    for key in ["b1", "b2", "b3"] {
        let r = app
            .place(&customer, key, json!([{"productID": 1, "quantity": 1}]))
            .await;
        assert!(r.status() == 202 || r.status() == 409);
    }
    app.eventually_eq("select count(*)::text from sagas where state = 'stuck'", "3", 60)
        .await;
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar("select saga_id from sagas order by created_at")
        .fetch_all(&app.db)
        .await
        .unwrap();
    let token = session_of(&console_login(&app, ADMIN.0, ADMIN.1).await);
    let csrf = ostore_orders::console::csrf_of(&token);
    let bulk = |mode: &'static str| {
        vec![
            ("csrf", csrf.clone()),
            ("mode", mode.to_string()),
            ("state", "stuck".to_string()),
            ("step", String::new()),
            ("errorClass", "http_5xx".to_string()),
            ("olderThanSeconds", String::new()),
            ("limit", "100".to_string()),
            ("reason", "catalog releases again".to_string()),
        ]
    };

    // The dry run lists what would be re-driven, changes nothing, and offers the real run.
    let form = bulk("dry-run");
    let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = submit(&app, "/console/sagas/retry", &token, &pairs).await;
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    assert!(page.contains("Dry run: nothing was changed"));
    for id in &ids {
        assert!(page.contains(&id.to_string()), "the dry run lists {id}");
    }
    assert!(
        page.contains(r#"name="mode" value="run""#),
        "the real run is offered"
    );
    assert!(
        page.contains("catalog releases again"),
        "the reason is carried to the real run"
    );
    assert_eq!(app.count("select count(*) from audit_log").await, 0);
    assert_eq!(
        app.count("select count(*) from sagas where state = 'stuck'")
            .await,
        3
    );

    // The catalog is back. One saga is cancelled (a reason is required), the rest bulk re-driven.
    let r = app
        .http
        .delete(format!("{}/sim/faults", app.catalog_url))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let cancel = format!("/console/sagas/{}/cancel", ids[0]);
    let r = submit(&app, &cancel, &token, &[("csrf", &csrf), ("reason", "")]).await;
    assert_eq!(r.status(), 422);
    assert_eq!(app.count("select count(*) from audit_log").await, 0);
    let r = submit(
        &app,
        &cancel,
        &token,
        &[("csrf", &csrf), ("reason", "customer asked")],
    )
    .await;
    assert_eq!(r.status(), 303);
    let to = r.headers()["location"].to_str().unwrap().to_string();
    assert!(
        to.starts_with(&format!("/console/sagas/{}?audit=", ids[0])),
        "{to}"
    );
    let page = page_text(&app, &to, &token).await;
    assert!(page.contains(r#"id="written""#) && page.contains("customer asked"));

    let form = bulk("run");
    let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = submit(&app, "/console/sagas/retry", &token, &pairs).await;
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("Re-drove <strong>2</strong> of the <strong>2</strong>"),
        "{page}"
    );
    assert!(page.contains("The audit entry written") && page.contains("sagas.bulk_retry"));
    app.eventually_eq("select count(*)::text from sagas where state = 'failed'", "3", 60)
        .await;
    let reasons: Vec<(String, String)> =
        sqlx::query_as("select action, after->>'reason' from audit_log order by id")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(
        reasons,
        [
            ("saga.cancel".to_string(), "customer asked".to_string()),
            (
                "sagas.bulk_retry".to_string(),
                "catalog releases again".to_string()
            )
        ]
    );

    // A finished saga: the console says so and changes nothing.
    let r = submit(&app, &cancel, &token, &[("csrf", &csrf), ("reason", "again")]).await;
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("nothing can change it any more"));
    assert_eq!(app.count("select count(*) from audit_log").await, 2);
}

#[tokio::test]
async fn a_saga_page_links_its_trace_to_the_configured_viewer() {
    let app = spawn_app_with_flags(&["--trace-ui-url", "https://traces.example/trace/{traceID}?x=1"]).await;
    app.product(1, 10, "5.00");
    app.create_user(ADMIN.0, ADMIN.1, Role::Admin).await;
    let (_, customer) = app.customer("cust@example.com").await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = app
        .place(&customer, "t1", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert_eq!(r.status(), 201);
    let saga_id: uuid::Uuid = sqlx::query_scalar("select saga_id from sagas")
        .fetch_one(&app.db)
        .await
        .unwrap();
    // The context the saga keeps when the service exports traces (tests export none).
    sqlx::query("update sagas set trace_context = $1")
        .bind(json!({"traceparent": format!("00-{trace_id}-00f067aa0ba902b7-01")}))
        .execute(&app.db)
        .await
        .unwrap();
    let token = session_of(&console_login(&app, ADMIN.0, ADMIN.1).await);
    let page = page_text(&app, &format!("/console/sagas/{saga_id}"), &token).await;
    assert!(
        page.contains(&format!(r#"href="https://traces.example/trace/{trace_id}?x=1""#)),
        "the trace link is missing:\n{page}"
    );
    assert!(page.contains("completed"));
    assert!(
        page.contains("OrderCreated"),
        "the saga's outbox events are listed"
    );
}
