//! Closed sets of named values (wire formats, devices, log formats, record
//! kinds), described once for whatever front end parses them.
//!
//! Why: domain types know nothing of the command line. The binaries turn
//! these tables into their flags' possible values (`src/cli.rs`); the
//! library only says which names exist and what each means.

/// A closed set of values, each with a name and a one-line meaning.
pub trait Choice: Sized + Copy + PartialEq + 'static {
    /// Every value, its name and its meaning, in the order to list them.
    const CHOICES: &'static [(Self, &'static str, &'static str)];

    /// The value's name.
    fn name(self) -> &'static str {
        Self::CHOICES.iter().find(|(value, ..)| *value == self).map_or("", |(_, name, _)| name)
    }

    /// The value with this name, if there is one.
    fn from_name(name: &str) -> Option<Self> {
        Self::CHOICES.iter().find(|(_, n, _)| n.eq_ignore_ascii_case(name)).map(|(value, ..)| *value)
    }
}

#[cfg(test)]
mod tests {
    use super::Choice;
    use crate::codec::WireFormat;
    use crate::consume::{EventKind, Isolation};
    use crate::model::Device;
    use crate::telemetry::LogFormat;

    fn round_trips<T: Choice + std::fmt::Debug>() {
        for (value, name, help) in T::CHOICES {
            assert_eq!(T::from_name(name), Some(*value));
            assert_eq!(value.name(), *name);
            assert!(!help.is_empty());
        }
        assert_eq!(T::from_name("no-such-name"), None);
    }

    #[test]
    fn every_name_parses_back_to_its_value() {
        round_trips::<WireFormat>();
        round_trips::<Device>();
        round_trips::<LogFormat>();
        round_trips::<EventKind>();
        round_trips::<Isolation>();
        round_trips::<crate::pipeline::Delivery>();
    }
}
