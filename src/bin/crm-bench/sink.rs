//! A stand-in OTLP collector for P10, answering both OTLP transports on one port and counting
//! the export requests and bytes, so the run can show that spans did arrive:
//! - OTLP/gRPC: `TraceService/Export` over h2c, answered with an empty
//!   `ExportTraceServiceResponse` and `grpc-status: 0` (full success);
//! - OTLP/HTTP: `POST /v1/traces`, answered 200 with an empty protobuf body.
//!
//! It runs on the orchestrator's runtime (load CPU), never on the server's core.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
    routing::post,
};
use http_body_util::StreamBody;
use hyper::body::Frame;

const GRPC_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    bytes: AtomicU64,
}

pub struct Sink {
    pub addr: SocketAddr,
    counts: Arc<Counts>,
}

impl Sink {
    pub fn start(runtime: &tokio::runtime::Runtime) -> anyhow::Result<Self> {
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts::default());
        let app = Router::new()
            .route("/v1/traces", post(http_export))
            .route(GRPC_EXPORT, post(grpc_export))
            .with_state(counts.clone());
        runtime.spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("OTLP sink stopped: {e}");
            }
        });
        Ok(Self { addr, counts })
    }

    /// Export requests and their body bytes received so far.
    pub fn received(&self) -> (u64, u64) {
        (
            self.counts.requests.load(Ordering::Relaxed),
            self.counts.bytes.load(Ordering::Relaxed),
        )
    }
}

/// `crm-bench otlp-sink`: the sink on its own, printing what it received every 2 s (to
/// check an exporter by hand).
pub fn standalone() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let sink = Sink::start(&runtime)?;
    println!("OTLP sink on http://{} (gRPC and /v1/traces)", sink.addr);
    loop {
        std::thread::sleep(std::time::Duration::from_secs(2));
        let (requests, bytes) = sink.received();
        println!("{requests} export requests, {bytes} bytes");
    }
}

fn count(counts: &Counts, body: &Bytes) {
    counts.requests.fetch_add(1, Ordering::Relaxed);
    counts.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
}

async fn http_export(State(counts): State<Arc<Counts>>, body: Bytes) -> impl IntoResponse {
    count(&counts, &body);
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        Bytes::new(),
    )
}

async fn grpc_export(State(counts): State<Arc<Counts>>, body: Bytes) -> Response {
    count(&counts, &body);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    // One gRPC frame holding the empty response message, then the trailers.
    let frames = futures::stream::iter([
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
        Ok(Frame::trailers(trailers)),
    ]);
    let mut response = Response::new(Body::new(StreamBody::new(frames)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}
