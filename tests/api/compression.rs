//! Cached reads in gzip and brotli: negotiated by `Accept-Encoding`, the same JSON once decoded,
//! an ETag per form, and each form made once per cache fill, not per request.

use std::io::Read;

use serde_json::{json, Value};

use crate::helpers::{Backend, TestApp, TestUser};

/// What a browser sends.
const BROWSER: &str = "gzip, deflate, br, zstd";

struct Answer {
    status: u16,
    encoding: Option<String>,
    etag: Option<String>,
    vary: Option<String>,
    x_cache: Option<String>,
    /// The body as sent.
    wire: Vec<u8>,
    /// The body decoded.
    json: Value,
}

async fn read(app: &TestApp, path: &str, token: &str, accept: Option<&str>, if_none_match: Option<&str>) -> Answer {
    let mut request = app.client.get(app.url(path)).bearer_auth(token);
    if let Some(accept) = accept {
        request = request.header("accept-encoding", accept);
    }
    if let Some(etag) = if_none_match {
        request = request.header("if-none-match", etag);
    }
    let response = request.send().await.expect("request sent");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|value| value.to_str().unwrap().to_owned())
    };
    let (status, encoding, etag, vary, x_cache) = (
        response.status().as_u16(),
        header("content-encoding"),
        header("etag"),
        header("vary"),
        header("x-cache"),
    );
    let wire = response.bytes().await.unwrap().to_vec();
    let mut decoded = Vec::new();
    match encoding.as_deref() {
        None => decoded.clone_from(&wire),
        Some("gzip") => {
            flate2::read::GzDecoder::new(&wire[..])
                .read_to_end(&mut decoded)
                .unwrap();
        }
        Some("br") => {
            brotli::Decompressor::new(&wire[..], 4096)
                .read_to_end(&mut decoded)
                .unwrap();
        }
        Some(other) => panic!("unexpected Content-Encoding {other}"),
    }
    let json = serde_json::from_slice(&decoded).unwrap_or(Value::Null);
    Answer {
        status,
        encoding,
        etag,
        vary,
        x_cache,
        wire,
        json,
    }
}

/// A project whose task list is a few kilobytes of JSON, and the list's path.
async fn long_task_list(app: &TestApp) -> (TestUser, String) {
    let (user, _, project) = app.user_with_project().await;
    let project_id = project["id"].as_str().unwrap();
    for n in 0..12 {
        let task = json!({ "title": format!("Task {n}"), "description": "Check the figures against last week's run." });
        app.create_task(&user, project_id, task).await;
    }
    (user, format!("/api/projects/{project_id}/tasks"))
}

/// How many times the cache compressed a body in `encoding` (`/metrics`).
async fn compressions(app: &TestApp, encoding: &str) -> f64 {
    let series = format!("nestling_cache_compressions_total{{encoding=\"{encoding}\"}}");
    app.metric(&series)
        .await
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

#[tokio::test]
async fn a_browser_gets_the_cached_task_list_in_brotli_gzip_clients_in_gzip_and_the_same_json_as_everyone() {
    let app = TestApp::spawn().await;
    let (user, path) = long_task_list(&app).await;
    let plain = read(&app, &path, &user.token, None, None).await;
    assert_eq!((plain.status, plain.encoding.as_deref()), (200, None));
    assert_eq!(
        plain.vary.as_deref(),
        Some("accept-encoding"),
        "a shared cache must key on it"
    );
    assert!(plain.wire.len() > 2048, "the list is {} bytes", plain.wire.len());

    for (accept, coding) in [
        (BROWSER, "br"),
        ("gzip", "gzip"),
        ("br;q=0.5, gzip", "gzip"),
        ("gzip;q=0, br;q=0", ""),
    ] {
        let answer = read(&app, &path, &user.token, Some(accept), None).await;
        assert_eq!(answer.x_cache.as_deref(), Some("HIT-L1"), "{accept}");
        assert_eq!(
            answer.encoding.as_deref().unwrap_or(""),
            coding,
            "Accept-Encoding: {accept}"
        );
        assert_eq!(answer.json, plain.json, "{accept}: the same JSON once decoded");
        assert_eq!(answer.vary.as_deref(), Some("accept-encoding"), "{accept}");
        let plain_tag = plain.etag.as_deref().unwrap();
        let expected_tag = match coding {
            "" => plain_tag.to_owned(),
            _ => format!("{}-{coding}\"", plain_tag.trim_end_matches('"')),
        };
        assert_eq!(
            answer.etag.as_deref(),
            Some(expected_tag.as_str()),
            "{accept}: an ETag per form"
        );
        if !coding.is_empty() {
            assert!(
                answer.wire.len() * 3 < plain.wire.len(),
                "{accept}: {} bytes on the wire for {}",
                answer.wire.len(),
                plain.wire.len()
            );
        }
    }
}

#[tokio::test]
async fn each_form_is_compressed_once_per_fill_not_per_request() {
    let app = TestApp::spawn().await;
    let (user, path) = long_task_list(&app).await;
    let (gzip_before, brotli_before) = (compressions(&app, "gzip").await, compressions(&app, "br").await);
    for _ in 0..5 {
        read(&app, &path, &user.token, Some("gzip"), None).await;
        read(&app, &path, &user.token, Some(BROWSER), None).await;
    }
    let hit = read(&app, &path, &user.token, Some("gzip"), None).await;
    assert_eq!(hit.x_cache.as_deref(), Some("HIT-L1"));
    assert_eq!(
        compressions(&app, "gzip").await,
        gzip_before + 1.0,
        "ten gzip reads of one entry"
    );
    assert_eq!(
        compressions(&app, "br").await,
        brotli_before + 1.0,
        "five brotli reads of one entry"
    );

    // A write replaces the entry: its forms go with it.
    let task_id = hit.json["items"][0]["id"].as_str().unwrap().to_owned();
    let patch = app
        .patch(
            &format!("/api/tasks/{task_id}"),
            &user.token,
            json!({ "title": "Renamed" }),
        )
        .await;
    patch.assert_status(200);
    let fresh = read(&app, &path, &user.token, Some("gzip"), None).await;
    assert_eq!(fresh.x_cache.as_deref(), Some("MISS"));
    assert_eq!(
        fresh.json["items"][0]["title"], "Renamed",
        "the gzip form is of the new list"
    );
    assert_eq!(compressions(&app, "gzip").await, gzip_before + 2.0);
}

#[tokio::test]
async fn a_client_revalidates_the_form_it_holds_and_a_304_carries_no_content_encoding() {
    let app = TestApp::spawn().await;
    let (user, path) = long_task_list(&app).await;
    let gzip = read(&app, &path, &user.token, Some("gzip"), None).await;
    let gzip_tag = gzip.etag.unwrap();

    let unchanged = read(&app, &path, &user.token, Some("gzip"), Some(&gzip_tag)).await;
    assert_eq!(unchanged.status, 304);
    assert_eq!(unchanged.encoding, None, "a 304 has no body to encode");
    assert_eq!(unchanged.etag.as_deref(), Some(gzip_tag.as_str()));
    assert_eq!(unchanged.vary.as_deref(), Some("accept-encoding"));
    assert!(unchanged.wire.is_empty());

    // The gzip tag does not validate another form.
    let other_form = read(&app, &path, &user.token, Some("br"), Some(&gzip_tag)).await;
    assert_eq!((other_form.status, other_form.encoding.as_deref()), (200, Some("br")));
    let plain = read(&app, &path, &user.token, None, Some(&gzip_tag)).await;
    assert_eq!((plain.status, plain.encoding), (200, None));
}

#[tokio::test]
async fn small_answers_are_sent_as_they_are() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;
    let path = format!("/api/projects/{}", project["id"].as_str().unwrap());
    let answer = read(&app, &path, &user.token, Some(BROWSER), None).await;
    assert!(answer.wire.len() < 1024, "a project is {} bytes", answer.wire.len());
    assert_eq!((answer.status, answer.encoding), (200, None));
    assert_eq!(answer.vary.as_deref(), Some("accept-encoding"));
}

/// Another instance fills its L1 from Redis and sends the same compressed form with the same
/// ETag, so a client revalidates against any instance behind the load balancer.
#[tokio::test]
async fn every_instance_sends_the_same_form_and_etag_with_redis() {
    let backend = Backend::redis().await;
    let a = TestApp::builder().backend(backend).spawn().await;
    let b = backend.sibling(&a).await;
    let (user, path) = long_task_list(&a).await;
    let from_a = read(&a, &path, &user.token, Some(BROWSER), None).await;
    let from_b = read(&b, &path, &user.token, Some(BROWSER), None).await;
    assert_eq!(from_b.x_cache.as_deref(), Some("HIT-L2"));
    assert_eq!(from_b.encoding.as_deref(), Some("br"));
    assert_eq!((from_b.etag, from_b.json), (from_a.etag.clone(), from_a.json));
    let revalidated = read(&b, &path, &user.token, Some(BROWSER), from_a.etag.as_deref()).await;
    assert_eq!(revalidated.status, 304);
}
