//! One integration test binary: every test starts the real server (port 0) on a fresh
//! database and talks to it over real gRPC, gRPC-web and HTTP connections.

mod helpers;

mod accounts;
mod binary;
mod catalog;
mod click_uzum;
mod deploy;
mod payme;
mod payments;
mod ratelimit;
mod resilience;
mod service_tokens;
mod staff;
mod submit;
mod telemetry;
mod transport;
mod web;
