//! Turning hidden states `(b, l, h)` into one vector per text, as Tevatron's `_pooling` does,
//! then optional L2 normalisation. Knows nothing of backbone internals.

use candle_core::{DType, Result, Tensor, D};

/// Tevatron's pooling modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// `cls`/`first`: the first position.
    Cls,
    /// `mean`/`avg`/`average`: masked mean over real tokens.
    Mean,
    /// `last`/`eos`: the last real token (with Tevatron's padding-side detection).
    Last,
}

/// sentence-transformers' pooling modes: the key of releases before 6 (`pooling_mode_mean_tokens:
/// true`), the name of 6 (`"pooling_mode": "mean"`), and the [`Pooling`] it is, if it is one of
/// ours. The one table both config forms are read and written by.
const ST_MODES: [(&str, &str, Option<Pooling>); 6] = [
    ("pooling_mode_cls_token", "cls", Some(Pooling::Cls)),
    ("pooling_mode_mean_tokens", "mean", Some(Pooling::Mean)),
    ("pooling_mode_lasttoken", "lasttoken", Some(Pooling::Last)),
    ("pooling_mode_max_tokens", "max", None),
    ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens", None),
    ("pooling_mode_weightedmean_tokens", "weightedmean", None),
];

impl Pooling {
    /// Every pooling, in the order sentence-transformers' config is read.
    pub const ALL: [Pooling; 3] = [Pooling::Cls, Pooling::Mean, Pooling::Last];

    /// Tevatron's names and aliases (`--pooling`), the canonical name first for each.
    pub const NAMES: [(&'static str, Pooling); 7] = [
        ("cls", Pooling::Cls),
        ("first", Pooling::Cls),
        ("mean", Pooling::Mean),
        ("avg", Pooling::Mean),
        ("average", Pooling::Mean),
        ("last", Pooling::Last),
        ("eos", Pooling::Last),
    ];

    /// Parses Tevatron's names and aliases.
    pub fn parse(name: &str) -> Option<Self> {
        Self::NAMES.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
    }

    /// Canonical name.
    pub fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(_, p)| *p == self).map_or("", |(n, _)| n)
    }

    /// The key of sentence-transformers' `1_Pooling/config.json` that selects this pooling.
    pub fn st_mode(self) -> &'static str {
        ST_MODES.iter().find(|(_, _, p)| *p == Some(self)).map_or("", |(key, _, _)| key)
    }

    /// The pooling a sentence-transformers Pooling config selects: `pooling_mode` (a name or a
    /// list of names, sentence-transformers 6) or the `pooling_mode_*` keys set `true` (earlier
    /// releases); mean when it selects none (as sentence-transformers 6 reads such a config;
    /// earlier releases default to mean when the keys are absent). An
    /// error, saying why, when it selects a mode we lack (`max`, `weightedmean`,
    /// `mean_sqrt_len_tokens`) or several (their concatenation): pooling otherwise would give
    /// vectors of another meaning.
    pub fn from_st_config(config: &serde_json::Value) -> std::result::Result<Self, String> {
        let modes: Vec<&str> = match &config["pooling_mode"] {
            serde_json::Value::String(m) => vec![m.as_str()],
            serde_json::Value::Array(ms) => ms.iter().map(|m| m.as_str().unwrap_or("?")).collect(),
            serde_json::Value::Null => ST_MODES
                .iter()
                .filter(|(key, _, _)| config[*key].as_bool().unwrap_or(false))
                .map(|(_, name, _)| *name)
                .collect(),
            other => return Err(format!("pooling_mode {other} is neither a name nor a list")),
        };
        match modes.as_slice() {
            [] => Ok(Pooling::Mean),
            [one] => ST_MODES.iter().find(|(_, name, _)| name == one).and_then(|(_, _, p)| *p).ok_or_else(
                || format!("pooling mode {one} is not one of ours (cls, mean, lasttoken)"),
            ),
            several => Err(format!(
                "pooling modes {} are concatenated; only one mode (cls, mean or lasttoken) is supported",
                several.join(", ")
            )),
        }
    }

    /// Every mode key of a sentence-transformers Pooling config, this pooling's `true`.
    pub fn st_modes(self) -> serde_json::Map<String, serde_json::Value> {
        ST_MODES
            .iter()
            .map(|(key, _, p)| (key.to_string(), serde_json::Value::Bool(*p == Some(self))))
            .collect()
    }

    /// Pools `hidden` `(b, l, h)` under `mask` `(b, l)` into `(b, h)`.
    pub fn pool(self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, _) = hidden.dims3()?;
        match self {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
            Pooling::Mean => {
                let m = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?; // (b, l, 1)
                                                                      // A row without tokens (an empty text without special tokens) pools to zeros,
                                                                      // as sentence-transformers' clamped count gives, not 0 / 0 (NaN). Counts of
                                                                      // real rows are whole numbers of at least 1, which the bound leaves as they are.
                let sum = hidden.broadcast_mul(&m)?.sum(1)?; // (b, h)
                let count = m.sum(1)?.maximum(1.0)?; // (b, 1)
                sum.broadcast_div(&count)
            }
            Pooling::Last => {
                // Left padding (or none): every row has a real token in the last column.
                let last_col = mask
                    .narrow(1, l - 1, 1)?
                    .to_dtype(DType::U32)?
                    .sum_all()?
                    .to_scalar::<u32>()?;
                if last_col as usize == b {
                    return hidden.narrow(1, l - 1, 1)?.squeeze(1);
                }
                let lengths = mask.to_dtype(DType::U32)?.sum(1)?.to_vec1::<u32>()?;
                // Python's h[b, -1] for an empty row wraps to the last column.
                let idx: Vec<u32> =
                    lengths.iter().map(|&n| if n == 0 { l as u32 - 1 } else { n - 1 }).collect();
                let idx = Tensor::from_vec(idx, (b, 1, 1), hidden.device())?
                    .broadcast_as((b, 1, hidden.dim(2)?))?
                    .contiguous()?;
                hidden.gather(&idx, 1)?.squeeze(1)
            }
        }
    }

    /// [`Pooling::pool`] for inference (no gradient): mean pooling of F32 hidden states on the
    /// CPU as a masked sum on raw buffers, one task per sequence, where candle's `sum(1)` (a
    /// strided reduction on one thread) took 2-3% of `encode --bf16`'s samples on a 2-core
    /// Xeon. The same products and additions in the same order (each masked value added in
    /// sequence order from zero, then divided by the count), so the same bits; every other case
    /// goes through [`Pooling::pool`].
    pub fn pool_inference(self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        use rayon::prelude::*;
        if self != Pooling::Mean {
            return self.pool(hidden, mask);
        }
        let Ok(x) = crate::backbone::Data::of(hidden) else { return self.pool(hidden, mask) };
        let (b, l, h) = hidden.dims3()?;
        if mask.dims2()? != (b, l) {
            candle_core::bail!("pooling: a mask of {:?} for {b} x {l} tokens", mask.dims());
        }
        let keep: Vec<f32> = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let x = x.slice();
        let mut out = vec![0f32; b * h];
        out.par_chunks_mut(h.max(1)).enumerate().for_each(|(seq, acc)| {
            let mut count = 0f32;
            for t in 0..l {
                let m = keep[seq * l + t];
                let row = &x[(seq * l + t) * h..][..h];
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += v * m);
                count += m;
            }
            // As the composed pooling: a row without tokens pools to zeros.
            acc.iter_mut().for_each(|a| *a /= count.max(1.0));
        });
        Tensor::from_vec(out, (b, h), hidden.device())
    }
}

/// `x / max(||x||_2, 1e-12)` per row, as `torch.nn.functional.normalize`.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

impl serde::Serialize for Pooling {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn names_and_sentence_transformers_modes_round_trip() {
        for p in Pooling::ALL {
            assert_eq!(Pooling::parse(p.name()), Some(p));
            let config = serde_json::Value::Object(p.st_modes());
            assert_eq!(Pooling::from_st_config(&config), Ok(p));
            assert_eq!(
                config.as_object().unwrap().values().filter(|v| v.as_bool() == Some(true)).count(),
                1
            );
        }
        assert_eq!(Pooling::parse("eos"), Some(Pooling::Last));
        assert_eq!(Pooling::parse("max"), None);
        let max = serde_json::json!({"pooling_mode_max_tokens": true});
        assert!(Pooling::from_st_config(&max).unwrap_err().contains("max is not one of ours"));
        let none = serde_json::json!({"pooling_mode_cls_token": false});
        assert_eq!(
            Pooling::from_st_config(&none),
            Ok(Pooling::Mean),
            "sentence-transformers' default"
        );
        assert_eq!(Pooling::from_st_config(&serde_json::json!({})), Ok(Pooling::Mean));
    }

    #[test]
    fn sentence_transformers_6_pooling_modes_are_read() {
        let mode =
            |m: serde_json::Value| Pooling::from_st_config(&serde_json::json!({"pooling_mode": m}));
        assert_eq!(mode("mean".into()), Ok(Pooling::Mean));
        assert_eq!(mode("cls".into()), Ok(Pooling::Cls));
        assert_eq!(mode("lasttoken".into()), Ok(Pooling::Last));
        assert_eq!(mode(serde_json::json!(["mean"])), Ok(Pooling::Mean));
        assert!(mode("weightedmean".into()).unwrap_err().contains("weightedmean"));
        assert!(mode(serde_json::json!(["cls", "mean"])).unwrap_err().contains("cls, mean"));
        assert!(mode(serde_json::json!(3)).unwrap_err().contains("neither"));
        let both =
            serde_json::json!({"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": true});
        assert!(Pooling::from_st_config(&both).unwrap_err().contains("cls, mean"));
    }

    #[test]
    fn pools_by_hand() {
        let dev = Device::Cpu;
        // b=2, l=3, h=1: row0 = [1,2,3] len 2 (right padded), row1 = [4,5,6] len 3
        let h = Tensor::new(&[[[1f32], [2.], [3.]], [[4.], [5.], [6.]]], &dev).unwrap();
        let m = Tensor::new(&[[1u32, 1, 0], [1, 1, 1]], &dev).unwrap();
        let v =
            |p: Pooling| p.pool(&h, &m).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(Pooling::Cls), [1.0, 4.0]);
        assert_eq!(v(Pooling::Mean), [1.5, 5.0]);
        assert_eq!(v(Pooling::Last), [2.0, 6.0]);
        // A row without tokens: zeros, as sentence-transformers' clamped count (0 / 0 was NaN).
        let empty = Tensor::new(&[[1u32, 1, 0], [0, 0, 0]], &dev).unwrap();
        let mean = Pooling::Mean.pool(&h, &empty).unwrap().flatten_all().unwrap();
        assert_eq!(mean.to_vec1::<f32>().unwrap(), [1.5, 0.0]);
        let fused = Pooling::Mean.pool_inference(&h, &empty).unwrap().flatten_all().unwrap();
        assert_eq!(fused.to_vec1::<f32>().unwrap(), [1.5, 0.0]);
        // left padding: last column is real everywhere -> take it
        let m = Tensor::new(&[[0u32, 1, 1], [1, 1, 1]], &dev).unwrap();
        assert_eq!(
            Pooling::Last.pool(&h, &m).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [3.0, 6.0]
        );
    }

    /// Inference's mean pooling gives the bits of the composed one: random hidden states,
    /// padded rows of both kinds, an all-padding row (zeros in both), NaN and infinite
    /// values; the other poolings pass through.
    #[test]
    fn inference_pooling_gives_the_bits_of_the_composed_one() {
        let dev = Device::Cpu;
        let (b, l, h) = (4, 7, 37);
        let mut x: Vec<f32> =
            (0..b * l * h).map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0).collect();
        x[5] = f32::NAN;
        x[l * h + 3] = f32::INFINITY;
        let hidden = Tensor::from_vec(x, (b, l, h), &dev).unwrap();
        let lengths = [7, 3, 0, 1];
        let mask: Vec<u32> = (0..b * l).map(|i| u32::from(i % l < lengths[i / l])).collect();
        let mask = Tensor::from_vec(mask, (b, l), &dev).unwrap();
        let bits = |t: Tensor| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        let masks =
            [mask.clone(), mask.to_dtype(DType::F32).unwrap(), mask.to_dtype(DType::I64).unwrap()];
        for (p, mask) in Pooling::ALL.into_iter().flat_map(|p| masks.iter().map(move |m| (p, m))) {
            let want = bits(p.pool(&hidden, mask).unwrap());
            assert_eq!(bits(p.pool_inference(&hidden, mask).unwrap()), want, "{}", p.name());
        }
        // Hidden states that are not contiguous take the composed path, with the same result.
        let strided =
            hidden.transpose(1, 2).unwrap().contiguous().unwrap().transpose(1, 2).unwrap();
        let want = bits(Pooling::Mean.pool(&hidden, &mask).unwrap());
        assert_eq!(bits(Pooling::Mean.pool_inference(&strided, &mask).unwrap()), want);
        // A mask of another shape is refused, as the composed pooling refuses it.
        let wrong = mask.flatten_all().unwrap();
        assert!(Pooling::Mean.pool_inference(&hidden, &wrong).is_err());
    }

    #[test]
    fn normalize_is_unit_length_and_safe_on_zero() {
        let x = Tensor::new(&[[3f32, 4.], [0., 0.]], &Device::Cpu).unwrap();
        assert_eq!(l2_normalize(&x).unwrap().to_vec2::<f32>().unwrap(), [[0.6, 0.8], [0., 0.]]);
    }
}
