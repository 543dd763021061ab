//! The one outer layer every request passes first, whatever the protocol: it gives the request
//! its context (request id, client address, trace id) and its span, enforces the transport
//! limits (header size, deadline), counts the answer in the metrics and adds the request id and
//! the HTTP security headers. One layer, one boxed future per request: this is the hot path.

use std::{
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::body::Body;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use ipnet::IpNet;
use tonic::transport::server::TcpConnectInfo;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::{
    telemetry::{TRACEPARENT, metrics},
    transport::limits::{self, Exceeded, MAX_HEADER_BYTES},
};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    /// The TCP peer, or the right-most untrusted `X-Forwarded-For` hop behind trusted proxies.
    pub client_ip: IpAddr,
    /// From a W3C `traceparent` header, when the caller sent one.
    pub trace_id: Option<String>,
    /// When the request reached us: tells a replayed refresh token from a concurrent one.
    pub received_at: chrono::DateTime<chrono::Utc>,
}

impl RequestContext {
    /// Reads the context a request was given by `ContextLayer`.
    pub fn of<B>(req: &Request<B>) -> Self {
        req.extensions()
            .get::<RequestContext>()
            .cloned()
            .unwrap_or_else(Self::unknown)
    }

    /// The client address alone, without copying the whole context.
    pub fn client_ip_of<B>(req: &Request<B>) -> IpAddr {
        req.extensions()
            .get::<RequestContext>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |ctx| ctx.client_ip)
    }

    pub fn unknown() -> Self {
        Self {
            request_id: uuid::Uuid::new_v4().to_string(),
            client_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            trace_id: None,
            received_at: chrono::Utc::now(),
        }
    }
}

#[derive(Clone)]
pub struct ContextLayer {
    trusted_proxies: Arc<[IpNet]>,
    production: bool,
    /// `REQUEST_TIMEOUT_SECONDS`: until the answer's headers are sent.
    deadline: Duration,
}

impl ContextLayer {
    pub fn new(trusted_proxies: Vec<IpNet>, production: bool, deadline: Duration) -> Self {
        Self {
            trusted_proxies: trusted_proxies.into(),
            production,
            deadline,
        }
    }
}

impl<S> Layer<S> for ContextLayer {
    type Service = ContextService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ContextService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ContextService<S> {
    inner: S,
    layer: ContextLayer,
}

impl<S, B> Service<Request<B>> for ContextService<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let started = Instant::now();
        let path = req.uri().path();
        let method = metrics::method_label(path);
        // Only provider routes answer refusals in a format that depends on the path.
        let provider_path = path.starts_with("/webhooks/").then(|| path.to_owned());
        let headers = req.headers();
        let is_grpc = headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let oversized = limits::header_bytes(headers) > MAX_HEADER_BYTES;
        let peer = req
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(|info| info.remote_addr)
            .or_else(|| {
                req.extensions()
                    .get::<axum::extract::ConnectInfo<SocketAddr>>()
                    .map(|c| c.0)
            })
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let (request_id, request_id_header) = request_id(headers);
        let mut ctx = RequestContext {
            request_id,
            client_ip: client_ip(peer, headers, &self.layer.trusted_proxies),
            trace_id: trace_id(headers),
            received_at: chrono::Utc::now(),
        };
        let span = request_span(method, &req, &mut ctx);
        req.extensions_mut().insert(ctx);
        let (production, deadline) = (self.layer.production, self.layer.deadline);
        let answer = (!oversized).then(|| span.in_scope(|| self.inner.call(req)));
        let request_span = span.clone();
        Box::pin(
            async move {
                let exceeded = match answer {
                    None => Err(Exceeded::HeaderSize),
                    Some(answer) => match tokio::time::timeout(deadline, answer).await {
                        Ok(Ok(response)) => Ok(response),
                        Ok(Err(never)) => match never {},
                        Err(_) => {
                            tracing::warn!(method, ?deadline, "request deadline exceeded");
                            Err(Exceeded::Deadline)
                        }
                    },
                };
                let mut response = exceeded.unwrap_or_else(|exceeded| {
                    limits::refusal(exceeded, is_grpc, provider_path.as_deref())
                });
                metrics::record_request(method, started, &response, &request_span);
                let headers = response.headers_mut();
                // One growth of the map for everything added below, not one per header.
                headers.reserve(SECURITY_HEADERS.len() + 3);
                if let Some(id) = request_id_header {
                    headers.insert(X_REQUEST_ID.clone(), id);
                }
                security_headers(headers, production);
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// The one server span of a request. Later layers fill in the principal (`record_principal`);
/// the outcome is recorded when the answer is ready. No header values are recorded, so no
/// credential can reach a span.
///
/// Whether the span is exported was decided before it exists (`telemetry::sample`). An
/// exported span carries the OpenTelemetry fields and continues the caller's trace; any other
/// request gets a span for its log lines only, under a target the trace layer does not admit,
/// with just the ids that tie those lines together: the log layer formats a span's fields when
/// it is made and again on every later record, which every request would pay for.
fn request_span<B>(
    method: &'static str,
    req: &Request<B>,
    ctx: &mut RequestContext,
) -> tracing::Span {
    use crate::telemetry::{self, EXPORTED_TARGET, Sampling};
    use tracing::field::Empty;
    match telemetry::sample(req.headers(), method) {
        Sampling::Exported(parent) => {
            let span = tracing::info_span!(
                target: EXPORTED_TARGET,
                "request",
                otel.name = method,
                otel.kind = "server",
                otel.status_code = Empty,
                http.request.method = %req.method(),
                request_id = %ctx.request_id,
                trace_id = Empty,
                principal.kind = Empty,
                principal.name = Empty,
                outcome = Empty,
                status = Empty,
            );
            if let Some(parent) = parent {
                telemetry::set_parent(&span, parent);
            }
            if let Some(exported) = telemetry::trace_id_of(&span) {
                ctx.trace_id = Some(exported);
            }
            if let Some(trace_id) = &ctx.trace_id {
                span.record("trace_id", trace_id.as_str());
            }
            span
        }
        Sampling::Off | Sampling::Dropped => match &ctx.trace_id {
            Some(trace_id) => {
                tracing::info_span!("request", request_id = %ctx.request_id, trace_id = %trace_id)
            }
            None => tracing::info_span!("request", request_id = %ctx.request_id),
        },
    }
}

/// Names the caller on the current request span, when it is exported: its kind (`service`,
/// `user`, `provider`) and its name (service name, user id, provider), never a credential.
pub fn record_principal(kind: &str, name: &str) {
    let span = tracing::Span::current();
    if crate::telemetry::is_exported(&span) {
        span.record("principal.kind", kind)
            .record("principal.name", name);
    }
}

/// The caller's `x-request-id` when it is sane (1–128 visible ASCII), else a fresh UUID; and
/// the same as the answer's header value, never indexed (see `never_indexed`).
fn request_id(headers: &HeaderMap) -> (String, Option<HeaderValue>) {
    let callers = headers.get(&X_REQUEST_ID).and_then(|value| {
        let id = value.to_str().ok()?;
        let sane = !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic());
        sane.then(|| (id.to_owned(), Some(value.clone())))
    });
    let (id, value) = callers.unwrap_or_else(|| {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id: &str = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
        (id.to_owned(), HeaderValue::from_bytes(id.as_bytes()).ok())
    });
    (id, value.map(never_indexed))
}

/// `X-Forwarded-For` counts only from a trusted proxy; then the right-most hop that is not
/// itself a trusted proxy is the client.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<IpAddr> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|hop| hop.trim().parse().ok())
        .collect();
    hops.into_iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .unwrap_or(peer)
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
fn trace_id(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(&TRACEPARENT)?.to_str().ok()?;
    let mut parts = value.split('-');
    let (_version, trace) = (parts.next()?, parts.next()?);
    let valid = trace.len() == 32
        && trace.bytes().all(|b| b.is_ascii_hexdigit())
        && trace.bytes().any(|b| b != b'0');
    valid.then(|| trace.to_ascii_lowercase())
}

/// Marks a value that differs on every answer (the request id, the quota left) as one HPACK
/// must never add to a connection's table. Added, each would evict older entries, the
/// constant headers of every answer among them, which would then go out in full again.
/// callgrind, per `ListPrograms` answer: 1 900 instructions fewer in h2's table, 1 700 fewer
/// net (the two names now go out as literals), of about 10 000 spent on its headers.
pub fn never_indexed(mut value: HeaderValue) -> HeaderValue {
    value.set_sensitive(true);
    value
}

/// The OWASP headers of security.md, names parsed once (this runs on every answer).
static SECURITY_HEADERS: [(HeaderName, HeaderValue); 5] = [
    (
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    ),
    (
        HeaderName::from_static("x-frame-options"),
        HeaderValue::from_static("DENY"),
    ),
    (
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    ),
    (
        HeaderName::from_static("permissions-policy"),
        HeaderValue::from_static(
            "accelerometer=(), camera=(), geolocation=(), gyroscope=(), magnetometer=(), microphone=(), payment=(), usb=()",
        ),
    ),
    (
        HeaderName::from_static("x-xss-protection"),
        HeaderValue::from_static("0"),
    ),
];

/// The OWASP headers of security.md. The web app's CSP is set by its own route and kept.
fn security_headers(headers: &mut HeaderMap, production: bool) {
    for (name, value) in &SECURITY_HEADERS {
        headers.insert(name.clone(), value.clone());
    }
    headers
        .entry(http::header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static("default-src 'none'"));
    if production {
        headers.insert(
            http::header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000; includeSubDomains"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xff(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", value.parse().expect("header"));
        h
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let peer: IpAddr = "203.0.113.9".parse().expect("ip");
        assert_eq!(client_ip(peer, &xff("1.2.3.4"), &[]), peer);
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("cidr")];
        let peer: IpAddr = "10.0.0.2".parse().expect("ip");
        // The client forged the first hop; the proxy chain appended the real one.
        let got = client_ip(peer, &xff("6.6.6.6, 198.51.100.7, 10.0.0.5"), &trusted);
        assert_eq!(got, "198.51.100.7".parse::<IpAddr>().expect("ip"));
        assert_eq!(client_ip(peer, &HeaderMap::new(), &trusted), peer);
    }

    #[test]
    fn traceparent_yields_the_trace_id() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .expect("header"),
        );
        assert_eq!(
            trace_id(&h).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        h.insert(
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
                .parse()
                .expect("header"),
        );
        assert_eq!(trace_id(&h), None);
    }
}
