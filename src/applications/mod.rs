//! Applications submitted by the bots and reviewed by staff, and the program catalog.

pub mod catalog;
pub mod events;
pub mod model;
pub mod repo;
pub mod service;

pub use catalog::{Catalog, Program};
pub use events::{ApplicationEvent, EventKind, Events};
pub use model::{Application, ApplicationStatus, Language, SubmitInput};
pub use repo::ListFilter;
pub use service::Applications;
