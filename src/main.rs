//! reg-ddp: prepare data, train, sample, score and benchmark SiT + REG from one binary.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "reg-ddp", version, about = "SiT + REG diffusion training on libtorch")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a YAML config.
    Train(cmd::train::Args),
    /// Time training steps on synthetic data and print one JSON line.
    Bench(cmd::bench::Args),
    /// Prepare a dataset: images -> ADM crop -> VAE moments + DINOv2 features -> shards.
    Prepare(cmd::prepare::Args),
    /// Write the built-in image sets: the demo's (one folder per class) or, with --captioned, the shapes set.
    DemoImages(cmd::demo_images::Args),
    /// Train the captioned shapes set's representation encoder (a DINOv2-layout ViT) for REG/REPA.
    TrainEncoder(cmd::train_encoder::Args),
    /// Generate images (PNGs and an ADM-evaluator .npz) from trained weights.
    Sample(cmd::sample::Args),
    /// Attribute accuracy and diversity of generated images of the captioned shapes set (one JSON line).
    ScoreShapes(cmd::score_shapes::Args),
    /// The REG-with-captions study on the shapes set: {SiT, +REPA, +REG} x {class, caption} x seeds, curves and a table.
    Study(cmd::study::Args),
    /// FID, sFID, Inception Score, precision/recall of samples against an ADM reference batch or a
    /// folder of real images; CLIP score against the samples' captions with --clip.
    Eval(cmd::eval::Args),
    /// Measure how fast the data loaders of one node (--ranks) feed from a dataset folder.
    BenchData(cmd::bench_data::Args),
    /// Check every shard of a dataset against its index (SHA-256), in parallel.
    Verify(cmd::verify::Args),
    /// Write a checkpoint's weights (or EMA) as one safetensors file with REG names.
    Export(cmd::export::Args),
    /// Write a state dict of a PyTorch checkpoint of the original REG code (`.pt`) as one safetensors file.
    Import(cmd::import::Args),
}

fn main() {
    // A file-size limit (`ulimit -f`) then fails the write with EFBIG, reported and
    // cleaned up like a full disk, instead of killing the process mid-write.
    // SAFETY: sets one signal's disposition before any other thread exists.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => cmd::train::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Export(a) => cmd::export::run(a),
        Command::BenchData(a) => cmd::bench_data::run(a),
        Command::Verify(a) => cmd::verify::run(a),
        Command::Prepare(a) => cmd::prepare::run(a),
        Command::Sample(a) => cmd::sample::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::ScoreShapes(a) => cmd::score_shapes::run(a),
        Command::Study(a) => cmd::study::run(a),
        Command::DemoImages(a) => cmd::demo_images::run(a),
        Command::Import(a) => cmd::import::run(a),
        Command::TrainEncoder(a) => cmd::train_encoder::run(a),
    };
    if let Err(e) = result {
        let input = reg::error::is_input_error(&e);
        // Every rank sees the same bad input; one of them says so. One line: the whole
        // context chain, without a backtrace.
        let rank = reg::dist::LaunchInfo::from_env().rank;
        if !input || rank == 0 {
            // A message from elsewhere (a decoder, libtorch) may span lines: the promise is one line.
            let msg: Vec<String> = format!("{e:#}").lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
            let who = if rank > 0 { format!("rank {rank}: ") } else { String::new() };
            reg::error::print_line(&format!("error: {who}{}", msg.join(" ")));
        }
        std::process::exit(if input { 2 } else { 1 });
    }
}
