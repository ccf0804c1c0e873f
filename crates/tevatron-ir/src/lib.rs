//! Candle-free retrieval core for Tevatron in Rust.
//!
//! This crate holds everything that does not need a neural network: reading Tevatron's JSONL
//! records ([`records`]), the on-disk embeddings format ([`vectors`]), exact inner-product search
//! ([`search`]), compact int8 and binary codes scanned and rescored ([`quantize`], [`compact`]; the AMX tile operations that scan shares with the model's kernels, [`amx`]), TREC run and qrels I/O ([`trec`]), fusion of runs ([`fusion`]) and trec_eval-equal metrics ([`metrics`]).
//! It builds in seconds, so search and evaluation can be tested and reused on their own.
//!
//! ```
//! use tevatron_ir::metrics::{evaluate, Measure};
//! use tevatron_ir::trec::{Qrels, Run};
//!
//! let qrels = Qrels::parse_str("q1 0 d1 1\nq1 0 d2 0\n", "qrels").unwrap();
//! let run = Run::parse_str("q1\td2\t2.0\nq1\td1\t1.0\n", "run").unwrap();
//! let measures = [Measure::parse("mrr@10").unwrap()];
//! let result = evaluate(&run, &qrels, &measures, false);
//! assert_eq!(result.means[0], 0.5);
//! ```
#![warn(missing_docs)]

pub mod amx;
pub mod atomic;
pub mod caught_panic;
pub mod compact;
pub mod error;
pub mod fusion;
pub mod fxhash;
pub mod hnsw;
pub mod insuranceqa;
pub mod metrics;
pub mod mining;
pub mod quantize;
pub mod records;
pub mod rerank;
pub mod rows;
pub mod safetensors_check;
pub mod search;
pub mod trec;
pub mod vectors;

pub use error::{Error, Result};
