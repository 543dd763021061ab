//! crm-server: the admissions CRM backend. gRPC, gRPC-web and REST on one port.
//!
//! A request flows one way: transport -> auth -> handler (convert) -> domain -> repo ->
//! database; errors flow back through `?` into `AppError` and its one table.

pub mod applications;
pub mod audit;
pub mod auth;
pub mod background;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod idempotency;
pub mod notify;
pub mod paging;
pub mod payments;
pub mod ratelimit;
pub mod reloaded;
pub mod startup;
pub mod state;
pub mod telemetry;
pub mod transport;
pub mod validate;

/// Code generated from `proto/crm/v1/*.proto`.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("crm.v1");

    /// The encoded descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("crm_descriptor");
}
