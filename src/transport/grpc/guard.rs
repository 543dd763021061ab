//! The tower layer in front of every gRPC method (native and gRPC-web alike): authenticate,
//! then count the call against its quota, then run the handler. Refusals are trailers-only
//! gRPC responses built without touching the database, and every answer of a rate-limited
//! method carries the `x-ratelimit-*` headers.

use std::task::{Context, Poll};

use axum::body::Body;
use futures::future::BoxFuture;
use http::{Request, Response};
use tower::{Layer, Service};

use crate::{
    auth::layer::Authenticator,
    ratelimit::{self, RateLimiter, Scope},
    transport::context::{RequestContext, record_principal},
};

#[derive(Clone)]
pub struct GuardLayer {
    auth: Authenticator,
    limiter: RateLimiter,
}

impl GuardLayer {
    pub fn new(auth: Authenticator, limiter: RateLimiter) -> Self {
        Self { auth, limiter }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Guard {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    layer: GuardLayer,
}

impl<S, B> Service<Request<B>> for Guard<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let decision = self.layer.auth.decide(&req);
        if let Ok(Some(principal)) = &decision {
            let (kind, name) = principal.actor();
            record_principal(kind, name);
        }
        let scope = Scope::for_grpc_path(req.uri().path());
        // A caller that proved no principal is counted by its address.
        let subject = ratelimit::subject(
            decision.as_ref().ok().and_then(Option::as_ref),
            RequestContext::of(&req).client_ip,
        );
        let limiter = self.layer.limiter.clone();
        // The clone that was made ready is the one to call (tower's readiness contract).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let verdict = match scope {
                Some(scope) => limiter.check(scope, &subject).await,
                None => None,
            };
            let refusal = verdict.and_then(|v| v.refusal());
            let mut response = match (refusal, decision) {
                (Some(refused), _) | (None, Err(refused)) => {
                    let reason = refused.reason();
                    let mut response = refused.into_status().into_http();
                    // For the request metrics, which need not decode the status details.
                    response.extensions_mut().insert(reason);
                    response
                }
                (None, Ok(principal)) => {
                    if let Some(principal) = principal {
                        req.extensions_mut().insert(principal);
                    }
                    inner.call(req).await?
                }
            };
            if let Some(verdict) = verdict {
                verdict.write_headers(response.headers_mut());
            }
            Ok(response)
        })
    }
}
