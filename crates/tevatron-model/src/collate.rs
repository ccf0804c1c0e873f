//! Token id sequences → a padded [`Batch`] on a device, as Tevatron's collator pads: to the
//! longest sequence rounded up to `pad_to_multiple_of`, on the chosen side. Knows nothing of
//! models.

use candle_core::{Device, Result, Tensor};

/// Which side padding goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PaddingSide {
    /// Pad at the end (Tevatron's default).
    #[default]
    Right,
    /// Pad at the start (Qwen3-Embedding style).
    Left,
}

/// One model input batch.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `(b, l)` u32 token ids.
    pub input_ids: Tensor,
    /// `(b, l)` u32, 1 on real tokens.
    pub attention_mask: Tensor,
    /// `(b, l)` u32, all zeros (single-segment inputs).
    pub token_type_ids: Tensor,
}

/// Pads `seqs` into a batch.
pub fn collate(
    seqs: &[&[u32]],
    pad_id: u32,
    pad_to_multiple_of: usize,
    side: PaddingSide,
    device: &Device,
) -> Result<Batch> {
    let longest = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let m = pad_to_multiple_of.max(1);
    let len = longest.div_ceil(m) * m;
    let len = len.max(1);
    let b = seqs.len();
    let mut ids = Vec::with_capacity(b * len);
    let mut mask = Vec::with_capacity(b * len);
    for s in seqs {
        let pad = len - s.len();
        match side {
            PaddingSide::Right => {
                ids.extend_from_slice(s);
                ids.extend(std::iter::repeat_n(pad_id, pad));
                mask.extend(std::iter::repeat_n(1u32, s.len()));
                mask.extend(std::iter::repeat_n(0u32, pad));
            }
            PaddingSide::Left => {
                ids.extend(std::iter::repeat_n(pad_id, pad));
                ids.extend_from_slice(s);
                mask.extend(std::iter::repeat_n(0u32, pad));
                mask.extend(std::iter::repeat_n(1u32, s.len()));
            }
        }
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, len), device)?,
        attention_mask: Tensor::from_vec(mask, (b, len), device)?,
        token_type_ids: Tensor::zeros((b, len), candle_core::DType::U32, device)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_multiple_on_either_side() {
        let a = [5u32, 6, 7];
        let b = [8u32];
        let batch = collate(&[&a, &b], 0, 4, PaddingSide::Right, &Device::Cpu).unwrap();
        assert_eq!(batch.input_ids.to_vec2::<u32>().unwrap(), [[5, 6, 7, 0], [8, 0, 0, 0]]);
        assert_eq!(batch.attention_mask.to_vec2::<u32>().unwrap(), [[1, 1, 1, 0], [1, 0, 0, 0]]);
        let batch = collate(&[&a, &b], 9, 1, PaddingSide::Left, &Device::Cpu).unwrap();
        assert_eq!(batch.input_ids.to_vec2::<u32>().unwrap(), [[5, 6, 7], [9, 9, 8]]);
        assert_eq!(batch.attention_mask.to_vec2::<u32>().unwrap(), [[1, 1, 1], [0, 0, 1]]);
    }
}
