//! `fraudstream models`: the flags and the printing; the rules are in
//! `fraudstream::lifecycle`.

use anyhow::Result;
use clap::{Args, Subcommand};
use fraudstream::choice::Choice;
use fraudstream::lifecycle;
use fraudstream::model::{Label, ModelStore};

use crate::cli::choice;

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Model store: s3://bucket/prefix or a directory (AWS settings from the environment).
    #[arg(long, env = "FRAUDSTREAM_MODEL_STORE", default_value = "models")]
    model_store: String,
    #[command(subcommand)]
    command: ModelsCommand,
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// Every version, oldest first: created, holdout AP and ROC-AUC, labels.
    List,
    /// One version's manifest (model.json).
    Show { version: String },
    /// Point a label at a version, once it loads and validates as a scorer would load it.
    Label {
        version: String,
        #[arg(value_parser = choice::<Label>())]
        label: Label,
    },
    /// Move `stable` back to where it was before its current version.
    Rollback,
}

pub async fn run(args: ModelsArgs) -> Result<()> {
    let store = ModelStore::open(&args.model_store).await?;
    let work = tempfile::tempdir()?;
    match args.command {
        ModelsCommand::List => {
            println!("{:<12} {:<24} {:>8} {:>8}  labels", "version", "created (UTC)", "AP", "ROC-AUC");
            for info in lifecycle::list(&store, work.path()).await? {
                let (ap, auc) = info.holdout();
                let labels: Vec<&str> = info.labels.iter().map(|l| l.name()).collect();
                let created = humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(info.created_at.max(0) as u64),
                );
                println!("{:<12} {:<24} {ap:>8.4} {auc:>8.4}  {}", info.version, created.to_string(), labels.join(","));
            }
        }
        ModelsCommand::Show { version } => {
            let files = store.fetch(&version, &[], work.path()).await?;
            println!("{}", serde_json::to_string_pretty(&files.manifest)?);
        }
        ModelsCommand::Label { version, label } => {
            lifecycle::set_label(&store, label, &version, work.path()).await?;
            println!("{} -> {version} in {}", label.name(), store.location());
        }
        ModelsCommand::Rollback => {
            let (from, to) = lifecycle::rollback(&store, work.path()).await?;
            println!("stable: {from} -> {to} in {}", store.location());
        }
    }
    Ok(())
}
