//! Contrastive training of dense retrievers, as Tevatron trains them.
//!
//! Today this crate holds the loss ([`loss::contrastive`]), checked against PyTorch and by
//! finite differences; the trainer (data sampling, AdamW, schedules, checkpoints) is the subject
//! of the training issue and builds on it.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let q = Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu).unwrap();
//! let p = Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu).unwrap();
//! let loss = tevatron_train::loss::contrastive(&q, &p, 1.0).unwrap();
//! assert!(loss.to_scalar::<f32>().unwrap() < 0.32);
//! ```
#![warn(missing_docs)]

pub mod loss;
