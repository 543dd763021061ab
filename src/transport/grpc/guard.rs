//! The tower layer in front of every gRPC method (native and gRPC-web alike): authenticate,
//! then count the call against its quota, then run the handler. Refusals are trailers-only
//! gRPC responses built without touching the database; a refused service token is audited
//! (in the background) only when the caller is within its quota, so a flood over quota does
//! no database work at all. Every answer of a rate-limited method carries the
//! `x-ratelimit-*` headers.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{Request, Response};
use tower::{Layer, Service};

use crate::{
    auth::{Principal, layer::Authenticator},
    error::AppError,
    ratelimit::{self, Checked, RateLimiter, Scope, Verdict},
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

impl<S, B, RB> Service<Request<B>> for Guard<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<RB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let decision = self.layer.auth.decide(&req);
        if let Ok(Some(principal)) = &decision {
            let (kind, name) = principal.actor();
            record_principal(kind, name);
        }
        let scope = Scope::for_grpc_path(req.uri().path());
        // A caller that proved no principal is counted by its address.
        let subject = ratelimit::subject(
            decision.as_ref().ok().and_then(Option::as_ref),
            RequestContext::client_ip_of(&req),
        );
        let checked = match scope {
            Some(scope) => self.layer.limiter.check_now(scope, &subject),
            None => Checked::Now(None),
        };
        // The clone that was made ready is the one to call (tower's readiness contract).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if let (Checked::AskRedis, Some(scope)) = (checked, scope) {
            let limiter = self.layer.limiter.clone();
            let auth = self.layer.auth.clone();
            return Box::pin(async move {
                let verdict = limiter.check(scope, &subject).await;
                answer(&mut inner, &auth, req, decision, verdict).await
            });
        }
        let verdict = match checked {
            Checked::Now(verdict) => verdict,
            Checked::AskRedis => None,
        };
        Box::pin(answer(&mut inner, &self.layer.auth, req, decision, verdict))
    }
}

/// Refuses, or calls the handler now; either way the answer gets the quota headers. The
/// handler is called before the returned future is first polled, so the future holds only the
/// handler's future and the verdict.
fn answer<S, B, RB>(
    inner: &mut S,
    auth: &Authenticator,
    mut req: Request<B>,
    decision: Result<Option<Principal>, AppError>,
    verdict: Option<Verdict>,
) -> impl Future<Output = Result<Response<RB>, S::Error>> + Send + use<S, B, RB>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
{
    let refusal = verdict.and_then(|v| v.refusal());
    if let (None, Err(refused)) = (&refusal, &decision) {
        auth.audit_token_refusal(req.uri().path(), refused, &RequestContext::of(&req));
    }
    let handled = match (refusal, decision) {
        (Some(refused), _) | (None, Err(refused)) => {
            let reason = refused.reason();
            let mut response = refused.into_grpc_response();
            // For the request metrics, which need not decode the status details.
            response.extensions_mut().insert(reason);
            Err(response)
        }
        (None, Ok(principal)) => {
            if let Some(principal) = principal {
                req.extensions_mut().insert(principal);
            }
            Ok(inner.call(req))
        }
    };
    async move {
        let mut response = match handled {
            Ok(handler) => handler.await?,
            Err(refused) => refused,
        };
        if let Some(verdict) = verdict {
            verdict.write_headers(response.headers_mut());
        }
        Ok(response)
    }
}
