//! fraudstream: streaming fraud scoring on Kafka with libtorch.
//!
//! One library holds the domain; the `fraudstream` and `fraudstream-trainer`
//! binaries are thin command lines over it. Lower modules never import
//! higher ones: `payment`, `codec`, `features`, `history`, `simulate` and `drift` are the
//! ground floor (no Kafka, no torch); `model` stands on `features`; `kafka` and the
//! pipeline stand on `model`.

pub mod api;
pub mod choice;
pub mod codec;
pub mod consume;
pub mod decision;
pub mod demo;
pub mod drift;
pub mod feature_log;
pub mod features;
pub mod history;
pub mod kafka;
pub mod lifecycle;
pub mod model;
pub mod model_watch;
pub mod monitor;
pub mod payment;
pub mod pipeline;
pub mod produce;
pub mod registry;
pub mod scorer;
pub mod scoring;
pub mod simulate;
pub mod telemetry;
pub mod training;

pub use codec::{Codec, WireFormat};
pub use features::{FeatureEncoder, FeatureSpec};
pub use payment::{Payment, PaymentLabel, ScoredPayment, ShadowScore};
pub use simulate::Simulator;

/// Any library failure, for callers that do not need to tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Encode(#[from] features::EncodeError),
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Store(#[from] model::StoreError),
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
}
