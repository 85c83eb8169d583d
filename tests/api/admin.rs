use serde_json::{Value, json};

use crate::support::{TestApp, assert_problem, spawn_app, spawn_app_with_flags};

/// Makes one saga stuck: the shipment is refused and the release keeps failing.
async fn stuck_saga(app: &TestApp, token: &str, key: &str) {
    app.shipment_faults(json!({"failNext": 1, "failStatus": 422, "endpoint": "create"}))
        .await;
    app.catalog_faults(json!({"failNext": 1000, "endpoint": "release"}))
        .await;
    let r = app
        .place(token, key, json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert!(r.status() == 202 || r.status() == 409);
}

#[tokio::test]
async fn admin_endpoints_need_the_admin_role() {
    let app = spawn_app().await;
    let (_, customer) = app.customer("cust@example.com").await;
    let (_, admin) = app.admin().await;
    for path in [
        "/admin/sagas",
        "/admin/audit",
        "/admin/sagas/00000000-0000-0000-0000-000000000000",
    ] {
        assert_problem(app.get(path, None).await, 401).await;
        assert_problem(app.get(path, Some(&customer)).await, 403).await;
    }
    let r = app
        .post_json(
            "/admin/sagas/retry",
            &json!({"state": "stuck", "limit": 10}),
            Some(&customer),
        )
        .await;
    assert_problem(r, 403).await;
    assert_eq!(app.get("/admin/sagas", Some(&admin)).await.status(), 200);
    assert_problem(
        app.get("/admin/sagas/00000000-0000-0000-0000-000000000000", Some(&admin))
            .await,
        404,
    )
    .await;
    let p = assert_problem(app.get("/admin/sagas?state=lost", Some(&admin)).await, 422).await;
    assert_eq!(p["field"], "state");
    let p = assert_problem(app.get("/admin/sagas?colour=red", Some(&admin)).await, 422).await;
    assert_eq!(p["field"], "colour");
}

#[tokio::test]
async fn a_stuck_saga_is_found_re_driven_after_recovery_and_finishes() {
    let app = spawn_app().await;
    app.product(1, 10, "1.00");
    let (_, customer) = app.customer("cust@example.com").await;
    let (admin_id, admin) = app.admin().await;
    stuck_saga(&app, &customer, "k1").await;
    app.eventually_eq("select state from sagas", "stuck", 30).await;

    let page: Value = app.get_json("/admin/sagas?state=stuck", Some(&admin)).await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    let s = &items[0];
    assert_eq!(s["step"], "release_reservation");
    assert_eq!(s["errorClass"], "http_5xx");
    assert!(s["lastError"].as_str().unwrap().contains("release_reservation"));
    let id = s["sagaID"].as_str().unwrap().to_string();
    let filtered: Value = app
        .get_json(
            "/admin/sagas?step=release_reservation&errorClass=http_5xx",
            Some(&admin),
        )
        .await;
    assert_eq!(filtered["items"].as_array().unwrap().len(), 1);
    let none: Value = app
        .get_json("/admin/sagas?state=stuck&olderThanSeconds=3600", Some(&admin))
        .await;
    assert_eq!(none["items"].as_array().unwrap().len(), 0);

    let detail: Value = app.get_json(&format!("/admin/sagas/{id}"), Some(&admin)).await;
    let history = detail["history"].as_array().unwrap();
    assert_eq!(history[0]["step"], "reserve_inventory");
    assert_eq!(history[0]["outcome"], "succeeded");
    assert!(history[0]["idempotencyKey"].as_str().unwrap().contains(&id));
    let ship = history.iter().find(|h| h["step"] == "create_shipment").unwrap();
    assert_eq!(
        (ship["outcome"].as_str(), ship["downstreamStatus"].as_i64()),
        (Some("failed"), Some(422))
    );
    let releases = history
        .iter()
        .filter(|h| h["step"] == "release_reservation")
        .count();
    assert_eq!(releases, 12);
    assert_eq!(history.last().unwrap()["kind"], "compensation");

    // The catalog recovers; ops re-drive the saga, which then finishes its compensation.
    app.catalog_faults(json!([])).await;
    let r = app
        .post_json(&format!("/admin/sagas/{id}/retry"), &json!({}), Some(&admin))
        .await;
    assert_eq!(r.status(), 200);
    app.eventually_eq("select state from sagas", "failed", 10).await;
    assert_eq!(app.reservations().await[0]["status"], "released");
    // Terminal now: a repeated retry is refused with the state, and changes nothing.
    let again = app
        .post_json(&format!("/admin/sagas/{id}/retry"), &json!({}), Some(&admin))
        .await;
    let p = assert_problem(again, 409).await;
    assert_eq!(p["state"], "failed");
    let audit: Value = app.get_json("/admin/audit", Some(&admin)).await;
    let rows = audit["items"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["actor"], admin_id);
    assert_eq!(rows[0]["action"], "saga.retry");
    assert_eq!(rows[0]["target"], format!("saga:{id}"));
    assert_eq!(rows[0]["before"]["state"], "stuck");
    assert_eq!(rows[0]["after"]["state"], "compensating");
}

#[tokio::test]
async fn a_bulk_dry_run_changes_nothing_and_the_real_run_re_drives_each_match() {
    let app = spawn_app().await;
    app.product(1, 10, "1.00");
    let (_, customer) = app.customer("cust@example.com").await;
    let (_, admin) = app.admin().await;
    stuck_saga(&app, &customer, "k1").await;
    stuck_saga(&app, &customer, "k2").await;
    app.eventually_eq("select count(*)::text from sagas where state = 'stuck'", "2", 40)
        .await;
    let before: Vec<(String, i32)> = sqlx::query_as("select state, attempt from sagas order by saga_id")
        .fetch_all(&app.db)
        .await
        .unwrap();

    let dry: Value = app
        .post_json(
            "/admin/sagas/retry",
            &json!({"state": "stuck", "limit": 1, "dryRun": true}),
            Some(&admin),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(dry["matched"], 2);
    assert_eq!(dry["retried"].as_array().unwrap().len(), 1);
    assert_eq!(dry["dryRun"], true);
    let after: Vec<(String, i32)> = sqlx::query_as("select state, attempt from sagas order by saga_id")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(before, after, "a dry run changed sagas");
    assert_eq!(app.count("select count(*) from audit_log").await, 0);

    app.catalog_faults(json!([])).await;
    let real: Value = app
        .post_json(
            "/admin/sagas/retry",
            &json!({"state": "stuck", "limit": 10}),
            Some(&admin),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(real["matched"], 2);
    assert_eq!(real["retried"].as_array().unwrap().len(), 2);
    app.eventually_eq("select count(*)::text from sagas where state = 'failed'", "2", 10)
        .await;
    assert_eq!(
        app.count("select count(*) from audit_log where action = 'sagas.bulk_retry'")
            .await,
        1
    );
    let bad = app
        .post_json(
            "/admin/sagas/retry",
            &json!({"state": "stuck", "limit": 0}),
            Some(&admin),
        )
        .await;
    assert_eq!(assert_problem(bad, 422).await["field"], "limit");
}

#[tokio::test]
async fn an_admin_cancel_compensates_a_running_saga() {
    let app = spawn_app_with_flags(&["--order-wait-ms", "100"]).await;
    app.product(1, 10, "1.00");
    app.catalog_faults(json!({"latencyMs": 500, "endpoint": "reserve"}))
        .await;
    let (_, customer) = app.customer("cust@example.com").await;
    let (_, admin) = app.admin().await;
    let r = app
        .place(&customer, "k", json!([{"productID": 1, "quantity": 2}]))
        .await;
    assert_eq!(r.status(), 202);
    let id: String = sqlx::query_scalar("select saga_id::text from sagas")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let c = app
        .post_json(&format!("/admin/sagas/{id}/cancel"), &json!({}), Some(&admin))
        .await;
    assert_eq!(c.status(), 200);
    app.eventually_eq("select state from sagas", "compensated", 10)
        .await;
    app.eventually_eq("select status from orders", "cancelled", 5)
        .await;
    assert_eq!(
        app.sim_get(&app.catalog_url, "/sim/products/1").await["stock"],
        10
    );
    let again = app
        .post_json(&format!("/admin/sagas/{id}/cancel"), &json!({}), Some(&admin))
        .await;
    assert_eq!(assert_problem(again, 409).await["state"], "compensated");
}

/// Hostile admin parameters get a clear 422, never a 500 or a dropped connection: an
/// `olderThanSeconds` past what PostgreSQL's interval arithmetic holds, and a crafted cursor whose
/// number overflows.
#[tokio::test]
async fn overflowing_filters_and_cursors_are_refused_not_500() {
    let app = spawn_app().await;
    let (_, token) = app.admin().await;
    for value in ["1e300", "1e12", "3155760001", "-1", "NaN", "inf"] {
        let r = app
            .get(&format!("/admin/sagas?olderThanSeconds={value}"), Some(&token))
            .await;
        let p = assert_problem(r, 422).await;
        assert_eq!(p["field"], "olderThanSeconds", "{value}: {p}");
        let r = app
            .post_json(
                "/admin/sagas/retry",
                &json!({"state": "stuck", "olderThanSeconds": value.parse::<f64>().ok(), "limit": 10, "dryRun": true}),
                Some(&token),
            )
            .await;
        assert!(
            r.status() == 422 || (value == "NaN" || value == "inf"),
            "{value}: {}",
            r.status()
        );
    }
    // A hundred years is still a filter.
    let r = app
        .get("/admin/sagas?olderThanSeconds=3155760000", Some(&token))
        .await;
    assert_eq!(r.status(), 200);
    // "s:<micros>:<uuid>" with micros far beyond any timestamp (and beyond i128 once in ns).
    use base64::Engine as _;
    for micros in [
        "170141183460469231731687303715884105727",
        "99999999999999999999999",
    ] {
        let cursor = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("s:{micros}:00000000-0000-0000-0000-000000000000"));
        let r = app
            .get(&format!("/admin/sagas?cursor={cursor}"), Some(&token))
            .await;
        let p = assert_problem(r, 422).await;
        assert_eq!(p["field"], "cursor", "{p}");
    }
}
