//! Version labels: which version of the store serves (`stable`) and which is
//! watched beside it (`canary`), made explicit in the store itself.
//!
//! Why in the store: it is the single source of truth every scorer already
//! polls, so a label move (a promotion, a rollback) reaches every scorer
//! within one poll interval, backwards as well as forwards, with nothing
//! else to run. A label is a small object `labels/<label>` naming a version;
//! every move is also written as its own object under
//! `labels/history/<label>/`, never rewritten, so the history is an audit
//! trail and `rollback` knows where `stable` was before. A store without
//! labels serves its newest complete version, as before labels existed.

use serde::{Deserialize, Serialize};

use super::store::{ModelStore, StoreError};
use crate::payment::now_ms;

/// The labels a version can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Label {
    /// What scorers serve.
    Stable,
    /// A candidate, watched in shadow.
    Canary,
}

impl crate::choice::Choice for Label {
    const CHOICES: &'static [(Self, &'static str, &'static str)] = &[
        (Self::Stable, "stable", "the version scorers serve"),
        (Self::Canary, "canary", "a candidate watched beside stable"),
    ];
}

/// One move of a label, as the history keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelMove {
    pub version: String,
    /// When the label moved, milliseconds since the Unix epoch.
    pub at: i64,
}

fn name(label: Label) -> &'static str {
    crate::choice::Choice::name(label)
}

impl ModelStore {
    /// The version `label` names, if it is set.
    pub async fn label(&self, label: Label) -> Result<Option<String>, StoreError> {
        let rel = format!("labels/{}", name(label));
        let Some(bytes) = self.read(&rel).await? else { return Ok(None) };
        let current: LabelMove = serde_json::from_slice(&bytes)
            .map_err(|source| StoreError::BadManifest { location: format!("{}/{rel}", self.location()), source })?;
        Ok(Some(current.version))
    }

    /// Points `label` at `version` (which the caller has validated): the
    /// history entry first, then the label itself.
    pub async fn set_label(&self, label: Label, version: &str) -> Result<LabelMove, StoreError> {
        let moved = LabelMove { version: version.to_string(), at: now_ms() };
        let bytes = serde_json::to_vec(&moved).expect("a label move serialises");
        let entry = format!("labels/history/{}/{:020}-{version}", name(label), moved.at);
        self.write(&entry, bytes.clone()).await?;
        self.write(&format!("labels/{}", name(label)), bytes).await?;
        Ok(moved)
    }

    /// Every move of `label`, oldest first.
    pub async fn label_history(&self, label: Label) -> Result<Vec<LabelMove>, StoreError> {
        let mut moves: Vec<LabelMove> = self
            .names(&format!("labels/history/{}", name(label)))
            .await?
            .iter()
            .filter_map(|entry| {
                let (at, version) = entry.split_once('-')?;
                Some(LabelMove { version: version.to_string(), at: at.parse().ok()? })
            })
            .collect();
        moves.sort_by(|a, b| (a.at, &a.version).cmp(&(b.at, &b.version)));
        Ok(moves)
    }
}

/// Where `stable` goes on a rollback: the version before its current one,
/// where a move back to a version seen before (an earlier rollback, a
/// re-promotion) forgets the moves after it, so rolling back twice goes two
/// steps back rather than back and forth. `None` if there is nothing before.
pub fn previous(history: &[LabelMove]) -> Option<&str> {
    let mut stack: Vec<&str> = Vec::new();
    for version in history.iter().map(|m| m.version.as_str()) {
        match stack.iter().position(|v| *v == version) {
            Some(i) => stack.truncate(i + 1),
            None => stack.push(version),
        }
    }
    stack.len().checked_sub(2).map(|i| stack[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moved(version: &str, at: i64) -> LabelMove {
        LabelMove { version: version.into(), at }
    }

    #[test]
    fn rollback_goes_to_the_last_other_version() {
        assert_eq!(previous(&[]), None);
        assert_eq!(previous(&[moved("1", 1)]), None);
        assert_eq!(previous(&[moved("1", 1), moved("2", 2)]), Some("1"));
        assert_eq!(previous(&[moved("1", 1), moved("2", 2), moved("2", 3)]), Some("1"));
        // After a rollback from 3 to 2, the next one goes on to 1, not back to 3.
        assert_eq!(previous(&[moved("1", 1), moved("2", 2), moved("3", 3), moved("2", 4)]), Some("1"));
        assert_eq!(previous(&[moved("1", 1), moved("2", 2), moved("1", 3)]), None);
    }

    #[tokio::test]
    async fn labels_and_their_history_live_in_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(&dir.path().display().to_string()).await.unwrap();
        assert_eq!(store.label(Label::Stable).await.unwrap(), None);
        store.set_label(Label::Stable, "100").await.unwrap();
        store.set_label(Label::Canary, "200").await.unwrap();
        store.set_label(Label::Stable, "200").await.unwrap();
        assert_eq!(store.label(Label::Stable).await.unwrap().as_deref(), Some("200"));
        assert_eq!(store.label(Label::Canary).await.unwrap().as_deref(), Some("200"));
        let history: Vec<String> =
            store.label_history(Label::Stable).await.unwrap().into_iter().map(|m| m.version).collect();
        assert_eq!(history, ["100", "200"]);
    }
}
