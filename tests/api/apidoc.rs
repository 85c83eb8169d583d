//! The API's own description: problem+json schemas in `/openapi.json` and the browsable page at
//! `/docs`, both served by the binary with no outside asset.

use serde_json::{Value, json};

use crate::support::{assert_problem, spawn_app};

#[tokio::test]
async fn every_error_response_in_the_openapi_document_is_a_problem_document() {
    let app = spawn_app().await;
    let doc: Value = app.get_json("/openapi.json", None).await;
    let schema = &doc["components"]["schemas"]["Problem"];
    let props = schema["properties"].as_object().expect("a Problem schema");
    for member in ["type", "title", "status", "detail", "error"] {
        assert!(props.contains_key(member), "Problem lacks {member}");
        assert!(
            schema["required"].as_array().unwrap().contains(&json!(member)),
            "{member} is required"
        );
    }
    let mut errors = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for (status, resp) in op["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    errors += 1;
                    assert_eq!(
                        resp["content"]["application/problem+json"]["schema"]["$ref"],
                        "#/components/schemas/Problem",
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }
    assert!(errors > 20, "only {errors} error responses documented");

    // A real error answer uses only members the schema describes.
    let (_, token) = app.customer("apidoc@example.com").await;
    let resp = app
        .place(&token, "apidoc-1", json!([{"productID": 1, "quantity": 0}]))
        .await;
    let body = assert_problem(resp, 422).await;
    assert!(body.get("field").is_some(), "{body}");
    for key in body.as_object().unwrap().keys() {
        assert!(
            props.contains_key(key),
            "member {key} is not in the Problem schema"
        );
    }
}

#[tokio::test]
async fn the_docs_page_is_served_from_the_binary_and_reads_the_openapi_document() {
    let app = spawn_app().await;
    let page = app.get("/docs/", None).await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    let init = app.get("/docs/swagger-initializer.js", None).await;
    assert_eq!(init.status(), 200);
    assert!(init.text().await.unwrap().contains("/openapi.json"));
    let bundle = app.get("/docs/swagger-ui-bundle.js", None).await;
    assert_eq!(bundle.status(), 200);
    assert!(
        bundle.bytes().await.unwrap().len() > 100_000,
        "the UI's script is embedded"
    );
}
