use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{AppOptions, TestApp, assert_problem, spawn_app, spawn_app_with, spawn_app_with_flags};

#[tokio::test]
async fn an_order_completes_with_catalog_prices_and_a_shipment() {
    let app = spawn_app().await;
    app.product(1, 10, "19.99");
    app.product(2, 10, "5.00");
    let (uid, token) = app.customer("ann@example.com").await;
    let r = app
        .place(
            &token,
            "k-1",
            json!([{"productID": 1, "quantity": 2}, {"productID": 2, "quantity": 3}]),
        )
        .await;
    assert_eq!(r.status(), 201);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    let id = body["orderID"].as_i64().unwrap();
    assert_eq!(loc, format!("/orders/{id}"));
    assert_eq!(body["status"], "confirmed");
    assert_eq!(body["totalAmount"], "54.98");
    assert_eq!(body["currency"], "USD");
    assert!(body["shipmentID"].as_str().unwrap().len() > 3);
    assert!(body["orderDate"].as_str().unwrap().contains('T'));

    let got: Value = app.get_json(&loc, Some(&token)).await;
    assert_eq!(got["userID"], uid);
    assert_eq!(got["status"], "confirmed");
    assert_eq!(got["shipmentID"], body["shipmentID"]);
    let items = got["orderItems"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["price"], "19.99");
    assert_eq!(items[1]["price"], "5.00");
    assert!(items[0]["orderItemID"].is_i64());

    let p1 = app.sim_get(&app.catalog_url, "/sim/products/1").await;
    assert_eq!(
        (p1["stock"].as_i64(), p1["reserved"].as_i64()),
        (Some(8), Some(2))
    );
    assert_eq!(app.reservations().await.len(), 1);
    assert_eq!(app.sim_shipments().await.len(), 1);
    app.eventually_eq(
        &format!("select state from sagas where order_id = {id}"),
        "completed",
        5,
    )
    .await;
    // Each step's outcome is in the history, in order.
    let steps: Vec<String> = sqlx::query_scalar("select step from saga_steps order by id")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(steps, ["reserve_inventory", "persist_order", "create_shipment"]);
    let events: Vec<String> = sqlx::query_scalar("select event_type from outbox order by id")
        .fetch_all(&app.db)
        .await
        .unwrap();
    for e in [
        "SagaStarted",
        "OrderCreated",
        "StepSucceeded",
        "OrderConfirmed",
        "SagaCompleted",
    ] {
        assert!(
            events.iter().any(|x| x == e),
            "{e} missing from the outbox: {events:?}"
        );
    }
}

#[tokio::test]
async fn a_stock_out_lists_each_product_and_places_no_order() {
    let app = spawn_app().await;
    app.product(1, 1, "10.00");
    app.product(2, 50, "1.00");
    let (_, token) = app.customer("bo@example.com").await;
    let r = app
        .place(&token, "k-1", json!([{"productID": 1, "quantity": 5}, {"productID": 2, "quantity": 1}, {"productID": 77, "quantity": 2}]))
        .await;
    let body = assert_problem(r, 409).await;
    let mut unavailable = body["unavailable"].as_array().unwrap().clone();
    unavailable.sort_by_key(|u| u["productID"].as_i64());
    assert_eq!(
        unavailable,
        vec![
            json!({"productID": 1, "requested": 5, "available": 1}),
            json!({"productID": 77, "requested": 2, "available": 0})
        ]
    );
    assert!(body.get("orderID").is_none());
    let list: Value = app.get_json("/orders", Some(&token)).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    assert_eq!(app.count("select count(*) from orders").await, 0);
    assert!(app.reservations().await.iter().all(|r| r["status"] != "active"));
    let p2 = app.sim_get(&app.catalog_url, "/sim/products/2").await;
    assert_eq!(p2["stock"], 50);
    app.eventually_eq("select state from sagas", "failed", 5).await;
}

#[tokio::test]
async fn two_catalog_503s_are_retried_and_reserve_exactly_once() {
    let app = spawn_app().await;
    app.product(1, 10, "3.00");
    app.catalog_faults(json!({"failNext": 2, "endpoint": "reserve"}))
        .await;
    let (_, token) = app.customer("cy@example.com").await;
    let r = app
        .place(&token, "k-1", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert_eq!(r.status(), 201);
    let res = app.reservations().await;
    assert_eq!(res.len(), 1);
    let calls: i64 = res[0]["calls"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_i64().unwrap())
        .sum();
    assert_eq!(
        calls, 3,
        "two faulted calls and one that reserved, all with one key: {res:?}"
    );
    let outcomes: Vec<String> =
        sqlx::query_scalar("select outcome from saga_steps where step = 'reserve_inventory' order by id")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(outcomes, ["retry_scheduled", "retry_scheduled", "succeeded"]);
    let p = app.sim_get(&app.catalog_url, "/sim/products/1").await;
    assert_eq!(p["stock"], 9);
}

#[tokio::test]
async fn a_fatal_shipment_refusal_releases_stock_and_cancels_the_order() {
    let app = spawn_app().await;
    app.product(1, 10, "3.00");
    app.shipment_faults(json!({"failNext": 1, "failStatus": 422, "endpoint": "create"}))
        .await;
    let (_, token) = app.customer("di@example.com").await;
    let r = app
        .place(&token, "k-1", json!([{"productID": 1, "quantity": 4}]))
        .await;
    let body = assert_problem(r, 409).await;
    let id = body["orderID"].as_i64().expect("the 409 names the order");
    assert_eq!(body["orderStatus"], "cancelled");
    // The customer gets a fixed, classified text; the shipper's answer (its status, its body, the
    // internal URL) is for operators only.
    let customer_text = "the shipment could not be arranged: it was refused";
    assert_eq!(body["detail"], customer_text, "{body}");
    let got: Value = app.get_json(&format!("/orders/{id}"), Some(&token)).await;
    assert_eq!(got["status"], "cancelled");
    assert_eq!(got["statusReason"], customer_text, "{got}");
    app.eventually_eq("select state from sagas", "failed", 5).await;
    let operators: String = sqlx::query_scalar("select failure->>'detail' from sagas")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(
        operators.contains("422"),
        "operators keep the detail: {operators}"
    );
    let reasons: Vec<String> = sqlx::query_scalar(
        "select payload->'data'->>'reason' from outbox where event_type = 'OrderCancelled'",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(reasons, [customer_text]);
    let res = app.reservations().await;
    assert_eq!(res.len(), 1);
    assert_eq!(res[0]["status"], "released");
    assert_eq!(
        app.sim_get(&app.catalog_url, "/sim/products/1").await["stock"],
        10
    );
    app.eventually_eq("select state from sagas", "failed", 5).await;
    let events: Vec<String> = sqlx::query_scalar("select event_type from outbox order by id")
        .fetch_all(&app.db)
        .await
        .unwrap();
    for e in [
        "StepFailed",
        "CompensationStarted",
        "CompensationSucceeded",
        "OrderCancelled",
        "SagaFailed",
    ] {
        assert!(events.iter().any(|x| x == e), "{e} missing: {events:?}");
    }
}

#[tokio::test]
async fn a_compensation_that_keeps_failing_leaves_the_saga_stuck_with_its_reason() {
    let app = spawn_app().await;
    app.product(1, 10, "3.00");
    app.shipment_faults(json!({"failNext": 1, "failStatus": 422, "endpoint": "create"}))
        .await;
    app.catalog_faults(json!({"failNext": 1000, "endpoint": "release"}))
        .await;
    let (_, token) = app.customer("ed@example.com").await;
    let r = app
        .place(&token, "k-1", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert!(r.status() == 202 || r.status() == 409, "{}", r.status());
    app.eventually_eq("select state from sagas", "stuck", 30).await;
    let (class, err): (Option<String>, Option<String>) =
        sqlx::query_as("select last_error_class, last_error from sagas")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(class.as_deref(), Some("http_5xx"));
    assert!(
        err.unwrap()
            .contains("release_reservation failed after 12 attempts")
    );
    assert_eq!(
        app.count("select count(*) from outbox where event_type = 'SagaStuck'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_slow_catalog_gets_202_and_the_order_completes_later() {
    let app = spawn_app_with_flags(&["--order-wait-ms", "200"]).await;
    app.product(1, 10, "3.00");
    app.catalog_faults(json!({"latencyMs": 800, "endpoint": "reserve"}))
        .await;
    let (_, token) = app.customer("fi@example.com").await;
    let r = app
        .place(&token, "k-1", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "pending");
    let pending: Value = app.get_json(&loc, Some(&token)).await;
    assert_eq!(pending["status"], "pending");
    // Replaying the key while it runs gives the same 202.
    let again = app
        .place(&token, "k-1", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert_eq!(again.status(), 202);
    app.eventually_eq(
        &format!("select status from orders where order_id = {}", body["orderID"]),
        "confirmed",
        10,
    )
    .await;
    let done: Value = app.get_json(&loc, Some(&token)).await;
    assert_eq!(done["totalAmount"], "3.00");
    // After it completed, the key still replays the first answer: the same 202, body for body
    // (not the order as it is now, which GET shows).
    let replayed = app
        .place(&token, "k-1", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert_eq!(replayed.status(), 202);
    assert_eq!(replayed.headers()["location"].to_str().unwrap(), loc);
    assert_eq!(replayed.json::<Value>().await.unwrap(), body);
    assert_eq!(again.json::<Value>().await.unwrap(), body);
    assert_eq!(body["shipmentID"], Value::Null);
    assert_eq!(body["orderItems"][0]["quantity"], 1);
}

#[tokio::test]
async fn stock_refused_after_a_202_leaves_a_readable_rejected_order() {
    let app = spawn_app_with_flags(&["--order-wait-ms", "150"]).await;
    app.product(1, 0, "3.00");
    app.catalog_faults(json!({"latencyMs": 700, "endpoint": "reserve"}))
        .await;
    let (_, token) = app.customer("gi@example.com").await;
    let r = app
        .place(&token, "k-1", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let id: i64 = loc.rsplit('/').next().unwrap().parse().unwrap();
    app.eventually_eq(
        &format!("select status from orders where order_id = {id}"),
        "rejected",
        10,
    )
    .await;
    let got: Value = app.get_json(&loc, Some(&token)).await;
    assert_eq!(got["status"], "rejected");
}

#[tokio::test]
async fn a_total_beyond_numeric_10_2_is_422_naming_total_amount_and_releases_stock() {
    let app = spawn_app().await;
    app.product(1, 10, "99999999.99");
    let (_, token) = app.customer("ha@example.com").await;
    let r = app
        .place(&token, "k-1", json!([{"productID": 1, "quantity": 2}]))
        .await;
    let body = assert_problem(r, 422).await;
    assert_eq!(body["field"], "totalAmount");
    assert_eq!(app.count("select count(*) from orders").await, 0);
    assert_eq!(app.count("select count(*) from order_items").await, 0);
    let res = app.reservations().await;
    assert_eq!(res[0]["status"], "released");
}

#[tokio::test]
async fn a_repeated_key_replays_and_a_different_body_is_refused() {
    let app = spawn_app().await;
    app.product(1, 10, "2.50");
    app.product(2, 10, "1.00");
    let (_, ann) = app.customer("ia@example.com").await;
    let (_, bob) = app.customer("ib@example.com").await;
    let items = json!([{"productID": 1, "quantity": 2}]);
    let first = app.place(&ann, "same-key", items.clone()).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let replay = app.place(&ann, "same-key", items.clone()).await;
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.json::<Value>().await.unwrap(), first);
    let other = app
        .place(&ann, "same-key", json!([{"productID": 2, "quantity": 2}]))
        .await;
    let p = assert_problem(other, 422).await;
    assert_eq!(p["field"], "Idempotency-Key");
    // Another user's identical key is independent.
    let bobs = app.place(&bob, "same-key", items.clone()).await;
    assert_eq!(bobs.status(), 201);
    let bobs: Value = bobs.json().await.unwrap();
    assert_ne!(bobs["orderID"], first["orderID"]);
    assert_eq!(app.count("select count(*) from orders").await, 2);
    assert_eq!(app.reservations().await.len(), 2);
}

#[tokio::test]
async fn twenty_concurrent_requests_with_one_key_place_one_order() {
    let app = spawn_app().await;
    app.product(1, 100, "1.00");
    app.catalog_faults(json!({"latencyMs": 200, "endpoint": "reserve"}))
        .await;
    let (_, token) = app.customer("ja@example.com").await;
    let items = json!([{"productID": 1, "quantity": 1}]);
    let futs = (0..20).map(|_| app.place(&token, "one-key", items.clone()));
    let answers = futures::future::join_all(futs).await;
    let mut ok = 0;
    for a in answers {
        match a.status().as_u16() {
            201 => ok += 1,
            409 => {
                let p = assert_problem(a, 409).await;
                assert_eq!(p["type"], "/problems/request-in-flight");
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!(ok >= 1);
    assert_eq!(app.count("select count(*) from orders").await, 1);
    assert_eq!(app.count("select count(*) from sagas").await, 1);
    assert_eq!(app.reservations().await.len(), 1);
}

#[tokio::test]
async fn another_customers_order_is_invisible_and_cannot_be_cancelled() {
    let app = spawn_app().await;
    app.product(1, 10, "1.00");
    let (_, ann) = app.customer("ka@example.com").await;
    let (_, bob) = app.customer("kb@example.com").await;
    let r = app
        .place(&ann, "k", json!([{"productID": 1, "quantity": 1}]))
        .await;
    let id = r.json::<Value>().await.unwrap()["orderID"].as_i64().unwrap();
    let a = app.get(&format!("/orders/{id}"), Some(&bob)).await;
    let missing = app.get("/orders/999999", Some(&bob)).await;
    let a = assert_problem(a, 404).await;
    let m = assert_problem(missing, 404).await;
    assert_eq!(a, m, "another user's order must look exactly like a missing one");
    let c = app.cancel(&bob, id).await;
    assert_problem(c, 404).await;
    let list: Value = app.get_json("/orders", Some(&bob)).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    app.eventually_eq(
        &format!("select status from orders where order_id = {id}"),
        "confirmed",
        5,
    )
    .await;
    assert_problem(app.get(&format!("/orders/{id}"), None).await, 401).await;
}

#[tokio::test]
async fn invalid_orders_name_the_field_and_write_nothing() {
    let app = spawn_app().await;
    app.product(1, 10, "1.00");
    let (uid, token) = app.customer("la@example.com").await;
    let many: Vec<Value> = (1..=101)
        .map(|p| json!({"productID": p, "quantity": 1}))
        .collect();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"orderItems": [{"productID": 1, "quantity": 0}]}),
            "orderItems[0].quantity",
        ),
        (
            json!({"orderItems": [{"productID": 1, "quantity": -2}]}),
            "orderItems[0].quantity",
        ),
        (
            json!({"orderItems": [{"productID": 1, "quantity": 10001}]}),
            "orderItems[0].quantity",
        ),
        (
            json!({"orderItems": [{"productID": 1, "quantity": 1.5}]}),
            "orderItems[0].quantity",
        ),
        (
            json!({"orderItems": [{"productID": 1, "quantity": "2"}]}),
            "orderItems[0].quantity",
        ),
        (
            json!({"orderItems": [{"productID": 1, "quantity": 1e30}]}),
            "orderItems[0].quantity",
        ),
        (
            json!({"orderItems": [{"productID": 0, "quantity": 1}]}),
            "orderItems[0].productID",
        ),
        (
            json!({"orderItems": [{"productID": 4294967296u64, "quantity": 1}]}),
            "orderItems[0].productID",
        ),
        (json!({"orderItems": []}), "orderItems"),
        (json!({"orderItems": many}), "orderItems"),
        (
            json!({"orderItems": [{"productID": 1, "quantity": 1}, {"productID": 1, "quantity": 2}]}),
            "orderItems[1].productID",
        ),
        (
            json!({"orderItems": [{"productID": 1, "quantity": 1, "price": "0.01"}]}),
            "orderItems[0].price",
        ),
        (
            json!({"orderItems": [{"productID": 1, "quantity": 1}], "status": "delivered"}),
            "status",
        ),
        (json!({}), "orderItems"),
    ];
    for (i, (body, field)) in cases.into_iter().enumerate() {
        let r = app
            .order_request(&token, &format!("v-{i}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let p = assert_problem(r, 422).await;
        assert_eq!(p["field"], field, "case {i}: {body}");
    }
    // Missing key → 400 naming it; another user's id → 403; bad JSON → 400; wrong type → 415.
    let r = app
        .post_json(
            "/orders",
            &json!({"orderItems": [{"productID": 1, "quantity": 1}]}),
            Some(&token),
        )
        .await;
    let p = assert_problem(r, 400).await;
    assert!(p["detail"].as_str().unwrap().contains("Idempotency-Key"));
    let r = app
        .order_request(&token, "x-1")
        .json(&json!({"userID": uid + 1, "orderItems": [{"productID": 1, "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 403).await;
    for (key, content_type, body, status) in [
        ("x-2", "application/json", "{\"orderItems\": [", 400),
        ("x-3", "text/plain", "hi", 415),
    ] {
        let r = app
            .order_request(&token, key)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_problem(r, status).await;
    }
    for table in ["orders", "sagas", "idempotency_keys", "outbox"] {
        assert_eq!(
            app.count(&format!("select count(*) from {table}")).await,
            0,
            "{table} was written"
        );
    }
    // The caller's own userID is fine.
    let r = app
        .order_request(&token, "x-4")
        .json(&json!({"userID": uid, "orderItems": [{"productID": 1, "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn cancelling_a_confirmed_order_undoes_shipment_and_reservation_once() {
    let app = spawn_app().await;
    app.product(1, 10, "1.00");
    let (_, token) = app.customer("ma@example.com").await;
    let r = app
        .place(&token, "k", json!([{"productID": 1, "quantity": 3}]))
        .await;
    let id = r.json::<Value>().await.unwrap()["orderID"].as_i64().unwrap();
    let c = app.cancel(&token, id).await;
    assert_eq!(c.status(), 200);
    let body: Value = c.json().await.unwrap();
    assert_eq!(body["status"], "cancelled");
    // Cancelled only once the shipper cancelled the shipment.
    assert_eq!(app.sim_shipments().await[0]["status"], "cancelled");
    app.eventually_eq(
        &format!("select state from sagas where order_id = {id}"),
        "compensated",
        10,
    )
    .await;
    // Undone once: shipment cancelled, reservation released, stock back; a repeat answers the same.
    assert_cancel_undone_once(&app, &token, id).await;
    let comp: i64 = app
        .count("select count(*) from saga_steps where kind = 'compensation' and outcome = 'succeeded'")
        .await;
    assert_eq!(comp, 3);
}

#[tokio::test]
async fn a_shipped_order_cannot_be_cancelled() {
    let app = spawn_app().await;
    app.product(1, 10, "1.00");
    let (_, token) = app.customer("na@example.com").await;
    let r = app
        .place(&token, "k", json!([{"productID": 1, "quantity": 1}]))
        .await;
    let id = r.json::<Value>().await.unwrap()["orderID"].as_i64().unwrap();
    sqlx::query("update orders set status = 'shipped' where order_id = $1")
        .bind(id as i32)
        .execute(&app.db)
        .await
        .unwrap();
    let c = app.cancel(&token, id).await;
    let p = assert_problem(c, 409).await;
    assert_eq!(p["orderStatus"], "shipped");
    assert_eq!(app.reservations().await[0]["status"], "active");
}

#[tokio::test]
async fn cancelling_a_pending_order_compensates_at_the_next_step() {
    let app = spawn_app_with_flags(&["--order-wait-ms", "100"]).await;
    app.product(1, 10, "1.00");
    app.catalog_faults(json!({"latencyMs": 600, "endpoint": "reserve"}))
        .await;
    let (_, token) = app.customer("oa@example.com").await;
    let r = app
        .place(&token, "k", json!([{"productID": 1, "quantity": 2}]))
        .await;
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["orderID"].as_i64().unwrap();
    let c = app.cancel(&token, id).await;
    assert_eq!(c.status(), 200);
    assert_eq!(c.json::<Value>().await.unwrap()["status"], "cancelled");
    app.eventually_eq(
        &format!("select state from sagas where order_id = {id}"),
        "compensated",
        10,
    )
    .await;
    assert_eq!(
        app.sim_shipments().await.len(),
        0,
        "no shipment after a cancellation"
    );
    assert_eq!(
        app.sim_get(&app.catalog_url, "/sim/products/1").await["stock"],
        10
    );
    assert_eq!(
        app.count("select count(*) from orders where status = 'cancelled'")
            .await,
        1
    );
}

#[tokio::test]
async fn orders_list_newest_first_by_pages() {
    let app = spawn_app().await;
    app.product(1, 100, "1.00");
    let (_, token) = app.customer("pa@example.com").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = app
            .place(&token, &format!("k{i}"), json!([{"productID": 1, "quantity": 1}]))
            .await;
        ids.push(r.json::<Value>().await.unwrap()["orderID"].as_i64().unwrap());
    }
    let p1: Value = app.get_json("/orders?limit=2", Some(&token)).await;
    let got: Vec<i64> = p1["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["orderID"].as_i64().unwrap())
        .collect();
    assert_eq!(got, vec![ids[2], ids[1]]);
    let cursor = p1["nextCursor"].as_str().unwrap();
    let p2: Value = app
        .get_json(&format!("/orders?limit=2&cursor={cursor}"), Some(&token))
        .await;
    let got: Vec<i64> = p2["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["orderID"].as_i64().unwrap())
        .collect();
    assert_eq!(got, vec![ids[0]]);
    assert!(p2["nextCursor"].is_null());
    for bad in ["limit=0", "limit=101", "limit=x", "cursor=nonsense"] {
        let p = assert_problem(app.get(&format!("/orders?{bad}"), Some(&token)).await, 422).await;
        assert!(p["field"] == "limit" || p["field"] == "cursor");
    }
}

#[tokio::test]
async fn the_order_limit_per_user_answers_429() {
    let app = spawn_app_with_flags(&["--order-limit-per-user", "2"]).await;
    app.product(1, 100, "1.00");
    let (_, token) = app.customer("qa@example.com").await;
    for i in 0..2 {
        assert_eq!(
            app.place(&token, &format!("k{i}"), json!([{"productID": 1, "quantity": 1}]))
                .await
                .status(),
            201
        );
    }
    let r = app
        .place(&token, "k9", json!([{"productID": 1, "quantity": 1}]))
        .await;
    // Orders per minute, over a sliding minute: the first order counts for 60 s.
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((50..=60).contains(&retry), "Retry-After: {retry}");
    assert_problem(r, 429).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// One lock order everywhere: a customer's cancel takes the saga's row before its order's, as the
/// saga committer does (it locks the sagas of a shared commit, then writes their orders). With the
/// opposite order a cancel and a commit of the same saga could each hold what the other waits for,
/// and PostgreSQL would abort one (a 500, or a shared commit rolled back). Shown deterministically:
/// while a transaction holds the saga's row, as a committer does, a cancel waits without having
/// locked the order, so the committer could still write the order.
#[tokio::test]
async fn a_cancel_waits_for_the_saga_row_before_locking_the_order() {
    let app = spawn_app().await;
    app.product(1, 10, "1.00");
    let (_, token) = app.customer("lockorder@example.com").await;
    let r = app
        .place(&token, "k", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["orderID"].as_i64().unwrap() as i32;

    // A committer's transaction: it holds the saga's row.
    let mut committer = app.db.begin().await.unwrap();
    sqlx::query("select 1 from sagas where order_id = $1 for update")
        .bind(id)
        .execute(&mut *committer)
        .await
        .unwrap();
    let cancel = {
        let (http, url, token) = (
            app.http.clone(),
            app.url(&format!("/orders/{id}/cancel")),
            token.clone(),
        );
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(token)
                .json(&json!({}))
                .send()
                .await
                .unwrap()
        })
    };
    // The cancel is waiting (on the saga's row)...
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!cancel.is_finished(), "the cancel waits for the saga's row");
    // ...and holds no lock on the order: the committer can still write it.
    sqlx::query("set local lock_timeout = '2s'")
        .execute(&mut *committer)
        .await
        .unwrap();
    sqlx::query("update orders set status = status where order_id = $1")
        .bind(id)
        .execute(&mut *committer)
        .await
        .expect("the cancel must not hold the order's row while it waits for the saga's");
    committer.commit().await.unwrap();
    let answer = cancel.await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.json::<Value>().await.unwrap()["status"], "cancelled");
    let deadlocks: i64 = app
        .count("select deadlocks from pg_stat_database where datname = current_database()")
        .await;
    assert_eq!(deadlocks, 0);
}

/// A shipment the shipper created but whose answer never arrived (here: malformed, as a timeout or
/// a cut connection would also lose it) must still be cancelled when the saga compensates: the
/// compensation learns its id by asking again with the create's Idempotency-Key. Recording it as
/// "skipped" would leave the shipper shipping a cancelled order.
#[tokio::test]
async fn a_shipment_whose_answer_was_lost_is_found_and_cancelled_by_the_compensation() {
    let app = spawn_app_with_flags(&["--order-wait-ms", "100"]).await;
    app.product(1, 10, "1.00");
    app.shipment_faults(json!({"malformed": true, "endpoint": "create"}))
        .await;
    let (_, token) = app.customer("lost@example.com").await;
    let r = app
        .place(&token, "k", json!([{"productID": 1, "quantity": 2}]))
        .await;
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["orderID"].as_i64().unwrap();
    // The shipper did create it; the saga only ever saw broken answers.
    for _ in 0..100 {
        if !app.sim_shipments().await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.sim_shipments().await.len(), 1);
    let c = app.cancel(&token, id).await;
    assert_eq!(c.status(), 200);
    // While the shipper keeps answering badly, the compensation cannot learn the id: it retries
    // rather than give up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(
        app.count(&format!(
            "select count(*) from sagas where order_id = {id} and state = 'compensated'"
        ))
        .await,
        1,
        "not compensated while the shipment's id is unknown"
    );
    let r = app
        .http
        .delete(format!("{}/sim/faults", app.shipments_url))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    app.eventually_eq(
        &format!("select state from sagas where order_id = {id}"),
        "compensated",
        20,
    )
    .await;
    let shipments = app.sim_shipments().await;
    assert_eq!(shipments.len(), 1, "asking again made no second shipment");
    assert_eq!(shipments[0]["status"], "cancelled", "{shipments:?}");
    assert_eq!(
        app.sim_get(&app.catalog_url, "/sim/products/1").await["stock"],
        10
    );
}

/// A first request whose client went away before any answer must not leave its Idempotency-Key
/// answering 409 "in flight" until the saga ends (for good, were the saga stuck): once the first
/// request's wait is over, a retry answers in its place (202, pending, with the order).
#[tokio::test]
async fn a_retry_after_the_first_request_was_dropped_gets_202_not_409() {
    let app = spawn_app_with(AppOptions {
        // A wait long enough that the early retry lands inside it on a loaded machine.
        flags: vec!["--order-wait-ms", "5000"],
        ..Default::default()
    })
    .await;
    app.product(1, 10, "1.00");
    app.catalog_faults(json!({"latencyMs": 15000, "endpoint": "reserve"}))
        .await;
    let (_, token) = app.customer("dropped@example.com").await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let sent = Instant::now();
    let first = impatient
        .post(app.url("/orders"))
        .bearer_auth(&token)
        .header("Idempotency-Key", "gone")
        .json(&json!({"orderItems": [{"productID": 1, "quantity": 1}]}))
        .send()
        .await;
    assert!(first.is_err(), "the first client gave up before any answer");
    // Within the first request's wait, a retry is told to come back (409, in flight)... (checked
    // when the retry was answered inside that wait: on a loaded machine it may not be, and then
    // the first request has answered 202 meanwhile, which is right too)
    let early = app
        .place(&token, "gone", json!([{"productID": 1, "quantity": 1}]))
        .await;
    if sent.elapsed() < Duration::from_millis(4500) {
        assert_eq!(early.status(), 409);
    } else {
        assert!(matches!(early.status().as_u16(), 409 | 202), "{}", early.status());
    }
    // ...after it, the retry answers in its place, while the saga still runs.
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let r = app
        .place(&token, "gone", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "pending");
    let id = body["orderID"].as_i64().unwrap();
    // The same answer again, and one order only.
    let again = app
        .place(&token, "gone", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.json::<Value>().await.unwrap()["orderID"], id);
    assert_eq!(app.count("select count(*) from orders").await, 1);
}

/// Idempotency-Keys do not live for ever: a finished order's key past its retention is deleted
/// (the same key then places a new order), while the key of a saga still running stays whatever
/// its age.
#[tokio::test]
async fn idempotency_keys_of_finished_orders_expire_and_running_ones_stay() {
    let app = spawn_app().await;
    app.product(1, 10, "1.00");
    let (_, token) = app.customer("keys@example.com").await;
    let r = app
        .place(&token, "old", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert_eq!(r.status(), 201);
    let first = r.json::<Value>().await.unwrap()["orderID"].as_i64().unwrap();
    let r = app
        .place(&token, "running", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert_eq!(r.status(), 201);
    // Both keys are eight days old; the second one's saga is (made) still running.
    app.exec("update idempotency_keys set created_at = now() - interval '8 days'")
        .await;
    sqlx::query(
        "update sagas set state = 'running', next_attempt_at = null
          where saga_id = (select saga_id from idempotency_keys where key = 'running')",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let mut conn = app.db.acquire().await.unwrap();
    let purged =
        ostore_orders::orders::place::purge_idempotency_keys(&mut conn, Duration::from_secs(7 * 24 * 3600))
            .await
            .unwrap();
    assert_eq!(purged, 1);
    let keys: Vec<String> = sqlx::query_scalar("select key from idempotency_keys")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(keys, ["running"]);
    // The expired key is free again: a new order, not the first one's answer.
    let r = app
        .place(&token, "old", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert_eq!(r.status(), 201);
    assert_ne!(
        r.json::<Value>().await.unwrap()["orderID"].as_i64().unwrap(),
        first
    );
    // A week-old key is kept within the retention.
    assert_eq!(
        ostore_orders::orders::place::purge_idempotency_keys(&mut conn, Duration::from_secs(30 * 24 * 3600))
            .await
            .unwrap(),
        0
    );
}

/// A customer who cancels while the shipment is being created gets a cancelled order, and no
/// event may contradict it: the shipment's success must not publish `OrderConfirmed` after the
/// cancel's `OrderCancelled` (nor confirm the order).
#[tokio::test]
async fn a_cancel_while_the_shipment_is_created_publishes_no_order_confirmed() {
    let app = spawn_app_with_flags(&["--order-wait-ms", "100"]).await;
    app.product(1, 10, "1.00");
    app.shipment_faults(json!({"latencyMs": 1500, "endpoint": "create"}))
        .await;
    let (_, token) = app.customer("race@example.com").await;
    let r = app
        .place(&token, "k", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["orderID"].as_i64().unwrap();
    // Wait until the create is in flight (the order persisted, the shipper called).
    for _ in 0..100 {
        let step: Option<String> = sqlx::query_scalar("select step_name from sagas where order_id = $1")
            .bind(id as i32)
            .fetch_optional(&app.db)
            .await
            .unwrap();
        if step.as_deref() == Some("create_shipment") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = app.cancel(&token, id).await;
    assert_eq!(c.status(), 200);
    app.eventually_eq(
        &format!("select state from sagas where order_id = {id}"),
        "compensated",
        20,
    )
    .await;
    let events: Vec<String> = sqlx::query_scalar(
        "select event_type from outbox where topic = 'orders.events' and message_key = $1 order by id",
    )
    .bind(id.to_string())
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert!(events.contains(&"OrderCancelled".to_string()), "{events:?}");
    assert!(
        !events.contains(&"OrderConfirmed".to_string()),
        "an OrderConfirmed contradicts the cancelled order: {events:?}"
    );
    let status: String = sqlx::query_scalar("select status from orders where order_id = $1")
        .bind(id as i32)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(status, "cancelled");
    assert_eq!(app.sim_shipments().await[0]["status"], "cancelled");
}

/// Issue 19: a customer cancels a confirmed order whose parcel the shipper has already picked up
/// (the tracking consumer has not applied `picked_up` yet, so the order still says `confirmed`).
/// The shipper's refusal wins: 409 with the order's real status, the order is not cancelled, the
/// saga is `completed` again (not `stuck`), no `OrderCancelled`, the reservation stays, and a
/// repeated cancel answers the same 409 without asking the shipper again.
#[tokio::test]
async fn a_cancel_the_shipper_refuses_after_pick_up_leaves_the_order_as_it_is() {
    let app = spawn_app().await;
    app.product(1, 10, "1.00");
    let (_, token) = app.customer("pickedup@example.com").await;
    let r = app
        .place(&token, "k", json!([{"productID": 1, "quantity": 2}]))
        .await;
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    let id = body["orderID"].as_i64().unwrap();
    let shipment_id = body["shipmentID"].as_str().unwrap().to_string();
    let adv = app
        .http
        .post(format!(
            "{}/sim/shipments/{shipment_id}/advance",
            app.shipments_url
        ))
        .json(&json!({"status": "picked_up"}))
        .send()
        .await
        .unwrap();
    assert!(adv.status().is_success());

    let c = app.cancel(&token, id).await;
    let p = assert_problem(c, 409).await;
    assert!(p["type"].as_str().unwrap().ends_with("not-cancellable"), "{p}");
    assert_eq!(p["orderStatus"], "confirmed");
    let got: Value = app.get_json(&format!("/orders/{id}"), Some(&token)).await;
    assert_eq!(got["status"], "confirmed");
    assert_eq!(
        app.count(&format!(
            "select count(*) from sagas where order_id = {id} and state = 'completed'
               and failure is null and cancel_requested is null and finished_at is not null"
        ))
        .await,
        1,
        "the saga is completed again"
    );
    assert_eq!(
        app.count("select count(*) from outbox where event_type = 'OrderCancelled'")
            .await,
        0
    );
    assert_eq!(
        app.count("select count(*) from outbox where event_type = 'CancellationRefused'")
            .await,
        1
    );
    assert_eq!(
        app.count(
            "select count(*) from saga_steps where step = 'cancel_shipment' and outcome = 'failed'
               and downstream_status = 409"
        )
        .await,
        1
    );
    assert_eq!(app.reservations().await[0]["status"], "active");
    assert_eq!(app.sim_shipments().await[0]["status"], "picked_up");
    assert_eq!(app.sim_get(&app.catalog_url, "/sim/products/1").await["stock"], 8);

    // Again: the same 409 at once, the shipper is not asked again.
    let again = app.cancel(&token, id).await;
    let p = assert_problem(again, 409).await;
    assert_eq!(p["orderStatus"], "confirmed");
    assert_eq!(
        app.count("select count(*) from saga_steps where step = 'cancel_shipment'")
            .await,
        1
    );
    // Once the tracking consumer applied the pick-up, the usual "shipped" refusal.
    sqlx::query("update orders set status = 'shipped' where order_id = $1")
        .bind(id as i32)
        .execute(&app.db)
        .await
        .unwrap();
    let late = app.cancel(&token, id).await;
    assert_eq!(assert_problem(late, 409).await["orderStatus"], "shipped");
}

/// Issue 19: a cancel of a confirmed order whose shipper is slow to cancel the shipment answers 202
/// with the order as it is (still `confirmed`) and `Location`; the cancellation converges later:
/// the order ends `cancelled`, the shipment cancelled, the reservation released, one
/// `OrderCancelled`; later cancels answer 200.
#[tokio::test]
async fn a_cancel_the_shipper_answers_late_is_accepted_and_converges() {
    let app = spawn_app_with_flags(&["--order-wait-ms", "1000"]).await;
    app.product(1, 10, "1.00");
    let (_, token) = app.customer("slowcancel@example.com").await;
    let r = app
        .place(&token, "k", json!([{"productID": 1, "quantity": 3}]))
        .await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["orderID"].as_i64().unwrap();
    // The shipper answers the next cancels 503 (Retry-After: 1 s): longer than the wait.
    app.shipment_faults(json!({"failNext": 3, "endpoint": "cancel"}))
        .await;

    let c = app.cancel(&token, id).await;
    assert_eq!(c.status(), 202);
    assert_eq!(c.headers()["location"].to_str().unwrap(), format!("/orders/{id}"));
    let body: Value = c.json().await.unwrap();
    assert_eq!(
        body["status"], "confirmed",
        "not cancelled before the shipper said so"
    );
    assert_eq!(app.reservations().await[0]["status"], "active");

    app.eventually_eq(
        &format!("select state from sagas where order_id = {id}"),
        "compensated",
        20,
    )
    .await;
    let got: Value = app.get_json(&format!("/orders/{id}"), Some(&token)).await;
    assert_eq!(got["status"], "cancelled");
    // Undone once: shipment cancelled, reservation released, stock back; a repeat answers the same.
    assert_cancel_undone_once(&app, &token, id).await;
}

/// After a confirmed order's cancel went through: its shipment is cancelled, its reservation
/// released and product 1's stock back to 10; cancelling again answers the same 200 and publishes
/// no second `OrderCancelled`.
async fn assert_cancel_undone_once(app: &TestApp, token: &str, id: i64) {
    assert_eq!(app.sim_shipments().await[0]["status"], "cancelled");
    assert_eq!(app.reservations().await[0]["status"], "released");
    assert_eq!(
        app.sim_get(&app.catalog_url, "/sim/products/1").await["stock"],
        10
    );
    let again = app.cancel(token, id).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["status"], "cancelled");
    assert_eq!(
        app.count("select count(*) from outbox where event_type = 'OrderCancelled'")
            .await,
        1
    );
}
