//! What the binaries share about flags: the library's closed sets as clap
//! possible values, so `--help` lists each name with its meaning. Included by
//! `src/main.rs` and `trainer/src/main.rs`; the library itself knows no clap.

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use fraudstream::choice::Choice;

/// A flag's parser for the values of `T`.
pub fn choice<T: Choice + Send + Sync>() -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(T::CHOICES.iter().map(|(_, name, help)| PossibleValue::new(*name).help(*help)))
        .map(|name| T::from_name(&name).expect("clap accepts only the listed names"))
}
