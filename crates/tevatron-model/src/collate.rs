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
    let len = padded_len(longest, pad_to_multiple_of);
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

/// The length a batch whose longest sequence is `longest` is padded to: rounded up to
/// `pad_to_multiple_of`, and at least 1.
fn padded_len(longest: usize, pad_to_multiple_of: usize) -> usize {
    let m = pad_to_multiple_of.max(1);
    (longest.div_ceil(m) * m).max(1)
}

/// Splits sequences of lengths `lens` into batches of similar length, so that each batch pads
/// only to its own longest sequence (rounded up to `pad_to_multiple_of`, as [`collate`] pads):
/// a model computes every padded position, so fewer padding tokens is less work for the same
/// representations. The split minimises the padded tokens plus `batch_cost` tokens for each
/// batch (what one more forward costs beyond its tokens). Returns each batch's indices into
/// `lens`, shortest batch first, each in ascending order of length (ties in index order);
/// every index appears once (no batch for `lens` empty).
pub fn length_buckets(
    lens: &[usize],
    pad_to_multiple_of: usize,
    batch_cost: usize,
) -> Vec<Vec<usize>> {
    let padded = |len: usize| padded_len(len, pad_to_multiple_of);
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| (lens[i], i));
    // Only a change of padded length can be worth a cut: `ends[g]` ends the g-th run of equal
    // padded lengths in `order`.
    let ends: Vec<usize> = (1..=order.len())
        .filter(|&k| k == order.len() || padded(lens[order[k]]) != padded(lens[order[k - 1]]))
        .collect();
    // best[g]: the least cost of batching the runs before `ends[g - 1]`, and the run its last
    // batch starts at.
    let mut best = vec![(0usize, 0usize); ends.len() + 1];
    for g in 1..=ends.len() {
        let end = ends[g - 1];
        let width = padded(lens[order[end - 1]]);
        best[g] = (0..g)
            .map(|f| {
                let start = if f == 0 { 0 } else { ends[f - 1] };
                (best[f].0 + (end - start) * width + batch_cost, f)
            })
            .min()
            .expect("at least one run");
    }
    let mut cuts = vec![ends.len()];
    while let Some(&g) = cuts.last().filter(|&&g| g > 0) {
        cuts.push(best[g].1);
    }
    cuts.reverse();
    let at = |g: usize| if g == 0 { 0 } else { ends[g - 1] };
    cuts.windows(2).map(|w| order[at(w[0])..at(w[1])].to_vec()).collect()
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

    /// Brute force over every way to cut the sorted sequences: the split found costs no more.
    #[test]
    fn length_buckets_cover_every_sequence_and_cost_the_least() {
        let cost = |lens: &[usize], b: &[Vec<usize>], m: usize, c: usize| -> usize {
            b.iter()
                .map(|ix| ix.len() * ix.iter().map(|&i| lens[i].div_ceil(m) * m).max().unwrap() + c)
                .sum()
        };
        let mut seed = 7u64;
        for case in 0..200 {
            let n = 1 + case % 9;
            let lens: Vec<usize> = (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    1 + (seed >> 33) as usize % 40
                })
                .collect();
            let (m, c) = ([1, 4, 16][case % 3], [0, 8, 64][case / 3 % 3]);
            let b = length_buckets(&lens, m, c);
            let mut seen: Vec<usize> = b.concat();
            seen.sort();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "{lens:?}");
            for w in b.windows(2) {
                assert!(lens[*w[0].last().unwrap()] <= lens[w[1][0]], "{lens:?}: {b:?}");
            }
            for ix in &b {
                assert!(ix.windows(2).all(|w| (lens[w[0]], w[0]) < (lens[w[1]], w[1])), "{b:?}");
            }
            let mut sorted: Vec<usize> = (0..n).collect();
            sorted.sort_by_key(|&i| (lens[i], i));
            let least = (0..1u32 << (n - 1))
                .map(|cuts| {
                    let mut parts = vec![vec![sorted[0]]];
                    for (k, &i) in sorted.iter().enumerate().skip(1) {
                        if cuts >> (k - 1) & 1 == 1 {
                            parts.push(Vec::new());
                        }
                        parts.last_mut().unwrap().push(i);
                    }
                    cost(&lens, &parts, m, c)
                })
                .min()
                .unwrap();
            assert_eq!(cost(&lens, &b, m, c), least, "{lens:?} m {m} c {c}: {b:?}");
        }
    }

    #[test]
    fn length_buckets_split_short_from_long_only_when_padding_outweighs_a_batch() {
        let lens = [10, 120, 12, 128, 11, 125];
        assert_eq!(length_buckets(&lens, 16, 32), [vec![0, 4, 2], vec![1, 5, 3]]);
        assert_eq!(length_buckets(&lens, 16, 1000), [vec![0, 4, 2, 1, 5, 3]]);
        assert!(length_buckets(&[], 16, 32).is_empty());
    }
}
