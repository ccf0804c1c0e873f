//! `tevatron`: dense retrieval from one binary. A thin `main` (ripgrep's shape): parse flags,
//! run one command, print the error chain once and exit 2 on failure.

mod args;
mod cmd;
mod dataset;
mod flags;
mod launch;
mod plot;
mod progress;

use std::process::ExitCode;

use clap::Parser;

/// The system allocator, plus the bookkeeping that lets model weights stay memory-mapped
/// (`tevatron_model::mapped`).
#[global_allocator]
static ALLOC: tevatron_model::mapped::MappedAlloc = tevatron_model::mapped::MappedAlloc;

/// Keeps freed tensor buffers in the heap instead of returning them to the OS, for the
/// commands that run a model forward (`encode`, `rerank`, `annotate`). candle allocates a fresh
/// buffer per op; with glibc's default (mmap above 128 KiB, adaptive) every large activation
/// costs page faults and zeroing, about a tenth of encode time on CPU (and of `rerank --bf16`'s,
/// which ran without it until 2026-12-06: 4.7-5.0 s against 5.6-6.2 s for 1,000 pairs, the same
/// peak memory). `search` takes a narrower setting ([`tune_allocator_for_search`]); eval gains
/// nothing from either.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Training goes further: tensors above glibc's largest mmap threshold (32 MiB; an attention
/// score tensor of a 64 x 128-token batch is 50 MB) would still be mapped and unmapped on every
/// op, and the kernel zeroes each fresh page: a third of a CPU training step went to page
/// faults. With mmap off and trimming off (-1), freed blocks stay in the heap and are reused:
/// the heap settles at the peak of one step.
pub fn tune_allocator_for_training() {
    tune_allocator();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}

/// A middle way for `search`: a fixed mmap threshold (which also turns off glibc's dynamic
/// raising of it) of 4 MiB, with trimming above 8 MiB, so that the matrix kernel's packing
/// buffers (about 1.5 MB, one per product call) are reused from the heap while larger scratch
/// goes back to the OS. At 128 KiB each packing buffer was mapped afresh and its pages faulted
/// and zeroed: 1.5M page faults and 2.5 s of system time in a 1M x 384 search of 1,000 queries,
/// which now runs 20% faster with 30-50 MB more peak memory at 2 threads.
pub fn tune_allocator_for_search() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

/// How many rounds candle's CPU worker threads spin after an op before they sleep (its
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT`, 25,000 by default), unless the user sets it. Candle's
/// workers share the cores with rayon's, which run this tool's own kernels between candle's
/// ops: a worker spinning through a rayon op takes a core from it (13% of a MiniLM training
/// step's samples on 2 cores). About a wake-up's cost of spinning keeps back-to-back candle ops
/// cheap and gives the core back otherwise; training steps took 2-18% less time
/// (docs/benchmarks.md).
const CANDLE_SPIN_LIMIT: &str = "100";

fn main() -> ExitCode {
    tevatron_ir::caught_panic::install_hook();
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // Before any thread exists: candle reads it when it first starts its workers.
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT);
    }
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // candle attaches a backtrace to its errors whenever RUST_BACKTRACE is set (as some
        // machines set it for every process), and its text went into the one-line messages
        // that quote them. RUST_LIB_BACKTRACE=0 keeps them out; RUST_BACKTRACE still gives
        // panics theirs, and setting RUST_LIB_BACKTRACE=1 brings them back.
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let expanded = args::expand_json_args(raw.clone());
    // With a JSON arguments file, a flag error is the file's: say which file.
    let from_file = match &expanded {
        Ok(e) if *e != raw => raw.get(2).map(|f| f.to_string_lossy().into_owned()),
        _ => None,
    };
    let in_file = |e: String| match &from_file {
        Some(f) => format!("in the arguments file {f}: {e}"),
        None => e,
    };
    let screened = match expanded.and_then(flags::screen) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tevatron: {}", in_file(format!("{e:#}")));
            return ExitCode::from(2);
        }
    };
    let cli = match args::Cli::try_parse_from(screened.argv) {
        Ok(cli) => cli,
        Err(e) if from_file.is_some() && e.use_stderr() => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or_default().trim_start_matches("error: ");
            eprintln!("tevatron: {}", in_file(first.to_string()));
            return ExitCode::from(2);
        }
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // Only rank 0 of a data-parallel run logs progress (Hugging Face's replicas log warnings).
    let replica = std::env::var("RANK").is_ok_and(|r| r.trim() != "0");
    let quiet = cli.quiet() || replica;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TEVATRON_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(if quiet { "warn" } else { "info" })
            }),
        )
        .init();
    for note in &screened.notes {
        tracing::info!("{note}");
    }
    match cmd::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A closed pipe (`tevatron eval ... | head`) is not a failure.
            if err.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("tevatron: {err:#}");
            ExitCode::from(2)
        }
    }
}
