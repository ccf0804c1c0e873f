//! `tevatron convert`: Tevatron's `convert_result_to_trec` and `convert_result_to_marco`.

use anyhow::{Context, Result};
use tevatron_ir::trec::{read_ranking_columns, write_run, RunFormat};

use crate::args::{ConvertArgs, ConvertTo};

pub fn run(a: &ConvertArgs) -> Result<()> {
    let rows = read_ranking_columns(&a.input).context("reading --input")?;
    let format = match a.to {
        ConvertTo::Trec => RunFormat::Trec,
        ConvertTo::Marco => RunFormat::Marco,
    };
    write_run(
        &a.output,
        rows.iter().map(|(q, d, s)| (q.as_str(), d.as_str(), s.clone())),
        format,
        a.remove_query,
    )?;
    Ok(())
}
