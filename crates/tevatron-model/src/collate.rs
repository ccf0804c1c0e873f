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
    /// `(b, l)` u32: the segment of each token (0 for single texts; 0 then 1 for a text pair),
    /// 0 on padding.
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
    collate_typed(seqs, None, pad_id, pad_to_multiple_of, side, device)
}

/// Pads `seqs` and, when given, each one's token types (text pairs) into a batch.
pub fn collate_typed(
    seqs: &[&[u32]],
    types: Option<&[&[u32]]>,
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
    let mut segments = Vec::with_capacity(if types.is_some() { b * len } else { 0 });
    for (i, s) in seqs.iter().enumerate() {
        let pad = len - s.len();
        let t = types.map(|t| t[i]);
        if t.is_some_and(|t| t.len() != s.len()) {
            candle_core::bail!(
                "sequence {i}: {} token types for {} tokens",
                t.map_or(0, <[u32]>::len),
                s.len()
            );
        }
        let pads = |v: &mut Vec<u32>, x| v.extend(std::iter::repeat_n(x, pad));
        if side == PaddingSide::Left {
            pads(&mut ids, pad_id);
            pads(&mut mask, 0);
            if t.is_some() {
                pads(&mut segments, 0);
            }
        }
        ids.extend_from_slice(s);
        mask.extend(std::iter::repeat_n(1u32, s.len()));
        if let Some(t) = t {
            segments.extend_from_slice(t);
        }
        if side == PaddingSide::Right {
            pads(&mut ids, pad_id);
            pads(&mut mask, 0);
            if t.is_some() {
                pads(&mut segments, 0);
            }
        }
    }
    let token_type_ids = match types {
        Some(_) => Tensor::from_vec(segments, (b, len), device)?,
        None => Tensor::zeros((b, len), candle_core::DType::U32, device)?,
    };
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, len), device)?,
        attention_mask: Tensor::from_vec(mask, (b, len), device)?,
        token_type_ids,
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
        // Token types of text pairs follow their tokens; padding gets 0.
        let (ta, tb) = ([0u32, 1, 1], [1u32]);
        let types: [&[u32]; 2] = [&ta, &tb];
        for (side, want) in [
            (PaddingSide::Right, [[0, 1, 1], [1, 0, 0]]),
            (PaddingSide::Left, [[0, 1, 1], [0, 0, 1]]),
        ] {
            let batch = collate_typed(&[&a, &b], Some(&types), 9, 1, side, &Device::Cpu).unwrap();
            assert_eq!(batch.token_type_ids.to_vec2::<u32>().unwrap(), want);
        }
        let short: [&[u32]; 2] = [&ta, &[]];
        let err = collate_typed(&[&a, &b], Some(&short), 9, 1, PaddingSide::Right, &Device::Cpu);
        assert!(err.unwrap_err().to_string().contains("0 token types for 1 tokens"));
    }
}
