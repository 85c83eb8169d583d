use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::{EncodingKey, Header};
use ostore_orders::auth::Role;
use serde_json::{Value, json};

use crate::support::{TEST_JWT_SECRET, TestApp, assert_problem, spawn_app, spawn_app_with_flags};

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn good_claims(user_id: i32) -> Value {
    json!({
        "iss": "ostore-orders", "aud": "ostore", "sub": user_id.to_string(),
        "iat": now(), "exp": now() + 600, "jti": uuid::Uuid::new_v4(),
        "roles": ["user"], "email": "a@b.c", "fam": uuid::Uuid::new_v4()
    })
}

fn sign(claims: &Value, key: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(key),
    )
    .unwrap()
}

async fn assert_unauthorized(app: &TestApp, token: &str, what: &str) {
    let r = app.get("/me", Some(token)).await;
    assert_eq!(r.status(), 401, "{what} was accepted");
    let www = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    assert!(
        www.unwrap_or_default().starts_with("Bearer"),
        "{what}: no WWW-Authenticate: Bearer"
    );
    assert_problem(r, 401).await;
}

/// RFC 6750 §3.1: a request without credentials is challenged without an error code; refused
/// credentials are challenged with `error="invalid_token"`.
#[tokio::test]
async fn the_bearer_challenge_names_an_error_only_for_refused_credentials() {
    let app = spawn_app().await;
    let challenge = |r: reqwest::Response| {
        assert_eq!(r.status(), 401);
        r.headers()["www-authenticate"].to_str().unwrap().to_string()
    };
    let none = challenge(app.get("/me", None).await);
    assert_eq!(none, "Bearer realm=\"ostore\"");
    let bad = challenge(app.get("/me", Some("not-a-token")).await);
    assert!(
        bad.starts_with("Bearer ") && bad.contains("error=\"invalid_token\""),
        "{bad}"
    );
}

#[tokio::test]
async fn login_returns_a_token_pair_that_opens_me() {
    let app = spawn_app().await;
    let id = app
        .create_user("Ann@Example.com", "password-123", Role::User)
        .await;
    // Email is case-insensitive.
    let r = app.try_login("ann@example.COM", "password-123").await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["expiresIn"], 600);
    assert!(v["refreshToken"].as_str().unwrap().starts_with("rt_"));
    let me: Value = app.get_json("/me", v["token"].as_str()).await;
    assert_eq!(
        me,
        json!({"userID": id, "email": "Ann@Example.com", "roles": ["user"]})
    );
    // The token carries the contract's claims.
    let payload = v["token"].as_str().unwrap().split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    for k in ["iss", "aud", "sub", "exp", "iat", "jti", "roles"] {
        assert!(claims.get(k).is_some(), "claim {k} missing");
    }
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        600
    );
}

#[tokio::test]
async fn unknown_email_and_wrong_password_get_the_same_401() {
    let app = spawn_app().await;
    app.create_user("bea@example.com", "password-123", Role::User)
        .await;
    let t0 = Instant::now();
    let a = app.try_login("nobody@example.com", "password-123").await;
    let unknown_took = t0.elapsed();
    let t1 = Instant::now();
    let b = app.try_login("bea@example.com", "wrong-password").await;
    let wrong_took = t1.elapsed();
    let a = assert_problem(a, 401).await;
    let b = assert_problem(b, 401).await;
    assert_eq!(a, b, "the two refusals must be indistinguishable");
    // Both ran a full argon2 verification: neither is an order of magnitude faster.
    assert!(
        unknown_took * 10 > wrong_took && wrong_took * 10 > unknown_took,
        "{unknown_took:?} vs {wrong_took:?}"
    );
}

#[tokio::test]
async fn forged_expired_and_misdirected_tokens_are_refused() {
    let app = spawn_app().await;
    let id = app.customer("carl@example.com").await.0;
    let key = TEST_JWT_SECRET.as_bytes();
    // The good one works, so the refusals below are about what was changed.
    let good = sign(&good_claims(id), key);
    assert_eq!(app.get("/me", Some(&good)).await.status(), 200);

    let mut expired = good_claims(id);
    expired["exp"] = json!(now() - 5);
    expired["iat"] = json!(now() - 700);
    assert_unauthorized(&app, &sign(&expired, key), "an expired token").await;

    let mut wrong_iss = good_claims(id);
    wrong_iss["iss"] = json!("someone-else");
    assert_unauthorized(&app, &sign(&wrong_iss, key), "a wrong iss").await;

    let mut wrong_aud = good_claims(id);
    wrong_aud["aud"] = json!("other-api");
    assert_unauthorized(&app, &sign(&wrong_aud, key), "a wrong aud").await;

    for missing in ["exp", "sub", "jti", "iat"] {
        let mut c = good_claims(id);
        c.as_object_mut().unwrap().remove(missing);
        assert_unauthorized(&app, &sign(&c, key), &format!("a token without {missing}")).await;
    }

    assert_unauthorized(
        &app,
        &sign(&good_claims(id), b"another-key-another-key-another-key!!"),
        "another key",
    )
    .await;

    // Tampered payload: the signature of the good token on an admin payload.
    let parts: Vec<&str> = good.split('.').collect();
    let mut admin = good_claims(id);
    admin["roles"] = json!(["admin"]);
    let tampered = format!("{}.{}.{}", parts[0], b64(&admin), parts[2]);
    assert_unauthorized(&app, &tampered, "a tampered payload").await;

    // alg none in any spelling, with or without a signature.
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = b64(&json!({"alg": alg, "typ": "JWT"}));
        let body = b64(&good_claims(id));
        assert_unauthorized(&app, &format!("{header}.{body}."), &format!("alg {alg}")).await;
        assert_unauthorized(
            &app,
            &format!("{header}.{body}.{}", parts[2]),
            &format!("alg {alg} signed"),
        )
        .await;
    }
    // Algorithm switching: HS512 with the same key.
    let hs512 = jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS512),
        &good_claims(id),
        &EncodingKey::from_secret(key),
    )
    .unwrap();
    assert_unauthorized(&app, &hs512, "HS512").await;

    assert_unauthorized(&app, "not-a-jwt", "garbage").await;
    // The scheme is case-insensitive (RFC 9110 §11.1); another scheme is refused.
    for (scheme, status) in [("BEARER", 200), ("bearer", 200), ("BeArEr", 200), ("Basic", 401)] {
        let r = app
            .http
            .get(app.url("/me"))
            .header("authorization", format!("{scheme} {good}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{scheme}");
    }
    assert_problem(app.get("/me", None).await, 401).await;
}

#[tokio::test]
async fn refresh_and_access_tokens_are_not_interchangeable() {
    let app = spawn_app().await;
    app.create_user("dora@example.com", "password-123", Role::User)
        .await;
    let (access, refresh) = app.login("dora@example.com", "password-123").await;
    assert_unauthorized(&app, &refresh, "a refresh token as bearer").await;
    let r = app
        .post_json("/auth/refresh", &json!({"token": access}), None)
        .await;
    assert_problem(r, 401).await;
    for junk in ["", "rt_", "rt_doesnotexist", "' or 1=1 --"] {
        let r = app
            .post_json("/auth/refresh", &json!({"token": junk}), None)
            .await;
        assert_problem(r, 401).await;
    }
    // SPEC §2: anything but a live refresh token → 401, also no token or one that is not text.
    for body in [
        json!({}),
        json!({"token": null}),
        json!({"token": 123}),
        json!({"token": [refresh]}),
    ] {
        let r = app.post_json("/auth/refresh", &body, None).await;
        assert_problem(r, 401).await;
    }
    // Still: an unknown field is named (422), and the live token was not spent by any of these.
    let r = app
        .post_json("/auth/refresh", &json!({"refreshToken": refresh}), None)
        .await;
    assert_problem(r, 422).await;
    let r = app
        .post_json("/auth/refresh", &json!({"token": refresh}), None)
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_whole_family() {
    let app = spawn_app().await;
    app.create_user("eve@example.com", "password-123", Role::User)
        .await;
    let (_, r1) = app.login("eve@example.com", "password-123").await;
    let resp = app.post_json("/auth/refresh", &json!({"token": r1}), None).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let (a2, r2) = (
        v["token"].as_str().unwrap().to_string(),
        v["refreshToken"].as_str().unwrap().to_string(),
    );
    assert_ne!(r1, r2);
    assert_eq!(app.get("/me", Some(&a2)).await.status(), 200);

    // The spent token presented again: refused, and the family is gone.
    assert_problem(
        app.post_json("/auth/refresh", &json!({"token": r1}), None).await,
        401,
    )
    .await;
    assert_problem(
        app.post_json("/auth/refresh", &json!({"token": r2}), None).await,
        401,
    )
    .await;
    assert_unauthorized(&app, &a2, "an access token of a revoked family").await;

    // Another login starts a new family that works.
    let (a3, r3) = app.login("eve@example.com", "password-123").await;
    assert_eq!(app.get("/me", Some(&a3)).await.status(), 200);
    assert_eq!(
        app.post_json("/auth/refresh", &json!({"token": r3}), None)
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn two_concurrent_refreshes_of_one_token_yield_exactly_one_pair() {
    let app = spawn_app().await;
    app.create_user("fay@example.com", "password-123", Role::User)
        .await;
    let (_, r) = app.login("fay@example.com", "password-123").await;
    let body = json!({"token": r});
    let (x, y) = tokio::join!(
        app.post_json("/auth/refresh", &body, None),
        app.post_json("/auth/refresh", &body, None)
    );
    let mut codes = [x.status().as_u16(), y.status().as_u16()];
    codes.sort();
    assert_eq!(codes, [200, 401]);
}

#[tokio::test]
async fn logout_revokes_the_access_token_and_its_refresh_family() {
    let app = spawn_app().await;
    app.create_user("gus@example.com", "password-123", Role::User)
        .await;
    let (access, refresh) = app.login("gus@example.com", "password-123").await;
    let (other_access, _) = app.login("gus@example.com", "password-123").await;
    let r = app.post_json("/auth/logout", &json!({}), Some(&access)).await;
    assert_eq!(r.status(), 200);
    assert_unauthorized(&app, &access, "a logged-out token").await;
    assert_problem(
        app.post_json("/auth/refresh", &json!({"token": refresh}), None)
            .await,
        401,
    )
    .await;
    // Another session of the same user is untouched.
    assert_eq!(app.get("/me", Some(&other_access)).await.status(), 200);
    // Logout without a token.
    assert_problem(app.post_json("/auth/logout", &json!({}), None).await, 401).await;
}

#[tokio::test]
async fn login_limit_answers_429_with_retry_after_even_for_the_right_password() {
    let app = spawn_app_with_flags(&["--login-limit-per-account", "3"]).await;
    app.create_user("hal@example.com", "password-123", Role::User)
        .await;
    for _ in 0..3 {
        let r = app.try_login("hal@example.com", "nope-nope").await;
        assert_eq!(r.status(), 401);
    }
    let r = app.try_login("HAL@example.com", "password-123").await;
    // A sliding minute (SPEC §7: attempts per minute): the first attempt counts for 60 s.
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((50..=60).contains(&retry), "Retry-After: {retry}");
    assert_problem(r, 429).await;
    // Unknown emails are counted alike.
    for _ in 0..3 {
        app.try_login("ghost@example.com", "x").await;
    }
    let r = app.try_login("ghost@example.com", "x").await;
    assert_problem(r, 429).await;
    // Another account is not affected.
    app.create_user("ida@example.com", "password-123", Role::User)
        .await;
    app.login("ida@example.com", "password-123").await;
}

#[tokio::test]
async fn address_limit_holds_across_accounts() {
    let app = spawn_app_with_flags(&["--login-limit-per-address", "4"]).await;
    for i in 0..4 {
        let r = app.try_login(&format!("u{i}@example.com"), "x").await;
        assert_eq!(r.status(), 401);
    }
    let r = app.try_login("u9@example.com", "x").await;
    assert!(r.headers().contains_key("retry-after"));
    assert_problem(r, 429).await;
}

#[tokio::test]
async fn huge_passwords_are_refused_quickly_without_hashing() {
    let app = spawn_app().await;
    app.create_user("jo@example.com", "password-123", Role::User)
        .await;
    let t = Instant::now();
    let r = app
        .post_json(
            "/auth/login",
            &json!({"email": "jo@example.com", "password": "x".repeat(1024 * 1024)}),
            None,
        )
        .await;
    assert_problem(r, 413).await;
    let r = app
        .post_json(
            "/auth/login",
            &json!({"email": "jo@example.com", "password": "x".repeat(4096)}),
            None,
        )
        .await;
    let body = assert_problem(r, 422).await;
    assert_eq!(body["field"], "password");
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// A body declared larger than the limit is refused at once, from its Content-Length, without
/// waiting for bytes the client may never send; and a wrong type is told in the API's words, not
/// Rust's.
#[tokio::test]
async fn a_declared_oversize_body_is_refused_before_it_arrives_and_errors_name_no_rust_types() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let app = spawn_app().await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /auth/login HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: 999999\r\n\r\n{{\"email\":\"a@b.c\"}}"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut answer))
        .await
        .expect("no answer while the rest of the declared body never came")
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("application/problem+json"), "{text}");

    for (body, field) in [
        (json!({"email": 1e23, "password": "x"}), "email"),
        (json!([1, 2]), "body"),
        (json!({"email": "a@b.c", "password": ["x"]}), "password"),
    ] {
        let r = app.post_json("/auth/login", &body, None).await;
        let problem = assert_problem(r, 422).await;
        let detail = problem["detail"].as_str().unwrap_or_default();
        for rust in ["struct", "String", "i64", "i32", "u32", "f64", "Login"] {
            assert!(!detail.contains(rust), "{field}: {detail}");
        }
    }
}

#[tokio::test]
async fn sql_injection_in_the_email_is_just_a_wrong_login() {
    let app = spawn_app().await;
    app.create_user("kim@example.com", "password-123", Role::User)
        .await;
    for email in [
        "' OR '1'='1",
        "kim@example.com' --",
        "'; drop table users; --",
        "\" or \"\"=\"",
        "kim@example.com'/*",
        "%' or email like '%",
    ] {
        let r = app.try_login(email, "password-123").await;
        let code = r.status().as_u16();
        assert!(code == 401 || code == 422, "{email:?} → {code}");
    }
    // The table is intact.
    app.login("kim@example.com", "password-123").await;
}

#[tokio::test]
async fn bad_requests_get_problem_documents_and_change_nothing() {
    let app = spawn_app().await;
    let big = json!({"email": "a@b.c", "password": "x".repeat(65 * 1024)});
    assert_problem(app.post_json("/auth/login", &big, None).await, 413).await;

    // Not sent as JSON: 415; sent as JSON but cut short: 400.
    for (content_type, body, status) in [
        (Some("text/plain"), "{}", 415),
        (None, r#"{"email":"a@b.c","password":"x"}"#, 415),
        (Some("application/json"), "{\"email\":", 400),
    ] {
        let mut rb = app.http.post(app.url("/auth/login")).body(body);
        if let Some(content_type) = content_type {
            rb = rb.header("content-type", content_type);
        }
        assert_problem(rb.send().await.unwrap(), status).await;
    }
    let r = app
        .post_json(
            "/auth/login",
            &json!({"email": "a@b.c", "password": "x", "admin": true}),
            None,
        )
        .await;
    let body = assert_problem(r, 422).await;
    assert_eq!(body["field"], "admin");
    let r = app
        .post_json("/auth/login", &json!({"email": "a@b.c"}), None)
        .await;
    let body = assert_problem(r, 422).await;
    assert_eq!(body["field"], "password");
    let r = app
        .post_json("/auth/login", &json!({"email": 5, "password": "x"}), None)
        .await;
    let body = assert_problem(r, 422).await;
    assert_eq!(body["field"], "email");

    assert_problem(app.get("/no/such/path", None).await, 404).await;
    let r = app.http.delete(app.url("/auth/login")).send().await.unwrap();
    assert_problem(r, 405).await;

    let users: i64 = sqlx::query_scalar("select count(*) from users")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let families: i64 = sqlx::query_scalar("select count(*) from refresh_families")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!((users, families), (0, 0));
}

/// Refresh families do not live for ever: one whose tokens are all gone (purged a day after they
/// expired) is deleted; one with a token left, even revoked, is kept (its access tokens must stay
/// refused while they live).
#[tokio::test]
async fn spent_refresh_families_are_purged_and_live_ones_kept() {
    let app = spawn_app().await;
    let (_, _token) = app.customer("fam1@example.com").await;
    let (_, _token) = app.customer("fam2@example.com").await;
    let families: Vec<uuid::Uuid> =
        sqlx::query_scalar("select family_id from refresh_families order by created_at")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(families.len(), 2);
    app.exec("update refresh_families set created_at = now() - interval '30 days', revoked_at = now()")
        .await;
    // The first family's tokens expired long ago and were purged; the second still has its token.
    sqlx::query("delete from refresh_tokens where family_id = $1")
        .bind(families[0])
        .execute(&app.db)
        .await
        .unwrap();
    let mut conn = app.db.acquire().await.unwrap();
    let purged = ostore_orders::auth::tokens::purge_families(&mut conn, 600, 14 * 24 * 3600)
        .await
        .unwrap();
    assert_eq!(purged, 1);
    let left: Vec<uuid::Uuid> = sqlx::query_scalar("select family_id from refresh_families")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(left, [families[1]]);
    // An access token living longer than a refresh token and a day: nothing is purged.
    app.exec("delete from refresh_tokens").await;
    assert_eq!(
        ostore_orders::auth::tokens::purge_families(&mut conn, 3 * 86_400, 86_400)
            .await
            .unwrap(),
        0
    );
}

/// A revocation written by another instance (or an operator's SQL) reaches this instance's
/// in-memory revocation check through its NOTIFY: the token stops working within moments, without
/// this instance having done anything.
#[tokio::test]
async fn a_family_revoked_elsewhere_stops_its_access_tokens_here() {
    let app = spawn_app().await;
    let (user_id, token) = app.customer("elsewhere@example.com").await;
    assert_eq!(app.get("/me", Some(&token)).await.status(), 200);
    sqlx::query("update refresh_families set revoked_at = now(), revoked_reason = 'test' where user_id = $1")
        .bind(user_id)
        .execute(&app.db)
        .await
        .unwrap();
    let mut status = 200;
    for _ in 0..50 {
        status = app.get("/me", Some(&token)).await.status().as_u16();
        if status == 401 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        status, 401,
        "a token of a family revoked in the database is refused"
    );
    // And a new login (a new family) works.
    let (fresh, _) = app.login("elsewhere@example.com", "password-123").await;
    assert_eq!(app.get("/me", Some(&fresh)).await.status(), 200);
}

/// The in-memory revocation sets follow the database: once current, a family revoked and an access
/// token denied by SQL (as another instance writes them) are in the sets within moments.
#[tokio::test]
async fn the_revocation_cache_follows_revocations_written_in_the_database() {
    use ostore_orders::auth::revocations::Revocations;
    let app = spawn_app().await;
    let (user_id, _) = app.customer("cache@example.com").await;
    let family: uuid::Uuid = sqlx::query_scalar("select family_id from refresh_families where user_id = $1")
        .bind(user_id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let cache = std::sync::Arc::new(Revocations::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let (cache, db, stop) = (cache.clone(), app.db.clone(), stop.clone());
        async move { cache.run(db, stop).await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cache.is_current() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cache.is_current(), "the cache became current");
    let jti = uuid::Uuid::new_v4();
    assert!(!cache.contains(jti, family));
    sqlx::query(
        "update refresh_families set revoked_at = now(), revoked_reason = 'test' where family_id = $1",
    )
    .bind(family)
    .execute(&app.db)
    .await
    .unwrap();
    sqlx::query("insert into denied_access_tokens (jti, expires_at) values ($1, now() + interval '1 hour')")
        .bind(jti)
        .execute(&app.db)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(cache.contains(uuid::Uuid::new_v4(), family) && cache.contains(jti, uuid::Uuid::new_v4()))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        cache.contains(uuid::Uuid::new_v4(), family),
        "the revoked family is known"
    );
    assert!(
        cache.contains(jti, uuid::Uuid::new_v4()),
        "the denied token is known"
    );
    stop.cancel();
    task.await.unwrap();
    assert!(!cache.is_current(), "a stopped cache is not trusted");
}
