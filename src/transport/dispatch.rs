//! The service the listener serves: gRPC (native and gRPC-web) by path, REST for the rest
//! (after the script-query filter, a plain function call here).
//!
//! The gRPC side is composed with plain tower layers around tonic's routes, not with axum's
//! `Router::layer`: axum wraps a route in a fresh boxed service per `layer` call and clones a
//! route's whole boxed stack on every request, so each layer added that way cost more than the
//! layer's own work (README, Benchmarks). Here a request is cloned into nothing but `Arc`s.

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use axum::body::Body;
use futures::future::{Either, Map, Ready, ready};
use http::{Request, Response};
use tower::Service;

/// Whether `path` names a gRPC method: `/<package>.<Service>/<Method>` of ours, or of the
/// standard health and reflection services.
pub fn is_grpc_path(path: &str) -> bool {
    path.starts_with("/crm.v1.") || path.starts_with("/grpc.")
}

#[derive(Clone)]
pub struct Dispatch<G> {
    grpc: G,
    rest: axum::Router,
}

impl<G> Dispatch<G> {
    pub fn new(grpc: G, rest: axum::Router) -> Self {
        Self { grpc, rest }
    }
}

type IntoAxum<B> = fn(Result<Response<B>, Infallible>) -> Result<Response<Body>, Infallible>;

impl<G, B, GB> Service<Request<B>> for Dispatch<G>
where
    G: Service<Request<B>, Response = Response<GB>, Error = Infallible>,
    B: http_body::Body<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
    GB: http_body::Body<Data = axum::body::Bytes> + Send + 'static,
    GB::Error: Into<axum::BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<
        Map<G::Future, IntoAxum<GB>>,
        Either<
            Ready<Result<Response<Body>, Infallible>>,
            axum::routing::future::RouteFuture<Infallible>,
        >,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.grpc.poll_ready(cx) {
            Poll::Ready(Ok(())) => Service::<Request<B>>::poll_ready(&mut self.rest, cx),
            other => other,
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        use futures::FutureExt;
        if is_grpc_path(req.uri().path()) {
            let into_axum: IntoAxum<GB> = |answer| answer.map(|res| res.map(Body::new));
            Either::Left(self.grpc.call(req).map(into_axum))
        } else if let Some(refusal) = super::rest::refuse_script_query(req.uri()) {
            Either::Right(Either::Left(ready(Ok(refusal))))
        } else {
            Either::Right(Either::Right(self.rest.call(req)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_paths_are_told_from_rest_routes() {
        for grpc in [
            "/crm.v1.ApplicationService/ListPrograms",
            "/crm.v1.Nope/Nothing",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(is_grpc_path(grpc), "{grpc}");
        }
        for rest in [
            "/",
            "/app.js",
            "/webhooks/payme",
            "/api/v1/bot1/application",
            "/healthz",
            "/metrics",
        ] {
            assert!(!is_grpc_path(rest), "{rest}");
        }
    }
}
