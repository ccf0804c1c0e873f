//! `tevatron prepare`: turns a public dataset's download into Tevatron's JSONL files.

use anyhow::{Context, Result};
use tevatron_ir::insuranceqa;

use crate::args::{PrepareArgs, PrepareDataset};

pub fn run(a: &PrepareArgs) -> Result<()> {
    match a.dataset {
        PrepareDataset::Insuranceqa => {
            let c = insuranceqa::convert(&a.source, &a.output_dir)
                .with_context(|| format!("converting InsuranceQA from {}", a.source.display()))?;
            tracing::info!(
                "wrote {}: {} answers, {} training questions ({} left out: same text as a dev or \
                 test question), {} dev and {} test questions",
                a.output_dir.display(),
                c.corpus,
                c.train,
                c.train_held_out,
                c.dev,
                c.test
            );
        }
    }
    Ok(())
}
