//! The web app at `/`: the embedded bundle, its own CSP and the security headers, the assets'
//! types and caching, 404 for anything else, and gRPC-web calls from the page's own origin.

use crm_server::transport::rest::web::CSP;
use reqwest::{StatusCode, header};

use crate::helpers::{ALLOWED_ORIGIN, Backend, TestApp, spawn_app_with};

async fn app() -> TestApp {
    spawn_app_with(Backend::Sqlite, &[]).await.expect("app")
}

/// The `src` of the page's script and the `href` of its stylesheet, as index.html names them.
fn asset_urls(html: &str) -> (String, String) {
    let attr = |after: &str| {
        let start = html.find(after).expect("asset named") + after.len();
        html[start..].split('"').next().expect("quoted").to_owned()
    };
    (attr("src=\""), attr("rel=\"stylesheet\" href=\""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_with_its_own_csp_and_the_security_headers() {
    let app = app().await;
    let res = app.http.get(app.url("/")).send().await.expect("GET /");
    assert_eq!(res.status(), StatusCode::OK);
    let h = res.headers().clone();
    assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
    assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP);
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(CSP.contains(directive), "{directive} missing from {CSP}");
    }
    assert!(!CSP.contains("unsafe-inline") && !CSP.contains("unsafe-eval"));
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert_eq!(h["x-xss-protection"], "0");
    assert!(h.contains_key("permissions-policy"));
    assert_eq!(h[header::CACHE_CONTROL], "no-cache");

    let html = res.text().await.expect("body");
    // No inline script: the CSP would refuse it anyway.
    assert!(html.contains("<script type=\"module\" src=\"/app.js?v="));
    assert!(!html.contains("<script>") && !html.contains("style=\""));
    // HEAD works too, as for any GET route.
    let head = app.http.head(app.url("/")).send().await.expect("HEAD /");
    assert_eq!(head.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assets_have_their_types_and_are_kept_only_under_their_version() {
    let app = app().await;
    let html = app
        .http
        .get(app.url("/"))
        .send()
        .await
        .expect("GET /")
        .text()
        .await
        .expect("body");
    let (script, style) = asset_urls(&html);
    for (url, content_type, first_bytes) in [
        (&script, "text/javascript; charset=utf-8", None),
        (&style, "text/css; charset=utf-8", Some(":root")),
    ] {
        let res = app.http.get(app.url(url)).send().await.expect("asset");
        assert_eq!(res.status(), StatusCode::OK, "{url}");
        let h = res.headers().clone();
        assert_eq!(h[header::CONTENT_TYPE], content_type, "{url}");
        assert_eq!(
            h[header::CACHE_CONTROL],
            "public, max-age=31536000, immutable",
            "{url}"
        );
        // Assets need no policy of their own: they keep the API's.
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], "default-src 'none'");
        assert_eq!(h["x-content-type-options"], "nosniff");
        let etag = h[header::ETAG].to_str().expect("etag").to_owned();
        let version = url.split("?v=").nth(1).expect("versioned");
        assert_eq!(etag, format!("\"{version}\""), "the ETag is the version");
        let body = res.bytes().await.expect("body");
        assert!(!body.is_empty());
        if let Some(start) = first_bytes {
            assert!(body.starts_with(start.as_bytes()), "{url}");
        }

        // Revalidation: 304 without a body.
        let again = app
            .http
            .get(app.url(url))
            .header(header::IF_NONE_MATCH, &etag)
            .send()
            .await
            .expect("conditional");
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);

        // Under no version, or an old one, it is revalidated, never kept.
        let path = url.split('?').next().expect("path");
        for other in [path.to_owned(), format!("{path}?v=0000000000000000")] {
            let res = app.http.get(app.url(&other)).send().await.expect("asset");
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(res.headers()[header::CACHE_CONTROL], "no-cache", "{other}");
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_asset_paths_are_404() {
    let app = app().await;
    for path in [
        "/index.html",
        "/app.js.map",
        "/assets/app.js",
        "/favicon.ico",
        "/dist/app.js",
        "/app.css/x",
    ] {
        let res = app.http.get(app.url(path)).send().await.expect("GET");
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            res.headers()[header::CONTENT_SECURITY_POLICY],
            "default-src 'none'",
            "{path}"
        );
    }
    // The page takes no other method.
    let res = app.http.post(app.url("/")).send().await.expect("POST /");
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    app.stop().await;
}

/// The browser sends `Origin` on the page's POSTs even though they are same-origin. The
/// server must not need that origin in `CORS_ALLOWED_ORIGINS` (which lists other sites).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_may_call_grpc_web_from_its_own_origin_whatever_cors_lists() {
    for cors in [None, Some(ALLOWED_ORIGIN)] {
        let extra: Vec<(&str, &str)> = match cors {
            Some(origin) => vec![("CORS_ALLOWED_ORIGINS", origin)],
            None => vec![("CORS_ALLOWED_ORIGINS", "")],
        };
        let app = spawn_app_with(Backend::Sqlite, &extra).await.expect("app");
        let token = app.staff_token().await;
        let own_origin = app.url("");
        let res = app
            .http
            .post(app.url("/crm.v1.AuthService/GetMe"))
            .header("origin", &own_origin)
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .header("authorization", format!("Bearer {token}"))
            // An empty GetMeRequest in one uncompressed gRPC-web data frame.
            .body(vec![0u8, 0, 0, 0, 0])
            .send()
            .await
            .expect("grpc-web call");
        assert_eq!(res.status(), StatusCode::OK, "{cors:?}");
        let body = res.bytes().await.expect("body");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("grpc-status:0"), "{cors:?}: {text}");
        app.stop().await;
    }
}
