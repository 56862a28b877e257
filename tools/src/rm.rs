//! `storagectl rm`: delete a dataset, asking first on a terminal.

use std::io::{IsTerminal, Write};

use anyhow::bail;
use storaged_client::Client;

use super::{human, spinner};

pub async fn run(client: &Client, dataset: &str, yes: bool) -> anyhow::Result<()> {
    if !yes && std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        let info = client
            .list_datasets()
            .await?
            .into_iter()
            .find(|d| d.name == dataset)
            .ok_or_else(|| anyhow::anyhow!("NOT_FOUND: dataset {dataset:?} not found"))?;
        eprint!(
            "delete dataset {dataset} ({} objects, {})? [y/N] ",
            info.object_count,
            human(info.total_bytes)
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            bail!("not deleted: {dataset} (confirm with y, or pass --yes)");
        }
    }
    let bar = spinner(&format!("deleting {dataset}"));
    let freed = client.delete_dataset(dataset).await;
    bar.finish_and_clear();
    outln!("deleted {dataset}; freed {}", human(freed?));
    Ok(())
}
