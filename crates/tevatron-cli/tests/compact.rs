//! `tevatron index` and `tevatron search --quantize`: compact codes written per shard, searched
//! with exact rescoring (equal to exact search when every row is rescored), and every bad input
//! refused with exit code 2.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::path::Path;

use tevatron_ir::vectors::{VecDType, VectorWriter};

mod common;
use common::{fails_with, names, ok, tevatron};

/// Small integer values: sums are exact in any order, so rescored and exact scores are equal
/// to the last bit and ties (ranked by doc id) are common.
fn write(dir: &Path, name: &str, rows: usize, dim: usize, seed: u64, prefix: &str) {
    let mut x = seed;
    let mut next = || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((x >> 33) % 7) as f32 - 3.0
    };
    let values: Vec<f32> = (0..rows * dim).map(|_| next()).collect();
    write_values(dir, name, &values, dim, prefix);
}

/// `values` (rows of `dim`) as F32 vectors with ids `{prefix}0`, `{prefix}1`, ...
fn write_values(dir: &Path, name: &str, values: &[f32], dim: usize, prefix: &str) {
    let ids: Vec<String> = (0..values.len() / dim).map(|i| format!("{prefix}{i}")).collect();
    let mut w = VectorWriter::create(&dir.join(name), dim, VecDType::F32, BTreeMap::new()).unwrap();
    w.push(values, &ids).unwrap();
    w.finish().unwrap();
}

fn search(d: &Path, out: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "search",
        "--query_reps",
        "q.safetensors",
        "--passage_reps",
        "c.*.safetensors",
        "--depth",
        "7",
        "--save_ranking_to",
        out,
        "--save_text",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    tevatron(d, &args)
}

fn setup() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write(d, "c.0.safetensors", 1500, 40, 1, "a");
    write(d, "c.1.safetensors", 900, 40, 2, "b");
    write(d, "q.safetensors", 5, 40, 3, "q");
    tmp
}

#[test]
fn compact_search_with_every_row_rescored_is_exact_search() {
    let tmp = setup();
    let d = tmp.path();
    ok(search(d, "exact.tsv", &[]));
    let exact = std::fs::read_to_string(d.join("exact.tsv")).unwrap();
    assert_eq!(exact.lines().count(), 35);
    // Every (query, document)'s exact score: the corpus' 2,400 rows searched to the end (a later
    // flag replaces the helper's depth).
    ok(search(d, "all.tsv", &["--depth", "2400"]));
    let all = std::fs::read_to_string(d.join("all.tsv")).unwrap();
    assert_eq!(all.lines().count(), 5 * 2400);
    let scores: BTreeMap<(String, String), String> = all
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            ((f[0].to_string(), f[1].to_string()), f[2].to_string())
        })
        .collect();
    let top7: std::collections::BTreeSet<(String, String)> = exact
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0].to_string(), f[1].to_string())
        })
        .collect();
    for q in ["int8", "binary"] {
        ok(tevatron(
            d,
            &[
                "index",
                "--passage_reps",
                "c.*.safetensors",
                "--quantize",
                q,
                "--output_dir",
                "idx",
                "--quiet",
            ],
        ));
        let glob = format!("idx/*.{q}.safetensors");
        // Every row a candidate: from the files, and built in memory.
        ok(search(
            d,
            "f.tsv",
            &["--quantize", q, "--compact_reps", &glob, "--rescore_multiplier", "400"],
        ));
        ok(search(d, "m.tsv", &["--quantize", q, "--rescore_multiplier", "400", "--shard_search"]));
        for f in ["f.tsv", "m.tsv"] {
            assert_eq!(std::fs::read_to_string(d.join(f)).unwrap(), exact, "{q} {f}");
        }
        // The default multiplier rescores 28 candidates per shard: a ranking of 7 per query,
        // with exact scores (each line's score is the exact search's score of that document).
        ok(search(d, "d.tsv", &["--quantize", q, "--compact_reps", &glob]));
        let got = std::fs::read_to_string(d.join("d.tsv")).unwrap();
        assert_eq!(got.lines().count(), 35);
        let mut found = 0;
        for l in got.lines() {
            let f: Vec<&str> = l.split('\t').collect();
            let key = (f[0].to_string(), f[1].to_string());
            assert_eq!(scores.get(&key).map(String::as_str), Some(f[2]), "{q}: {l}");
            found += usize::from(top7.contains(&key));
        }
        // int8 codes of these small integers are near exact: most of the top 7 is found. Sign
        // bits of random vectors are a weak guide, yet better than chance (28 of 2,400 rows
        // rescored per shard keep about 1% of a top 7 by chance).
        let floor = if q == "int8" { 28 } else { 5 };
        assert!(found >= floor, "{q} x4 finds {found} of the exact top 7 x 5 queries");
    }
    assert_eq!(
        names(&d.join("idx")),
        [
            "c.0.binary.safetensors",
            "c.0.int8.safetensors",
            "c.1.binary.safetensors",
            "c.1.int8.safetensors"
        ]
    );
}

#[test]
fn bad_compact_inputs_are_refused() {
    let tmp = setup();
    let d = tmp.path();
    ok(tevatron(
        d,
        &[
            "index",
            "--passage_reps",
            "c.*.safetensors",
            "--quantize",
            "int8",
            "--output_dir",
            "idx",
            "--quiet",
        ],
    ));
    // Codes of another shard: the fingerprint in the header.
    std::fs::create_dir(d.join("swap")).unwrap();
    std::fs::copy(d.join("idx/c.1.int8.safetensors"), d.join("swap/c.0.int8.safetensors")).unwrap();
    std::fs::copy(d.join("idx/c.0.int8.safetensors"), d.join("swap/c.1.int8.safetensors")).unwrap();
    fails_with(
        search(d, "x.tsv", &["--quantize", "int8", "--compact_reps", "swap/*.safetensors"]),
        "was made from other vectors than c.0.safetensors",
    );
    fails_with(
        search(d, "x.tsv", &["--quantize", "binary", "--compact_reps", "idx/*.int8.safetensors"]),
        "--compact_reps has no c.0.binary.safetensors for c.0.safetensors",
    );
    fails_with(
        search(d, "x.tsv", &["--quantize", "int8", "--compact_reps", "idx/c.0.int8.safetensors"]),
        "--compact_reps has no c.1.int8.safetensors for c.1.safetensors",
    );
    fails_with(
        search(d, "x.tsv", &["--compact_reps", "idx/*.int8.safetensors"]),
        "--compact_reps is read by --quantize",
    );
    // A file of the other precision under the expected name is found out by its header.
    std::fs::create_dir(d.join("renamed")).unwrap();
    for s in ["c.0", "c.1"] {
        std::fs::copy(
            d.join(format!("idx/{s}.int8.safetensors")),
            d.join(format!("renamed/{s}.binary.safetensors")),
        )
        .unwrap();
    }
    fails_with(
        search(d, "x.tsv", &["--quantize", "binary", "--compact_reps", "renamed/*"]),
        "holds int8 codes, not the binary of --quantize",
    );
    // Flags of a mode not asked for are refused, not ignored.
    fails_with(
        search(d, "x.tsv", &["--rescore_multiplier", "2"]),
        "--rescore_multiplier is read by",
    );
    fails_with(
        search(d, "x.tsv", &["--hnsw_ef_search", "9"]),
        "--hnsw_ef_search is read by --hnsw",
    );
    fails_with(
        tevatron(
            d,
            &[
                "index",
                "--passage_reps",
                "c.*.safetensors",
                "--quantize",
                "int8",
                "--hnsw_m",
                "8",
                "--output_dir",
                "y",
            ],
        ),
        "--hnsw_m, --hnsw_ef_construction and --hnsw_dtype are read by --hnsw",
    );
    fails_with(
        search(d, "x.tsv", &["--quantize", "int8", "--rescore_multiplier", "0.5"]),
        "--rescore_multiplier must be a number of at least 1",
    );
    fails_with(
        search(d, "x.tsv", &["--quantize", "int8", "--device", "cuda"]),
        "--quantize and --hnsw search on the CPU",
    );
    let bytes = std::fs::read(d.join("idx/c.1.int8.safetensors")).unwrap();
    std::fs::write(d.join("idx/c.1.int8.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    fails_with(
        search(d, "x.tsv", &["--quantize", "int8", "--compact_reps", "idx/*.int8.safetensors"]),
        "not a readable compact file",
    );
    let last = fails_with(
        search(d, "x.tsv", &["--quantize", "int8", "--compact_reps", "idx/*.int8.safetensors"]),
        "rebuild it with `tevatron index`",
    );
    assert!(last.contains("c.1.int8.safetensors"), "{last}");
    assert!(!d.join("x.tsv").exists(), "no output is left by a failed search");
    // A file the pairing leaves over is named.
    std::fs::copy(
        d.join("renamed/c.0.binary.safetensors"),
        d.join("renamed/c.9.binary.safetensors"),
    )
    .unwrap();
    fails_with(
        search(d, "x.tsv", &["--quantize", "binary", "--compact_reps", "renamed/*"]),
        "renamed/c.9.binary.safetensors belong to no shard given",
    );
    let index = |glob: &str, out: &str| {
        tevatron(d, &["index", "--passage_reps", glob, "--quantize", "binary", "--output_dir", out])
    };
    // Outputs the passages' own glob would pick up next time.
    fails_with(
        index("c.*.safetensors", "."),
        "c.0.binary.safetensors would match --passage_reps \"c.*.safetensors\"",
    );
    // The same folder named from the root, through a symbolic link, and from a folder whose
    // name holds glob characters (it read as a wildcard).
    fails_with(index("c.*.safetensors", d.to_str().unwrap()), "would match --passage_reps");
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(d, d.join("link")).unwrap();
        fails_with(index("c.*.safetensors", d.join("link").to_str().unwrap()), "would match");
    }
    let odd = d.join("g[1]");
    std::fs::create_dir(&odd).unwrap();
    std::fs::copy(d.join("c.0.safetensors"), odd.join("c.0.safetensors")).unwrap();
    let args = ["index", "--passage_reps", "c.*.safetensors", "--quantize", "binary"];
    fails_with(tevatron(&odd, &[&args[..], &["--output_dir", "."]].concat()), "would match");
    // Two shards of one name, both named; shards of two widths, both named.
    std::fs::create_dir_all(d.join("s/a")).unwrap();
    std::fs::create_dir_all(d.join("s/b")).unwrap();
    write(d, "s/a/c.0.safetensors", 20, 40, 4, "x");
    write(d, "s/b/c.0.safetensors", 20, 40, 5, "y");
    fails_with(
        index("s/*/c.0.safetensors", "o"),
        "--passage_reps s/a/c.0.safetensors and s/b/c.0.safetensors have the same name",
    );
    write(d, "s/b/c.1.safetensors", 20, 8, 5, "y");
    fails_with(
        index("s/b/c.*.safetensors", "o"),
        "s/b/c.1.safetensors holds vectors of 8 dimensions where s/b/c.0.safetensors holds 40",
    );
    // A later shard that fails takes the earlier shards' outputs with it.
    let mut bad = vec![1.0f32; 20 * 40];
    bad[3 * 40 + 7] = f32::NAN;
    write_values(d, "s/a/c.1.safetensors", &bad, 40, "z");
    let out = index("s/a/c.*.safetensors", "partial");
    fails_with(out, "row 3 holds a NaN");
    assert!(names(&d.join("partial")).is_empty(), "{:?}", names(&d.join("partial")));
    // The flags are checked before the files are read.
    fails_with(
        tevatron(d, &["index", "--passage_reps", "nothing.*", "--output_dir", "o"]),
        "give one of --quantize int8|binary and --hnsw",
    );
    // A query id given twice, and ids a text run cannot carry.
    let ids: Vec<String> = ["q1", "q2", "q1"].map(String::from).to_vec();
    let mut w =
        VectorWriter::create(&d.join("dup.safetensors"), 40, VecDType::F32, BTreeMap::new())
            .unwrap();
    w.push(&[1.0; 3 * 40], &ids).unwrap();
    w.finish().unwrap();
    let mut w =
        VectorWriter::create(&d.join("space.safetensors"), 40, VecDType::F32, BTreeMap::new())
            .unwrap();
    w.push(&[1.0; 40], &["q 1".to_string()]).unwrap();
    w.finish().unwrap();
    for (queries, needle) in [
        ("dup.safetensors", "dup.safetensors: query id \"q1\" is given to rows 0 and 2"),
        ("space.safetensors", "space.safetensors: query id \"q 1\" (row 0) is empty or holds"),
    ] {
        let args = ["search", "--query_reps", queries, "--passage_reps", "c.*.safetensors"];
        let out =
            tevatron(d, &[&args[..], &["--save_ranking_to", "x.tsv", "--save_text"]].concat());
        fails_with(out, needle);
        assert!(!d.join("x.tsv").exists(), "no output is left by a failed search");
    }
    // A safetensors ranking keeps repeated query ids apart by row: warned about, written.
    let args = ["search", "--query_reps", "dup.safetensors", "--passage_reps", "c.*.safetensors"];
    let out = tevatron(d, &[&args[..], &["--save_ranking_to", "dup.ranking"]].concat());
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("a text run of it would merge them"), "{log}");
    // A passage id a text run cannot carry is refused when the run is written.
    let mut w =
        VectorWriter::create(&d.join("p.0.safetensors"), 40, VecDType::F32, BTreeMap::new())
            .unwrap();
    w.push(&[1.0; 40], &["d 1".to_string()]).unwrap();
    w.finish().unwrap();
    let args = ["search", "--query_reps", "q.safetensors", "--passage_reps", "p.0.safetensors"];
    let out = tevatron(d, &[&args[..], &["--save_ranking_to", "x.tsv", "--save_text"]].concat());
    fails_with(out, "x.tsv: docid \"d 1\" is empty or holds whitespace");
    assert!(!d.join("x.tsv").exists(), "no output is left by a failed search");
}

#[test]
fn hnsw_graphs_are_built_mapped_and_rescored() {
    let tmp = setup();
    let d = tmp.path();
    ok(search(d, "exact.tsv", &[]));
    let exact = std::fs::read_to_string(d.join("exact.tsv")).unwrap();
    ok(tevatron(
        d,
        &[
            "index",
            "--passage_reps",
            "c.*.safetensors",
            "--hnsw",
            "--hnsw_m",
            "16",
            "--output_dir",
            "g",
            "--quiet",
        ],
    ));
    assert_eq!(
        names(&d.join("g")),
        ["c.0.hnsw.json", "c.0.hnsw.usearch", "c.1.hnsw.json", "c.1.hnsw.usearch"]
    );
    // Asked for every row of each shard, the graph gives them all: exact search's ranking.
    let flags = ["--hnsw", "--compact_reps", "g/*.hnsw.json", "--rescore_multiplier", "400"];
    ok(search(d, "h.tsv", &flags));
    assert_eq!(std::fs::read_to_string(d.join("h.tsv")).unwrap(), exact);
    let out = search(
        d,
        "h4.tsv",
        &[
            "--hnsw",
            "--compact_reps",
            "g/*.hnsw.json",
            "--hnsw_ef_search",
            "32",
            "--batch_size",
            "8",
            "--quiet",
            "false",
        ],
    );
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert_eq!(std::fs::read_to_string(d.join("h4.tsv")).unwrap().lines().count(), 35);
    // Queries walk a graph one by one: a batch size is said to change nothing.
    assert!(log.contains("--batch_size 8 changes nothing with --hnsw"), "{log}");
    // A graph of bf16 vectors: recorded in its description, smaller, searched the same way.
    let mut bf16 = vec!["index", "--passage_reps", "c.*.safetensors", "--hnsw", "--hnsw_m", "16"];
    bf16.extend(["--hnsw_dtype", "bf16", "--output_dir", "g16", "--quiet"]);
    ok(tevatron(d, &bf16));
    let description = std::fs::read_to_string(d.join("g16/c.0.hnsw.json")).unwrap();
    assert!(description.contains("\"dtype\":\"bf16\""), "{description}");
    let size = |p: &str| std::fs::metadata(d.join(p)).unwrap().len();
    assert!(size("g16/c.0.hnsw.usearch") < size("g/c.0.hnsw.usearch"));
    ok(search(
        d,
        "h16.tsv",
        &["--hnsw", "--compact_reps", "g16/*.hnsw.json", "--rescore_multiplier", "400"],
    ));
    // (Every row wanted: rescored without the graph, so this shows the bf16 graph opens; the
    // graphs' recall in each dtype is tevatron-ir's hnsw test.)
    assert_eq!(std::fs::read_to_string(d.join("h16.tsv")).unwrap(), exact);
    let mut args = vec!["search", "--query_reps", "q.safetensors", "--passage_reps"];
    args.extend([
        "c.*.safetensors",
        "--depth",
        "7",
        "--save_ranking_to",
        "h16b.tsv",
        "--save_text",
    ]);
    args.extend(["--hnsw", "--compact_reps", "g16/*.hnsw.json"]);
    let run = tevatron(d, &args);
    let log = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(
        run.status.success() && log.contains("searched the HNSW graphs (bf16 vectors)"),
        "{log}"
    );
    assert_eq!(std::fs::read_to_string(d.join("h16b.tsv")).unwrap().lines().count(), 35);
    // An i8 graph ranks by cosine: these vectors are not unit length, and the log says so;
    // an i8 graph of the same vectors cut to unit length does not.
    let cosine = "--hnsw_dtype i8 ranks candidates by cosine";
    let i8_log = |reps: &str, out: &str| {
        let mut i8 = vec!["index", "--passage_reps", reps, "--hnsw", "--hnsw_m", "16"];
        i8.extend(["--hnsw_dtype", "i8", "--output_dir", out]);
        let run = tevatron(d, &i8);
        let log = String::from_utf8_lossy(&run.stderr).into_owned();
        assert!(run.status.success(), "{log}");
        log
    };
    let log = i8_log("c.*.safetensors", "g8");
    assert!(log.contains(cosine) && log.contains("c.0.safetensors"), "{log}");
    let rows = tevatron_ir::vectors::Vectors::open(&d.join("c.0.safetensors")).unwrap();
    let dim = rows.dim();
    let block = rows.rows().block(dim, 0, rows.len(), &mut Vec::new()).to_vec();
    let unit = tevatron_ir::vectors::truncate(&block, dim, dim, true);
    let ids: Vec<String> = (0..rows.len()).map(|i| format!("u{i}")).collect();
    let path = d.join("unit.safetensors");
    let mut w = VectorWriter::create(&path, dim, VecDType::F32, BTreeMap::new()).unwrap();
    w.push(&unit, &ids).unwrap();
    w.finish().unwrap();
    let log = i8_log("unit.safetensors", "gu");
    assert!(!log.contains(cosine), "{log}");
    fails_with(search(d, "x.tsv", &["--hnsw"]), "name their .hnsw.json files with --compact_reps");
    fails_with(
        search(d, "x.tsv", &["--hnsw", "--quantize", "int8", "--compact_reps", "g/*.hnsw.json"]),
        "--hnsw and --quantize are two different searches",
    );
    std::fs::create_dir(d.join("swap")).unwrap();
    for (from, to) in [("c.0", "c.1"), ("c.1", "c.0")] {
        for ext in ["json", "usearch"] {
            std::fs::copy(
                d.join(format!("g/{from}.hnsw.{ext}")),
                d.join(format!("swap/{to}.hnsw.{ext}")),
            )
            .unwrap();
        }
    }
    fails_with(
        search(d, "x.tsv", &["--hnsw", "--compact_reps", "swap/*.hnsw.json"]),
        "was made from other vectors than c.0.safetensors",
    );
    // A graph whose links are damaged in place (its size unchanged) is refused before it is
    // mapped: USearch follows the links as they are, and garbled ones crashed the search.
    // (The links come last in USearch's file, after its copy of the vectors.)
    std::fs::create_dir(d.join("bad")).unwrap();
    for shard in ["c.0", "c.1"] {
        for ext in ["json", "usearch"] {
            let name = format!("{shard}.hnsw.{ext}");
            std::fs::copy(d.join("g").join(&name), d.join("bad").join(&name)).unwrap();
        }
    }
    let graph = d.join("bad/c.1.hnsw.usearch");
    let mut bytes = std::fs::read(&graph).unwrap();
    let at = bytes.len() - 64;
    bytes[at] ^= 0x40;
    std::fs::write(&graph, &bytes).unwrap();
    fails_with(
        search(d, "x.tsv", &["--hnsw", "--compact_reps", "bad/*.hnsw.json"]),
        "c.1.hnsw.usearch: does not match the checksum its description",
    );
    // A description from before the checksum is refused with what to do.
    let json = d.join("bad/c.1.hnsw.json");
    let mut description: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    description.as_object_mut().unwrap().remove("links_checksum");
    std::fs::write(&json, description.to_string()).unwrap();
    fails_with(
        search(d, "x.tsv", &["--hnsw", "--compact_reps", "bad/*.hnsw.json"]),
        "names no links_checksum",
    );
    // A field of the wrong type is refused, not read as its default.
    std::fs::copy(d.join("g/c.1.hnsw.json"), &json).unwrap();
    std::fs::copy(d.join("g/c.1.hnsw.usearch"), &graph).unwrap();
    let mut description: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    description["connectivity"] = serde_json::json!("abc");
    std::fs::write(&json, description.to_string()).unwrap();
    fails_with(
        search(d, "x.tsv", &["--hnsw", "--compact_reps", "bad/*.hnsw.json"]),
        "connectivity \"abc\" is not a whole number of at least 1",
    );
    // An ef_search beyond the rows examines them all (it asked USearch for memory it could
    // not have): the ranking of a wide search.
    let huge = ["--hnsw", "--compact_reps", "g/*.hnsw.json", "--hnsw_ef_search", "1000000000000"];
    ok(search(d, "huge.tsv", &huge));
    let wide = ["--hnsw", "--compact_reps", "g/*.hnsw.json", "--hnsw_ef_search", "1500"];
    ok(search(d, "wide.tsv", &wide));
    assert_eq!(
        std::fs::read_to_string(d.join("huge.tsv")).unwrap(),
        std::fs::read_to_string(d.join("wide.tsv")).unwrap()
    );
    fails_with(
        tevatron(d, &["index", "--passage_reps", "c.*.safetensors", "--output_dir", "n"]),
        "give one of --quantize int8|binary and --hnsw",
    );
}

/// A corpus whose best rows for the query sit together, where the scan samples its floor: the
/// floor proves too high, the query is scanned again (the log says so), and the ranking is
/// still the best rows.
#[test]
fn a_sampled_floor_that_proves_too_high_is_logged_and_scanned_again() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (rows, dim) = (4096, 64);
    let mut x = 5u64;
    let mut next = || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((x >> 33) % 1000) as f32 - 499.5
    };
    let query: Vec<f32> = (0..dim).map(|_| next()).collect();
    let mut values: Vec<f32> = (0..rows * dim).map(|_| next()).collect();
    // Rows 2048-2107 (the start of the middle block of 256, which one thread's scan samples)
    // are the query: 60 rows at Hamming distance 0, at least the sample's rank (50 for 200
    // candidates here) and fewer than the 200 candidates.
    for r in 2048..2108 {
        values[r * dim..(r + 1) * dim].copy_from_slice(&query);
    }
    write_values(d, "c.0.safetensors", &values, dim, "d");
    write_values(d, "q.safetensors", &query, dim, "q");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tevatron"))
        .current_dir(d)
        .env("RAYON_NUM_THREADS", "1")
        .args(["search", "--query_reps", "q.safetensors", "--passage_reps", "c.0.safetensors"])
        .args(["--depth", "20", "--quantize", "binary", "--rescore_multiplier", "10"])
        .args(["--save_ranking_to", "run.tsv", "--save_text"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("1 query scans of a shard started from a floor sampled"), "{log}");
    let run = std::fs::read_to_string(d.join("run.tsv")).unwrap();
    let top: Vec<usize> =
        run.lines().map(|l| l.split('\t').nth(1).unwrap()[1..].parse().unwrap()).collect();
    assert_eq!(top.len(), 20);
    assert!(top.iter().all(|r| (2048..2108).contains(r)), "{run}");
}

/// `TEVATRON_KERNELS=portable` searches as a CPU without the vector instructions would: the
/// log names the portable kernels and the rankings are the fastest kernels' (every set
/// returns exact integers); a name this CPU cannot run, or no set's, is refused.
#[test]
fn the_portable_kernels_give_the_same_rankings() {
    let tmp = setup();
    let d = tmp.path();
    let with_kernels = |kernels: Option<&str>, quantize: &str, out: &str| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tevatron"));
        cmd.current_dir(d).env_remove("TEVATRON_KERNELS");
        if let Some(k) = kernels {
            cmd.env("TEVATRON_KERNELS", k);
        }
        cmd.args(["search", "--query_reps", "q.safetensors", "--passage_reps", "c.*.safetensors"])
            .args(["--depth", "7", "--quantize", quantize, "--save_ranking_to", out])
            .arg("--save_text")
            .output()
            .unwrap()
    };
    let mut fastest_log = String::new();
    for quantize in ["int8", "binary"] {
        let out = with_kernels(Some("portable"), quantize, "portable.tsv");
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{log}");
        let said = format!("scanned {quantize} codes with the portable kernels");
        assert!(log.contains(&said), "{log}");
        let out = with_kernels(None, quantize, "fastest.tsv");
        fastest_log += &String::from_utf8_lossy(&out.stderr);
        ok(out);
        let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
        assert_eq!(read("portable.tsv"), read("fastest.tsv"), "{quantize}");
    }
    fails_with(with_kernels(Some("sse9"), "int8", "x.tsv"), "TEVATRON_KERNELS=sse9: give portable");
    if !fastest_log.contains("AMX-INT8") {
        fails_with(with_kernels(Some("amx"), "int8", "x.tsv"), "this CPU does not run them");
    }
}
