//! The account lifecycle: disabling, enabling and deleting users (admin API and the functions the
//! command line runs), and the check every protected request makes that its user is still active.

use std::time::{Duration, Instant};

use jsonwebtoken::{EncodingKey, Header};
use ostore_orders::auth::Role;
use ostore_orders::auth::users::LifecycleAction;
use serde_json::{Value, json};

use crate::support::{TEST_JWT_SECRET, TestApp, assert_problem, spawn_app};

async fn refresh_status(app: &TestApp, refresh: &str) -> u16 {
    app.post_json("/auth/refresh", &json!({"token": refresh}), None)
        .await
        .status()
        .as_u16()
}

async fn me_status(app: &TestApp, token: &str) -> u16 {
    app.get("/me", Some(token)).await.status().as_u16()
}

/// Waits (up to 5 s) until `/me` with `token` answers `status`.
async fn me_becomes(app: &TestApp, token: &str, status: u16) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = me_status(app, token).await;
        if s == status || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn disabling_a_user_refuses_every_session_at_once_and_enabling_lets_them_log_in_again() {
    let app = spawn_app().await;
    let (_, ops) = app.admin().await;
    let id = app
        .create_user("ann@example.com", "password-123", Role::User)
        .await;
    // Two logins: two refresh families, two access tokens.
    let (a1, r1) = app.login("ann@example.com", "password-123").await;
    let (a2, r2) = app.login("ann@example.com", "password-123").await;
    assert_eq!(
        (me_status(&app, &a1).await, me_status(&app, &a2).await),
        (200, 200)
    );

    let r = app
        .post_json(&format!("/admin/users/{id}/disable"), &json!({}), Some(&ops))
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "disabled");
    assert!(body["disabledAt"].is_string());
    // At once, with no wait: both access tokens, both refresh tokens, and a new login.
    assert_eq!(
        (me_status(&app, &a1).await, me_status(&app, &a2).await),
        (401, 401)
    );
    assert_eq!(
        (refresh_status(&app, &r1).await, refresh_status(&app, &r2).await),
        (401, 401)
    );
    let wrong = app.try_login("ann@example.com", "wrong-pass").await;
    let wrong = assert_problem(wrong, 401).await;
    let right = app.try_login("ann@example.com", "password-123").await;
    // The same answer as a wrong password: the account's state is not disclosed.
    assert_eq!(assert_problem(right, 401).await, wrong);
    let revoked = app
        .count(&format!(
            "select count(*) from refresh_families where user_id = {id} and revoked_at is null"
        ))
        .await;
    assert_eq!(revoked, 0, "every refresh family is revoked");

    // Repeating is harmless and audited once.
    let r = app
        .post_json(&format!("/admin/users/{id}/disable"), &json!({}), Some(&ops))
        .await;
    assert_eq!(r.status(), 200);
    let audit = app
        .count(&format!(
            "select count(*) from audit_log where action = 'user.disable' and target = 'user:{id}'"
        ))
        .await;
    assert_eq!(audit, 1);

    let r = app
        .post_json(&format!("/admin/users/{id}/enable"), &json!({}), Some(&ops))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "active");
    // The old sessions stay revoked; a new login works.
    assert_eq!(me_status(&app, &a1).await, 401);
    assert_eq!(refresh_status(&app, &r2).await, 401);
    let (fresh, fresh_refresh) = app.login("ann@example.com", "password-123").await;
    assert_eq!(me_status(&app, &fresh).await, 200);
    assert_eq!(refresh_status(&app, &fresh_refresh).await, 200);
}

#[tokio::test]
async fn account_actions_need_the_admin_role_and_spare_the_callers_own_account() {
    let app = spawn_app().await;
    let (ops_id, ops) = app.admin().await;
    let (ann_id, ann) = app.customer("ann@example.com").await;
    for path in [
        format!("/admin/users/{ops_id}/disable"),
        format!("/admin/users/{ops_id}/enable"),
    ] {
        assert_problem(app.post_json(&path, &json!({}), Some(&ann)).await, 403).await;
        assert_problem(app.post_json(&path, &json!({}), None).await, 401).await;
    }
    let r = app.delete(&format!("/admin/users/{ops_id}"), &ann).await;
    assert_problem(r, 403).await;
    assert_problem(app.get(&format!("/admin/users/{ann_id}"), Some(&ann)).await, 403).await;
    // An admin cannot lock themselves out through the API.
    let r = app
        .post_json(&format!("/admin/users/{ops_id}/disable"), &json!({}), Some(&ops))
        .await;
    assert_problem(r, 409).await;
    let r = app.delete(&format!("/admin/users/{ops_id}"), &ops).await;
    assert_problem(r, 409).await;
    for bad in ["0", "-1", "abc", "99999", "2147483648"] {
        let r = app
            .post_json(&format!("/admin/users/{bad}/disable"), &json!({}), Some(&ops))
            .await;
        assert_problem(r, 404).await;
    }
    assert_eq!(me_status(&app, &ops).await, 200);
    assert_eq!(me_status(&app, &ann).await, 200);
    assert_eq!(app.count("select count(*) from audit_log").await, 0);
}

#[tokio::test]
async fn a_deleted_users_orders_stay_readable_to_admins() {
    let app = spawn_app().await;
    app.product(1, 10, "5.00");
    let (_, ops) = app.admin().await;
    let (ann_id, ann) = app.customer("ann@example.com").await;
    let r = app
        .place(&ann, "k-1", json!([{"productID": 1, "quantity": 2}]))
        .await;
    assert_eq!(r.status(), 201);
    let order: Value = r.json().await.unwrap();

    let r = app.delete(&format!("/admin/users/{ann_id}"), &ops).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "deleted");
    assert_eq!(me_status(&app, &ann).await, 401);
    let r = app.try_login("ann@example.com", "password-123").await;
    assert_problem(r, 401).await;

    // The account and its orders, for admins.
    let account: Value = app.get_json(&format!("/admin/users/{ann_id}"), Some(&ops)).await;
    assert_eq!(account["status"], "deleted");
    assert_eq!(account["email"], "ann@example.com");
    let page: Value = app
        .get_json(&format!("/admin/users/{ann_id}/orders?limit=10"), Some(&ops))
        .await;
    assert_eq!(page["items"][0]["orderID"], order["orderID"]);
    assert_eq!(page["items"][0]["totalAmount"], "10.00");

    // A deleted user cannot be enabled; deleting again is harmless.
    let r = app
        .post_json(&format!("/admin/users/{ann_id}/enable"), &json!({}), Some(&ops))
        .await;
    assert_eq!(assert_problem(r, 409).await["accountStatus"], "deleted");
    let r = app.delete(&format!("/admin/users/{ann_id}"), &ops).await;
    assert_eq!(r.status(), 200);
    // The email may go to a new account, which is a different user.
    let (new_id, new) = app.customer("ann@example.com").await;
    assert_ne!(new_id, ann_id);
    let mine: Value = app.get_json("/orders", Some(&new)).await;
    assert_eq!(mine["items"], json!([]));
    // Rows are never removed with SQL.
    let e = sqlx::query("delete from users where user_id = $1")
        .bind(ann_id)
        .execute(&app.db)
        .await;
    assert!(e.is_err(), "a hard delete is refused");
}

#[tokio::test]
async fn a_user_disabled_elsewhere_is_refused_here_within_moments() {
    let app = spawn_app().await;
    let (id, token) = app.customer("ann@example.com").await;
    // Let the revocation cache become current, so that the answer comes from memory.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(me_status(&app, &token).await, 200);
    // As `ostore-orders users disable` does, from another process: this instance hears the NOTIFY.
    let account =
        ostore_orders::cli::change_user_in(&app.db, Some("ANN@example.com"), None, LifecycleAction::Disable)
            .await
            .unwrap();
    assert_eq!(account.user_id, id);
    assert_eq!(me_becomes(&app, &token, 401).await, 401);
    let audit = app
        .count(&format!("select count(*) from audit_log where actor = 0 and action = 'user.disable' and target = 'user:{id}'"))
        .await;
    assert_eq!(audit, 1);
    ostore_orders::cli::change_user_in(&app.db, None, Some(id), LifecycleAction::Enable)
        .await
        .unwrap();
    let (fresh, _) = app.login("ann@example.com", "password-123").await;
    assert_eq!(me_becomes(&app, &fresh, 200).await, 200);
    let e = ostore_orders::cli::change_user_in(
        &app.db,
        Some("nobody@example.com"),
        None,
        LifecycleAction::Disable,
    )
    .await;
    assert!(e.unwrap_err().to_string().contains("no user"));
}

fn signed_for(user_id: i32) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = json!({
        "iss": "ostore-orders", "aud": "ostore", "sub": user_id.to_string(),
        "iat": now, "exp": now + 600, "jti": uuid::Uuid::new_v4(),
        "roles": ["admin"], "email": "ghost@example.com", "fam": uuid::Uuid::new_v4()
    });
    jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(TEST_JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn a_validly_signed_token_of_a_user_that_does_not_exist_is_refused() {
    let app = spawn_app().await;
    let (id, token) = app.customer("ann@example.com").await;
    for wait in [0, 300] {
        // Before and after the revocation cache became current.
        tokio::time::sleep(Duration::from_millis(wait)).await;
        for ghost in [id + 1, id + 1000, i32::MAX] {
            let t = signed_for(ghost);
            assert_eq!(me_status(&app, &t).await, 401, "user {ghost}");
            assert_eq!(
                app.get("/admin/sagas", Some(&t)).await.status(),
                401,
                "user {ghost}"
            );
        }
        assert_eq!(me_status(&app, &token).await, 200);
    }
    // A user created after the cache's snapshot is served (the database is asked).
    let (_, later) = app.customer("later@example.com").await;
    assert_eq!(me_status(&app, &later).await, 200);
}

#[tokio::test]
async fn a_taken_email_is_told_by_the_database_error_and_dev_seeding_twice_is_harmless() {
    use ostore_orders::auth::users::{CreateUserError, create_with_password, id_by_email};

    let app = spawn_app().await;
    create_with_password(&app.db, "Taken@example.com", "long-enough", Role::User)
        .await
        .expect("a new email is accepted");
    let again = create_with_password(&app.db, "taken@EXAMPLE.com", "long-enough", Role::User).await;
    assert!(
        matches!(again, Err(CreateUserError::EmailTaken)),
        "the same email in another case is taken: {again:?}"
    );

    ostore_orders::dev::seed_users(&app.db).await.unwrap();
    ostore_orders::dev::seed_users(&app.db).await.unwrap();
    let mut conn = app.db.acquire().await.unwrap();
    for (email, _, _) in ostore_orders::dev::DEMO_USERS {
        assert!(id_by_email(&mut conn, email).await.unwrap().is_some(), "{email}");
    }
}
