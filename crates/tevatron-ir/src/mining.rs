//! Hard-negative selection: from one query's exact-search candidates, the documents that are
//! hard (ranked high by the model) but unlikely to be unjudged positives. Each filter guards
//! against one kind of false negative; `tevatron mine` reads the inputs, searches, and calls
//! [`select`] once per query. Knows nothing of files or models.

use std::collections::HashSet;

/// How kept candidates are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampling {
    /// The highest-ranked kept candidates (sentence-transformers' `"top"`).
    Top,
    /// A seeded random draw among the kept candidates (`"random"`), returned in rank order.
    Random,
}

/// The false-negative filters and the sampling, as `tevatron mine`'s flags set them.
#[derive(Clone, Debug)]
pub struct MineOptions {
    /// Skip the `range_min` best candidates the other filters leave: the closest matches are
    /// the likeliest unjudged positives (sentence-transformers' `range_min`, which counts the
    /// candidates left once positives, margins and `max_score` are removed).
    pub range_min: usize,
    /// Consider only the first `range_max` candidates the other filters leave (those skipped by
    /// `range_min` included), as sentence-transformers' `range_max`.
    pub range_max: Option<usize>,
    /// Drop candidates scoring above this: an absolute ceiling on similarity.
    pub max_score: Option<f32>,
    /// Keep a candidate only if `score <= positive_score - absolute_margin`.
    pub absolute_margin: Option<f32>,
    /// Keep a candidate only if `score <= positive_score - |positive_score| * relative_margin`
    /// (sentence-transformers' rule, which holds for a negative positive score too).
    pub relative_margin: Option<f32>,
    /// Drop candidates whose text equals a positive's after folding white space and case
    /// (InsuranceQA repeats answers under other ids).
    pub drop_same_text: bool,
    /// Negatives per query.
    pub num_negatives: usize,
    /// How the kept candidates are drawn.
    pub sampling: Sampling,
    /// Seed of the random draw (mixed with the query id, so each query's draw is reproducible
    /// whatever the order or number of queries).
    pub seed: u64,
}

/// One retrieved document: its id, its score and its 1-based rank in the exact search.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Document id.
    pub docid: String,
    /// Inner product with the query.
    pub score: f32,
    /// 1-based position in the ranking (judged documents included).
    pub rank: usize,
}

/// How many candidates each filter removed (each candidate is counted by the first filter
/// that removes it, in the order of the fields; the rank window applies to what the others
/// leave).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FilterCounts {
    /// Judged relevant for the query (always removed).
    pub judged: usize,
    /// Above `max_score`.
    pub max_score: usize,
    /// Within `absolute_margin` of the positive's score.
    pub absolute_margin: usize,
    /// Within `relative_margin` of the positive's score.
    pub relative_margin: usize,
    /// Same text as a positive.
    pub same_text: usize,
    /// Left by the filters above but outside `range_min`/`range_max` among them.
    pub rank_window: usize,
}

impl FilterCounts {
    /// Adds another query's counts.
    pub fn add(&mut self, o: &FilterCounts) {
        self.judged += o.judged;
        self.rank_window += o.rank_window;
        self.max_score += o.max_score;
        self.absolute_margin += o.absolute_margin;
        self.relative_margin += o.relative_margin;
        self.same_text += o.same_text;
    }
}

/// Folds a text for the duplicate check: white space runs become one space, ends trimmed,
/// lower case.
pub fn fold_text(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// The negatives of one query, in rank order, and what each filter removed.
///
/// `candidates` are in rank order. `judged` holds every document judged relevant for the query
/// (all positives, not only the sampled one). `positive_score` is the lowest score of the
/// query's positives (the strictest reference for the margins; `None` skips the margins).
/// `same_text` says whether a candidate's text equals a positive's (only asked when
/// `drop_same_text` is on).
pub fn select(
    query_id: &str,
    candidates: &[Candidate],
    judged: &HashSet<String>,
    positive_score: Option<f32>,
    mut same_text: impl FnMut(&str) -> bool,
    opts: &MineOptions,
) -> (Vec<Candidate>, FilterCounts) {
    let mut counts = FilterCounts::default();
    let mut kept = Vec::new();
    for c in candidates {
        let near = |margin: Option<f32>, floor: fn(f32, f32) -> f32| {
            positive_score.zip(margin).is_some_and(|(p, m)| c.score > floor(p, m))
        };
        let removed_by = if judged.contains(&c.docid) {
            Some(&mut counts.judged)
        } else if opts.max_score.is_some_and(|m| c.score > m) {
            Some(&mut counts.max_score)
        } else if near(opts.absolute_margin, |p, m| p - m) {
            Some(&mut counts.absolute_margin)
        } else if near(opts.relative_margin, |p, r| p - p.abs() * r) {
            Some(&mut counts.relative_margin)
        } else if opts.drop_same_text && same_text(&c.docid) {
            Some(&mut counts.same_text)
        } else {
            None
        };
        match removed_by {
            Some(n) => *n += 1,
            None => kept.push(c.clone()),
        }
    }
    // The rank window, over the candidates the filters left (in rank order).
    let end = opts.range_max.unwrap_or(usize::MAX).min(kept.len());
    let start = opts.range_min.min(end);
    counts.rank_window = kept.len() - (end - start);
    kept.truncate(end);
    kept.drain(..start);
    let chosen = match opts.sampling {
        Sampling::Top => kept.into_iter().take(opts.num_negatives).collect(),
        Sampling::Random => {
            let mut rng = SplitMix64::new(opts.seed, query_id);
            // Partial Fisher-Yates: the first `num_negatives` places get a uniform draw.
            let n = opts.num_negatives.min(kept.len());
            for i in 0..n {
                let j = i + (rng.next() % (kept.len() - i) as u64) as usize;
                kept.swap(i, j);
            }
            kept.truncate(n);
            kept.sort_by_key(|c| c.rank);
            kept
        }
    };
    (chosen, counts)
}

/// SplitMix64 seeded by `(seed, query id)` through FNV-1a: the same draw on every platform.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64, query_id: &str) -> Self {
        let fnv = query_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Self(seed ^ fnv.rotate_left(17))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Rank buckets of the positives' histogram: `(label, lowest rank, highest rank)`, the last
/// open-ended bucket counting positives outside the searched depth.
pub fn rank_buckets(depth: usize) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    let mut lo = 1;
    for hi in [1, 3, 10, 30, 100, 300, 1000, 3000, 10000] {
        if lo > depth {
            break;
        }
        let hi = hi.min(depth);
        let label = if lo == hi { format!("{lo}") } else { format!("{lo}-{hi}") };
        out.push((label, lo, hi));
        lo = hi + 1;
    }
    if lo <= depth {
        out.push((format!("{lo}-{depth}"), lo, depth));
    }
    out.push((format!(">{depth}"), depth.saturating_add(1), usize::MAX));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> MineOptions {
        MineOptions {
            range_min: 0,
            range_max: None,
            max_score: None,
            absolute_margin: None,
            relative_margin: None,
            drop_same_text: false,
            num_negatives: 10,
            sampling: Sampling::Top,
            seed: 42,
        }
    }

    /// Ten candidates d1..d10 with scores 1.0, 0.9, ..., 0.1 at ranks 1..10.
    fn cands() -> Vec<Candidate> {
        (1..=10)
            .map(|r| Candidate { docid: format!("d{r}"), score: 1.1 - r as f32 / 10.0, rank: r })
            .collect()
    }

    fn ids(v: &[Candidate]) -> Vec<&str> {
        v.iter().map(|c| c.docid.as_str()).collect()
    }

    fn judged(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_judged_document_is_excluded_not_only_one_positive() {
        let (got, counts) = select("q", &cands(), &judged(&["d1", "d4"]), None, |_| false, &opts());
        assert_eq!(ids(&got), ["d2", "d3", "d5", "d6", "d7", "d8", "d9", "d10"]);
        assert_eq!(counts, FilterCounts { judged: 2, ..Default::default() });
    }

    #[test]
    fn the_rank_window_keeps_ranks_after_range_min_up_to_range_max() {
        let o = MineOptions { range_min: 3, range_max: Some(6), ..opts() };
        let (got, counts) = select("q", &cands(), &judged(&[]), None, |_| false, &o);
        assert_eq!(ids(&got), ["d4", "d5", "d6"]);
        assert_eq!(counts.rank_window, 7);
        // As sentence-transformers: the window counts the candidates the other filters leave
        // (d1 and d2 judged, d3 above the ceiling), not raw ranks.
        let o = MineOptions { range_min: 1, range_max: Some(4), max_score: Some(0.75), ..opts() };
        let (got, counts) = select("q", &cands(), &judged(&["d1", "d2"]), None, |_| false, &o);
        assert_eq!(ids(&got), ["d5", "d6", "d7"]);
        assert_eq!((counts.judged, counts.max_score, counts.rank_window), (2, 1, 4));
    }

    /// sentence-transformers' relative margin, `p - |p| x r`: below a negative positive score
    /// too (`p x (1 - r)` would keep candidates above it).
    #[test]
    fn the_relative_margin_holds_below_a_negative_positive_score() {
        let c: Vec<Candidate> = [-0.46f32, -0.52, -0.56, -0.6]
            .iter()
            .enumerate()
            .map(|(i, &s)| Candidate { docid: format!("n{}", i + 1), score: s, rank: i + 1 })
            .collect();
        let o = MineOptions { relative_margin: Some(0.1), ..opts() };
        let (got, counts) = select("q", &c, &judged(&[]), Some(-0.5), |_| false, &o);
        assert_eq!(ids(&got), ["n3", "n4"]);
        assert_eq!(counts.relative_margin, 2);
    }

    #[test]
    fn score_ceiling_and_margins_remove_what_scores_close_to_the_positive() {
        let o = MineOptions { max_score: Some(0.85), ..opts() };
        let (got, c) = select("q", &cands(), &judged(&[]), Some(1.0), |_| false, &o);
        assert_eq!(ids(&got)[0], "d3");
        assert_eq!(c.max_score, 2);
        // Positive at 0.8: absolute margin 0.25 keeps scores <= 0.55 (d6 at 0.5 and below).
        let o = MineOptions { absolute_margin: Some(0.25), ..opts() };
        let (got, c) = select("q", &cands(), &judged(&[]), Some(0.8), |_| false, &o);
        assert_eq!(ids(&got), ["d6", "d7", "d8", "d9", "d10"]);
        assert_eq!(c.absolute_margin, 5);
        // Relative margin 0.45 of 0.8 keeps scores <= 0.44 (d7 and below).
        let o = MineOptions { relative_margin: Some(0.45), ..opts() };
        let (got, c) = select("q", &cands(), &judged(&[]), Some(0.8), |_| false, &o);
        assert_eq!(ids(&got), ["d7", "d8", "d9", "d10"]);
        assert_eq!(c.relative_margin, 6);
        // Both margins: each candidate counted once, by the first that removes it.
        let o = MineOptions { absolute_margin: Some(0.25), relative_margin: Some(0.45), ..opts() };
        let (got, c) = select("q", &cands(), &judged(&[]), Some(0.8), |_| false, &o);
        assert_eq!(ids(&got), ["d7", "d8", "d9", "d10"]);
        assert_eq!((c.absolute_margin, c.relative_margin), (5, 1));
        // Without a positive score the margins cannot apply.
        let (got, _) = select("q", &cands(), &judged(&[]), None, |_| false, &o);
        assert_eq!(got.len(), 10);
    }

    #[test]
    fn duplicates_of_a_positive_by_text_are_dropped_when_asked() {
        let dup = |d: &str| d == "d2" || d == "d5";
        let o = MineOptions { drop_same_text: true, num_negatives: 3, ..opts() };
        let (got, c) = select("q", &cands(), &judged(&["d1"]), None, dup, &o);
        assert_eq!(ids(&got), ["d3", "d4", "d6"]);
        assert_eq!((c.judged, c.same_text), (1, 2));
        let (got, _) = select("q", &cands(), &judged(&["d1"]), None, dup, &opts());
        assert!(ids(&got).contains(&"d2"), "off by default");
        assert_eq!(fold_text("  The\tAnswer \n is  HERE "), "the answer is here");
    }

    #[test]
    fn random_sampling_is_seeded_per_query_and_returned_in_rank_order() {
        let o = MineOptions { sampling: Sampling::Random, num_negatives: 4, ..opts() };
        let draw = |q: &str, o: &MineOptions| {
            ids(&select(q, &cands(), &judged(&[]), None, |_| false, o).0)
                .into_iter()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let a = draw("q1", &o);
        assert_eq!(a, draw("q1", &o), "same seed and query, same draw");
        assert_eq!(a.len(), 4);
        let ranks: Vec<usize> = a.iter().map(|d| d[1..].parse().unwrap()).collect();
        assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{ranks:?}");
        let others: Vec<Vec<String>> = (0..8).map(|i| draw(&format!("q{i}"), &o)).collect();
        assert!(others.iter().any(|d| *d != a), "the draw depends on the query");
        let reseeded = MineOptions { seed: 7, ..o.clone() };
        assert!((0..8).any(|i| draw(&format!("q{i}"), &reseeded) != others[i]), "and on the seed");
        // Top takes the first kept.
        let (top, _) = select(
            "q",
            &cands(),
            &judged(&[]),
            None,
            |_| false,
            &MineOptions { num_negatives: 2, ..opts() },
        );
        assert_eq!(ids(&top), ["d1", "d2"]);
    }

    #[test]
    fn rank_buckets_cover_every_rank_once() {
        let b = rank_buckets(200);
        let labels: Vec<&str> = b.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(labels, ["1", "2-3", "4-10", "11-30", "31-100", "101-200", ">200"]);
        for r in 1..=250 {
            assert_eq!(b.iter().filter(|(_, lo, hi)| (*lo..=*hi).contains(&r)).count(), 1, "{r}");
        }
        assert_eq!(rank_buckets(1).len(), 2);
    }
}
