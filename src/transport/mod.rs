//! Everything between the socket and the domain: request context, gRPC services, REST routes.

pub mod context;
pub mod dispatch;
pub mod grpc;
pub mod limits;
pub mod rest;
pub mod socket;
