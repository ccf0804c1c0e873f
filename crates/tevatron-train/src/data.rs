//! Training groups as Tevatron's `TrainDataset` builds them: one query, its positive and
//! `G - 1` negatives, sampled per epoch by Tevatron's rule, from rows read by random access
//! (memory-mapped, see [`tevatron_ir::rows`]).
//!
//! Two row formats, detected per row by the `positive_passages` key:
//! - inline: `query`, `positive_passages`/`negative_passages` of `{docid, title, text, score}`;
//!   a retriever's passage text is `title + ' ' + text` when a `title` key exists, else `text`
//!   (not stripped);
//! - ids: `query_text`, `positive_document_ids`/`negative_document_ids`, resolved through a
//!   corpus; a retriever's passage text is the corpus row's `text` (no title, as Tevatron does).
//!
//! Each [`Passage`] keeps title, text and the teacher's `score` apart: a reranker formats the
//! title into its pair (the corpus title for ids), distillation reads the score.
//!
//! Sampling for dataset item `i` in epoch `e` with `h = i + seed`, `n = G - 1`:
//! positive `positives[(h + e) % len]`; negatives: when fewer than `n`, `n` draws with
//! replacement (from a stream seeded by `(seed, e, i)`); otherwise a fixed per-item shuffle
//! (seeded by `h`) read in the window starting at `(e * n) % len`, wrapping around. The
//! generator is SplitMix64, not Python's Mersenne Twister, so the permutations differ from
//! Python's while the rule and its determinism are the same.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tevatron_ir::rows::{DocIndex, RowStore};
use tevatron_model::rng::{mix, SplitMix64};

/// Errors of training data, each naming the file, line and field.
pub type Result<T> = std::result::Result<T, tevatron_ir::Error>;

fn invalid(path: &Path, line: usize, what: String) -> tevatron_ir::Error {
    tevatron_ir::Error::Line { path: path.to_path_buf(), line, what }
}

/// A corpus for id-based training rows.
pub struct Corpus {
    rows: RowStore,
    ids: DocIndex,
}

impl Corpus {
    /// Indexes the corpus files (`docid`, `text`, optional `title`).
    pub fn open(files: &[PathBuf], cache_root: &Path) -> Result<Self> {
        let rows = RowStore::open(files, cache_root)?;
        let ids = DocIndex::open(&rows, files, "docid", cache_root)?;
        Ok(Self { rows, ids })
    }

    /// Number of passages.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the corpus has no passages.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The `text` field of a passage, `None` when the id is not in the corpus.
    pub fn text(&self, docid: &str) -> Result<Option<String>> {
        Ok(self.passage(docid)?.map(|(_, text)| text))
    }

    /// The `title` (when the row has one) and `text` of a passage, `None` when the id is not
    /// in the corpus.
    pub fn passage(&self, docid: &str) -> Result<Option<(Option<String>, String)>> {
        let Some(r) = self.ids.get(&self.rows, docid)? else { return Ok(None) };
        let text =
            tevatron_ir::records::required_text(&r.value, "text", r.path, r.line)?.to_string();
        let title = match r.value.get("title") {
            Some(Value::String(t)) => Some(t.clone()),
            _ => None,
        };
        Ok(Some((title, text)))
    }
}

/// A passage reference inside a training row.
enum PassageRef {
    Inline(Passage),
    Id(String),
}

/// One parsed training row.
struct TrainRow {
    query_id: Option<String>,
    query: String,
    positives: Vec<PassageRef>,
    negatives: Vec<PassageRef>,
}

/// Every passage of one training row, resolved (what `tevatron annotate` scores).
#[derive(Clone, Debug, PartialEq)]
pub struct FullRow {
    /// `query_id`, when the row has one.
    pub query_id: Option<String>,
    /// Query text.
    pub query: String,
    /// All positives, in the row's order.
    pub positives: Vec<Passage>,
    /// All negatives, in the row's order.
    pub negatives: Vec<Passage>,
}

/// One passage of a training group, its parts kept apart: a retriever reads title and text
/// joined ([`Passage::joined`]), a reranker pairs them with the query (in its pair format),
/// and distillation reads the teacher's score.
#[derive(Clone, Debug, PartialEq)]
pub struct Passage {
    /// `docid`, when the row (or the id form) names one.
    pub docid: Option<String>,
    /// `title`, when the row (or, for an id, the corpus row) has the key (`null` reads as
    /// empty).
    pub title: Option<String>,
    /// Whether a retriever reads the title joined to the text: inline passages with a title
    /// key; an id's passage is the corpus `text` alone for a retriever, as in Tevatron (a
    /// reranker's pair still takes its title).
    pub title_joined: bool,
    /// `text` (the corpus's `text` for id-form rows).
    pub text: String,
    /// The teacher's `score` of this passage for its query, when the row has one.
    pub score: Option<f64>,
}

impl Passage {
    /// The passage as Tevatron's retriever datasets give it: `title + " " + text` when an
    /// inline passage has a title key, else the text.
    pub fn joined(&self) -> String {
        match &self.title {
            Some(t) if self.title_joined => format!("{t} {}", self.text),
            _ => self.text.clone(),
        }
    }
}

/// One sampled training group: the query text and `G` passages, positive first.
#[derive(Clone, Debug, PartialEq)]
pub struct TextGroup {
    /// Query text (without prefix; the tokenizer adds it).
    pub query: String,
    /// Positive, then negatives.
    pub passages: Vec<Passage>,
}

impl TextGroup {
    /// The passages as a retriever reads them ([`Passage::joined`]).
    pub fn joined(&self) -> Vec<String> {
        self.passages.iter().map(Passage::joined).collect()
    }
}

/// The training rows, random access, with an optional corpus.
pub struct TrainData {
    rows: RowStore,
    /// Shared, so that validation's rows resolve through the same opened corpus.
    corpus: Option<Arc<Corpus>>,
    group_size: usize,
    seed: u64,
}

/// The items of an optional list field (absent: none).
fn list_field<'v>(
    v: &'v Value,
    field: &str,
    of: &str,
    path: &Path,
    line: usize,
) -> Result<&'v [Value]> {
    match v.get(field) {
        None => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(invalid(path, line, format!("field `{field}` must be a list of {of}"))),
    }
}

fn inline_passages(v: &Value, field: &str, path: &Path, line: usize) -> Result<Vec<PassageRef>> {
    list_field(v, field, "passages", path, line)?
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let Some(Value::String(text)) = p.get("text") else {
                return Err(invalid(path, line, format!("`{field}[{k}]` has no string `text`")));
            };
            let title = match p.get("title") {
                Some(Value::String(t)) => Some(t.clone()),
                Some(Value::Null) => Some(String::new()),
                None => None,
                Some(_) => {
                    return Err(invalid(
                        path,
                        line,
                        format!("`{field}[{k}].title` must be a string"),
                    ))
                }
            };
            let score = match p.get("score") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => n.as_f64(),
                Some(_) => {
                    return Err(invalid(
                        path,
                        line,
                        format!("`{field}[{k}].score` must be a number"),
                    ))
                }
            };
            let docid = match p.get("docid") {
                Some(Value::String(d)) => Some(d.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            };
            let title_joined = title.is_some();
            Ok(PassageRef::Inline(Passage {
                docid,
                title,
                title_joined,
                text: text.to_string(),
                score,
            }))
        })
        .collect()
}

fn id_list(v: &Value, field: &str, path: &Path, line: usize) -> Result<Vec<PassageRef>> {
    list_field(v, field, "ids", path, line)?
        .iter()
        .map(|id| match id {
            Value::String(s) => Ok(PassageRef::Id(s.clone())),
            Value::Number(n) => Ok(PassageRef::Id(n.to_string())),
            _ => Err(invalid(path, line, format!("field `{field}` holds a non-id value {id}"))),
        })
        .collect()
}

fn text_of(v: &Value, fields: &[&str]) -> Option<String> {
    fields.iter().find_map(|f| match v.get(*f) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Null) => Some(String::new()),
        _ => None,
    })
}

impl TrainData {
    /// Indexes the training files (and the corpus, for id-based rows) and checks every row:
    /// a query text, at least one positive, ids that exist in the corpus, and negatives when
    /// `group_size > 1`. The first problem is reported with its file, line and field.
    pub fn open(
        train_files: &[PathBuf],
        corpus: Option<Arc<Corpus>>,
        cache_root: &Path,
        group_size: usize,
        seed: u64,
    ) -> Result<Self> {
        if group_size == 0 {
            return Err(tevatron_ir::Error::Invalid(
                "--train_group_size must be at least 1".into(),
            ));
        }
        let rows = RowStore::open(train_files, cache_root)?;
        if rows.is_empty() {
            return Err(tevatron_ir::Error::Invalid(format!(
                "no training rows in {}",
                train_files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
        let data = Self { rows, corpus, group_size, seed };
        data.check()?;
        Ok(data)
    }

    fn parse(&self, item: usize) -> Result<TrainRow> {
        let r = self.rows.get(item)?;
        let (v, path, line) = (&r.value, r.path, r.line);
        let inline = v.get("positive_passages").is_some();
        let query_id =
            || text_of(v, &["query_id"]).or_else(|| v.get("query_id").map(|x| x.to_string()));
        // The query's text, under the first of `fields` the row has; each form names its own
        // field when none is there (a row without it trained on an empty query).
        let query = |fields: &[&str]| {
            text_of(v, fields).ok_or_else(|| {
                // A field there but not text is named as such, not as missing.
                match fields.iter().find(|f| v.get(**f).is_some()) {
                    Some(field) => tevatron_ir::Error::FieldType {
                        path: path.into(),
                        line,
                        field: (*field).into(),
                        expected: "a string",
                    },
                    None => tevatron_ir::Error::MissingField {
                        path: path.into(),
                        line,
                        field: fields[0].into(),
                    },
                }
            })
        };
        let row = if inline {
            TrainRow {
                query_id: query_id(),
                query: query(&["query", "query_text"])?,
                positives: inline_passages(v, "positive_passages", path, line)?,
                negatives: inline_passages(v, "negative_passages", path, line)?,
            }
        } else if v.get("positive_document_ids").is_some() {
            if self.corpus.is_none() {
                return Err(invalid(
                    path,
                    line,
                    "row lists `positive_document_ids`; give the corpus with --corpus_name/--corpus_path".into(),
                ));
            }
            TrainRow {
                query_id: query_id(),
                query: query(&["query_text", "query"])?,
                positives: id_list(v, "positive_document_ids", path, line)?,
                negatives: id_list(v, "negative_document_ids", path, line)?,
            }
        } else {
            return Err(tevatron_ir::Error::MissingField {
                path: path.into(),
                line,
                field: "positive_passages (or positive_document_ids)".into(),
            });
        };
        if row.positives.is_empty() {
            let field = if inline { "positive_passages" } else { "positive_document_ids" };
            return Err(invalid(
                path,
                line,
                format!("`{field}` is empty: every row needs a positive"),
            ));
        }
        Ok(row)
    }

    fn check(&self) -> Result<()> {
        let mut any_negatives = false;
        let mut first_without = None;
        for item in 0..self.rows.len() {
            let row = self.parse(item)?;
            if let Some(corpus) = &self.corpus {
                for p in row.positives.iter().chain(&row.negatives) {
                    if let PassageRef::Id(id) = p {
                        if corpus.ids.find(&corpus.rows, id)?.is_none() {
                            let (path, line) = self.rows.location(item);
                            return Err(invalid(
                                path,
                                line,
                                format!("document id {id:?} is not in the corpus"),
                            ));
                        }
                    }
                }
            }
            if row.negatives.is_empty() {
                first_without.get_or_insert(item);
            } else {
                any_negatives = true;
            }
        }
        if self.group_size > 1 {
            if !any_negatives {
                let mut files: Vec<String> = Vec::new();
                for item in 0..self.rows.len() {
                    let path = self.rows.location(item).0.display().to_string();
                    if files.last() != Some(&path) {
                        files.push(path);
                    }
                }
                return Err(tevatron_ir::Error::Invalid(format!(
                    "--train_group_size {} needs hard negatives, and no row of {} has any; use --train_group_size 1 for in-batch negatives only",
                    self.group_size,
                    files.join(", ")
                )));
            }
            if let Some(item) = first_without {
                let (path, line) = self.rows.location(item);
                return Err(invalid(
                    path,
                    line,
                    format!(
                        "no negatives, and --train_group_size {} needs {} per query (Tevatron fails on such rows too)",
                        self.group_size,
                        self.group_size - 1
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Number of training rows (queries).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are no rows (never, once opened).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Passages per query (`--train_group_size`).
    pub fn group_size(&self) -> usize {
        self.group_size
    }

    /// The corpus id-based rows resolve through, if any.
    pub fn corpus(&self) -> Option<&Arc<Corpus>> {
        self.corpus.as_ref()
    }

    fn resolve(&self, p: &PassageRef) -> Result<Passage> {
        match p {
            PassageRef::Inline(passage) => Ok(passage.clone()),
            PassageRef::Id(id) => {
                let corpus = self.corpus.as_ref().expect("checked when the row was parsed");
                let (title, text) = corpus.passage(id)?.ok_or_else(|| {
                    tevatron_ir::Error::Invalid(format!("document id {id:?} is not in the corpus"))
                })?;
                Ok(Passage {
                    docid: Some(id.clone()),
                    title,
                    title_joined: false,
                    text,
                    score: None,
                })
            }
        }
    }

    /// Checks that every passage of every row carries the teacher's score, a finite number
    /// (distillation); the first one that does not is reported with its file, line and field.
    pub fn check_scores(&self) -> Result<()> {
        for item in 0..self.rows.len() {
            let row = self.parse(item)?;
            let (path, line) = self.rows.location(item);
            let lists =
                [("positive_passages", &row.positives), ("negative_passages", &row.negatives)];
            for (field, list) in lists {
                for (k, p) in list.iter().enumerate() {
                    let PassageRef::Inline(passage) = p else {
                        return Err(invalid(
                            path,
                            line,
                            "distillation reads each passage's `score`, which id-form rows do not carry; annotate the file with `tevatron annotate`, which writes inline passages".into(),
                        ));
                    };
                    match passage.score {
                        Some(s) if s.is_finite() => {}
                        Some(s) => {
                            return Err(invalid(path, line, format!("`{field}[{k}].score` is {s}")))
                        }
                        None => {
                            return Err(invalid(
                                path,
                                line,
                                format!("`{field}[{k}]` has no `score` (the teacher's; `tevatron annotate` writes them)"),
                            ))
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether the first row's passages carry teacher scores (`score`, as `tevatron annotate`
    /// writes them): what a file for distillation looks like.
    pub fn first_row_scored(&self) -> Result<bool> {
        if self.rows.is_empty() {
            return Ok(false);
        }
        let row = self.parse(0)?;
        let scored = |p: &PassageRef| matches!(p, PassageRef::Inline(p) if p.score.is_some());
        Ok(row.positives.iter().chain(&row.negatives).any(scored))
    }

    /// The file and line of row `item` (for messages about it).
    pub fn location(&self, item: usize) -> (&Path, usize) {
        self.rows.location(item)
    }

    /// Row `item` with every passage resolved.
    pub fn full_row(&self, item: usize) -> Result<FullRow> {
        let row = self.parse(item)?;
        let resolve =
            |list: &[PassageRef]| list.iter().map(|p| self.resolve(p)).collect::<Result<Vec<_>>>();
        Ok(FullRow {
            positives: resolve(&row.positives)?,
            negatives: resolve(&row.negatives)?,
            query_id: row.query_id,
            query: row.query,
        })
    }

    /// The group of row `item` in epoch `epoch` (0-based), by Tevatron's sampling rule.
    pub fn group(&self, item: usize, epoch: usize) -> Result<TextGroup> {
        let row = self.parse(item)?;
        let (picked_pos, picked_negs) = sample(
            row.positives.len(),
            row.negatives.len(),
            item,
            epoch,
            self.group_size - 1,
            self.seed,
        );
        let mut passages = Vec::with_capacity(self.group_size);
        passages.push(self.resolve(&row.positives[picked_pos])?);
        for k in picked_negs {
            passages.push(self.resolve(&row.negatives[k])?);
        }
        Ok(TextGroup { query: row.query, passages })
    }
}

/// Tevatron's per-epoch choice: the positive's index and the negatives' indices.
pub fn sample(
    n_pos: usize,
    n_neg: usize,
    item: usize,
    epoch: usize,
    n: usize,
    seed: u64,
) -> (usize, Vec<usize>) {
    // Wrapping, as release builds always computed it: any --seed is valid.
    let h = (item as u64).wrapping_add(seed);
    let pos = (h.wrapping_add(epoch as u64) % n_pos as u64) as usize;
    if n == 0 || n_neg == 0 {
        return (pos, Vec::new());
    }
    if n_neg < n {
        let mut r = SplitMix64::new(mix(seed, &[epoch as u64, item as u64, 1]));
        return (pos, (0..n).map(|_| r.below(n_neg)).collect());
    }
    let mut order: Vec<usize> = (0..n_neg).collect();
    SplitMix64::new(mix(h, &[])).shuffle(&mut order);
    let offset = (epoch * n) % n_neg;
    (pos, (0..n).map(|k| order[(offset + k) % n_neg]).collect())
}

/// The order in which epoch `epoch` visits the rows: a permutation seeded by `(seed, epoch)`.
pub fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    SplitMix64::new(mix(seed, &[epoch as u64, 0x0e90c4])).shuffle(&mut order);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positives_rotate_and_negative_windows_walk_the_fixed_shuffle() {
        // 3 positives: epochs 0, 1, 2 pick (h+e) % 3.
        let picks: Vec<usize> = (0..3).map(|e| sample(3, 10, 5, e, 4, 42).0).collect();
        assert_eq!(picks, [(47 % 3), (48 % 3), (49 % 3)]);
        // 10 negatives, 4 per epoch: epochs 0 and 1 take disjoint windows of one permutation;
        // epoch 2 wraps (offset 8: two from the end, two from the start).
        let w: Vec<Vec<usize>> = (0..3).map(|e| sample(3, 10, 5, e, 4, 42).1).collect();
        let mut first_two: Vec<usize> = w[0].iter().chain(&w[1]).copied().collect();
        first_two.sort();
        first_two.dedup();
        assert_eq!(first_two.len(), 8);
        assert_eq!(sample(3, 10, 5, 0, 4, 42), sample(3, 10, 5, 0, 4, 42));
        let mut all: Vec<usize> = (0..5).flat_map(|e| sample(3, 10, 5, e, 4, 42).1).collect();
        all.sort();
        // Five windows of four over ten negatives visit each exactly twice.
        assert_eq!(all, (0..10).flat_map(|k| [k, k]).collect::<Vec<_>>());
    }

    /// The largest seed is a seed like any other (its sum with the row index wraps, as release
    /// builds always computed it; debug builds overflowed).
    #[test]
    fn the_largest_seed_wraps_around() {
        // h = 5 + (2^64 - 1) wraps to 4: epoch 0 picks positive 4 % 3 = 1.
        assert_eq!(sample(3, 10, 5, 0, 4, u64::MAX).0, 1);
        assert_eq!(sample(3, 10, 5, 0, 4, u64::MAX).1, sample(3, 10, 4, 0, 4, 0).1);
    }

    #[test]
    fn too_few_negatives_are_drawn_with_replacement() {
        let (_, negs) = sample(1, 2, 0, 0, 7, 1);
        assert_eq!(negs.len(), 7);
        assert!(negs.iter().all(|&k| k < 2));
        assert_eq!(sample(1, 2, 0, 0, 7, 1), sample(1, 2, 0, 0, 7, 1));
        assert_eq!(sample(1, 5, 0, 0, 0, 1).1, Vec::<usize>::new());
    }

    #[test]
    fn epochs_shuffle_queries_differently_and_reproducibly() {
        let a = epoch_order(50, 42, 0);
        assert_eq!(a, epoch_order(50, 42, 0));
        assert_ne!(a, epoch_order(50, 42, 1));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn both_formats_build_tevatron_texts() {
        let dir = tempfile::tempdir().unwrap();
        let train = write(
            dir.path(),
            "train.jsonl",
            concat!(
                r#"{"query":"q a","positive_passages":[{"docid":"1","title":"T","text":"body"}],"negative_passages":[{"docid":"2","text":"neg"}]}"#,
                "\n",
                r#"{"query_id":"7","query_text":"q b","positive_document_ids":["d1"],"negative_document_ids":[5]}"#,
                "\n"
            ),
        );
        let corpus = write(
            dir.path(),
            "corpus.jsonl",
            "{\"docid\":\"d1\",\"title\":\"ignored\",\"text\":\"corpus one\"}\n{\"docid\":\"5\",\"text\":\"five\"}\n",
        );
        let cache = dir.path().join("cache");
        let corpus = Corpus::open(&[corpus], &cache).unwrap();
        let data = TrainData::open(&[train], Some(Arc::new(corpus)), &cache, 2, 42).unwrap();
        let g = data.group(0, 0).unwrap();
        assert_eq!(
            g,
            TextGroup {
                query: "q a".into(),
                passages: vec![
                    Passage {
                        docid: Some("1".into()),
                        title: Some("T".into()),
                        title_joined: true,
                        text: "body".into(),
                        score: None
                    },
                    Passage {
                        docid: Some("2".into()),
                        title: None,
                        title_joined: false,
                        text: "neg".into(),
                        score: None
                    },
                ]
            }
        );
        let g = data.group(1, 3).unwrap();
        // A retriever reads an id's passage as the corpus text alone (the title is the
        // reranker's).
        assert_eq!(g.joined(), ["corpus one", "five"]);
        assert_eq!(
            g,
            TextGroup {
                query: "q b".into(),
                passages: vec![
                    Passage {
                        docid: Some("d1".into()),
                        title: Some("ignored".into()),
                        title_joined: false,
                        text: "corpus one".into(),
                        score: None
                    },
                    Passage {
                        docid: Some("5".into()),
                        title: None,
                        title_joined: false,
                        text: "five".into(),
                        score: None
                    },
                ]
            }
        );
    }

    #[test]
    fn bad_rows_are_named_by_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let case = |name: &str, text: &str, g: usize, corpus: Option<&str>| -> String {
            let train = write(dir.path(), name, text);
            let corpus = corpus.map(|c| {
                let file = write(dir.path(), &format!("{name}.corpus.jsonl"), c);
                Arc::new(Corpus::open(&[file], &cache).unwrap())
            });
            TrainData::open(&[train], corpus, &cache, g, 1).err().unwrap().to_string()
        };
        let ok = r#"{"query":"q","positive_passages":[{"text":"p"}],"negative_passages":[{"text":"n"}]}"#;
        let e = case(
            "nopos.jsonl",
            &format!("{ok}\n{{\"query\":\"q\",\"positive_passages\":[]}}\n"),
            1,
            None,
        );
        assert!(e.contains("nopos.jsonl:2") && e.contains("positive_passages"), "{e}");
        let e = case(
            "number.jsonl",
            &format!("{ok}\n{{\"query\":5,\"positive_passages\":[{{\"text\":\"p\"}}]}}\n"),
            1,
            None,
        );
        assert!(e.contains("number.jsonl:2: field `query` must be a string"), "{e}");
        let e = case("malformed.jsonl", &format!("{ok}\n{{\"query\": \n"), 1, None);
        assert!(e.contains("malformed.jsonl:2") && e.contains("JSON"), "{e}");
        let e = case(
            "ids.jsonl",
            "{\"query_text\":\"q\",\"positive_document_ids\":[\"x\"]}\n",
            1,
            Some("{\"docid\":\"y\",\"text\":\"t\"}\n"),
        );
        assert!(e.contains("ids.jsonl:1") && e.contains("\"x\" is not in the corpus"), "{e}");
        let e = case(
            "noneg.jsonl",
            "{\"query\":\"q\",\"positive_passages\":[{\"text\":\"p\"}]}\n",
            4,
            None,
        );
        assert!(e.contains("needs hard negatives, and no row of "), "{e}");
        assert!(e.contains("noneg.jsonl has any"), "{e}");
        let e = case(
            "nocorpus.jsonl",
            "{\"query_text\":\"q\",\"positive_document_ids\":[\"x\"]}\n",
            1,
            None,
        );
        assert!(e.contains("nocorpus.jsonl:1") && e.contains("--corpus_path"), "{e}");
        let e = case(
            "notext.jsonl",
            "{\"query_id\":\"q1\",\"positive_document_ids\":[\"y\"]}\n",
            1,
            Some("{\"docid\":\"y\",\"text\":\"t\"}\n"),
        );
        assert!(e.contains("notext.jsonl:1") && e.contains("query_text"), "{e}");
        let e = case(
            "nulltext.jsonl",
            &format!("{ok}\n{{\"query\":\"q\",\"positive_passages\":[{{\"text\":null}}]}}\n"),
            1,
            None,
        );
        assert!(
            e.contains("nulltext.jsonl:2")
                && e.contains("`positive_passages[0]` has no string `text`"),
            "{e}"
        );
    }
}
