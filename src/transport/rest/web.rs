//! The web app (staff dashboard and applicant payment page): the bundle built in `web/` and
//! committed as `web/dist/`, embedded in the binary so that serving it needs no files on disk
//! and `cargo build` needs no npm.
//!
//! `/` is the page; `/app.js` and `/app.css` are its only assets. The page carries its own
//! Content-Security-Policy (security.md): scripts, styles and connections from our own origin
//! only, no inline script, never framed. The security-header layer keeps a CSP set here.

use std::sync::LazyLock;

use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use sha2::{Digest, Sha256};

/// The page's policy. `img-src data:` covers the empty inline favicon (no extra request);
/// `base-uri` and `form-action` close the two ways around `script-src` that CSP leaves open.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; \
frame-ancestors 'none'";

/// One embedded file.
pub struct Asset {
    bytes: &'static [u8],
    content_type: &'static str,
    /// The page itself (carries the CSP, always revalidated); otherwise an asset whose URL
    /// carries its version (`?v=`), so a browser may keep it.
    page: bool,
    /// The first 16 hex digits of SHA-256 of the bytes: the `?v=` that `web/build.mjs`
    /// writes into index.html, and the ETag.
    version: LazyLock<String>,
}

const INDEX_BYTES: &[u8] = include_bytes!("../../../web/dist/index.html");
const APP_JS_BYTES: &[u8] = include_bytes!("../../../web/dist/app.js");
const APP_CSS_BYTES: &[u8] = include_bytes!("../../../web/dist/app.css");

pub static INDEX_HTML: Asset = Asset {
    bytes: INDEX_BYTES,
    content_type: "text/html; charset=utf-8",
    page: true,
    version: LazyLock::new(|| short_hash(INDEX_BYTES)),
};
pub static APP_JS: Asset = Asset {
    bytes: APP_JS_BYTES,
    content_type: "text/javascript; charset=utf-8",
    page: false,
    version: LazyLock::new(|| short_hash(APP_JS_BYTES)),
};
pub static APP_CSS: Asset = Asset {
    bytes: APP_CSS_BYTES,
    content_type: "text/css; charset=utf-8",
    page: false,
    version: LazyLock::new(|| short_hash(APP_CSS_BYTES)),
};

fn short_hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

pub async fn index(uri: Uri, headers: HeaderMap) -> Response {
    serve(&INDEX_HTML, &uri, &headers)
}

pub async fn script(uri: Uri, headers: HeaderMap) -> Response {
    serve(&APP_JS, &uri, &headers)
}

pub async fn style(uri: Uri, headers: HeaderMap) -> Response {
    serve(&APP_CSS, &uri, &headers)
}

fn serve(asset: &'static Asset, uri: &Uri, headers: &HeaderMap) -> Response {
    let version = asset.version.as_str();
    let etag = format!("\"{version}\"");
    // index.html is revalidated on every load, so a deploy is picked up at once; an asset
    // requested under its current version never changes and is kept for a year. Under any
    // other URL (an old version, none) it is revalidated too, never pinned.
    let requested_version = uri.query().and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("v="))
            .map(str::to_owned)
    });
    let cache_control = if !asset.page && requested_version.as_deref() == Some(version) {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.bytes).into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, etag);
    }
    // Only the page needs a policy of its own; the assets keep the default `default-src 'none'`.
    if asset.page {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
    }
    response
}
