//! The ZipAR algorithm, model-agnostic. Nothing here imports egui; only `engine` touches the
//! model (and through it, tensors).

pub mod adaptive;
pub mod engine;
pub mod exact;
pub mod plan;
pub mod sampling;
pub mod schedule;
pub mod trace;

pub use engine::{Flow, GenerateParams, PassReport, generate};
pub use sampling::{Sampler, Sampling};
pub use schedule::{Cell, Layout, Mode, Schedule};
pub use trace::DecodeTrace;
