//! `reg-ddp study`: does REG speed up training with captions as it does with classes? On
//! the procedural shapes set in pixel space: {SiT, SiT + REPA, SiT + REG} x {class,
//! caption} x seeds, each run through the real pipeline (this binary's `train` and
//! `sample`), EMA samples of held-out conditions scored by the analytic reader every
//! few steps; a CSV, curves with seed bands, grids and a markdown table. Resumable: a
//! finished step of any stage is not redone.

use crate::shapes::curves::{self, Point};
use crate::shapes::reader;
use crate::shapes::{self, Attribute, SetSpec, Split, Wanted};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output folder (data, encoder, runs, samples, results).
    #[arg(long, default_value = "study")]
    pub out: PathBuf,
    /// Seeds per arm (model init, data order and noise; the same across arms).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Training steps per run.
    #[arg(long, default_value_t = 1500)]
    pub steps: i64,
    /// Steps between evaluations (EMA checkpoints).
    #[arg(long, default_value_t = 500)]
    pub every: i64,
    /// Training images per shape (5 shapes).
    #[arg(long, default_value_t = 400)]
    pub per_class: u32,
    /// Held-out conditions sampled at each evaluation (balanced over the shapes).
    #[arg(long, default_value_t = 40)]
    pub eval_num: usize,
    /// Sampler steps (Heun ODE) of the evaluations. Fewer than 32 leave the pixel noise
    /// in: at 16 the same model reads as blobs.
    #[arg(long, default_value_t = 32)]
    pub sample_steps: i64,
    /// Guidance scale of the evaluations (the image; the REG token's too for REG).
    #[arg(long, default_value_t = 2.0)]
    pub cfg: f64,
    /// Methods to run: any of sit, repa, reg.
    #[arg(long, value_delimiter = ',', default_value = "sit,repa,reg")]
    pub methods: Vec<String>,
    /// Conditions to run: any of class, caption.
    #[arg(long, value_delimiter = ',', default_value = "class,caption")]
    pub conditions: Vec<String>,
    /// A bigger model and longer runs, for a GPU (`train.device: auto`).
    #[arg(long)]
    pub gpu: bool,
    /// The CLIP folder whose tokenizer and (random, tiny) text tower read the captions.
    #[arg(long, default_value = "tests/data/clip_tiny")]
    pub clip: PathBuf,
    /// Training steps of the shapes encoder (default: `train-encoder`'s).
    #[arg(long)]
    pub encoder_steps: Option<i64>,
    /// Attributes every image shares (`demo-images --fix`); `""` lets all four vary.
    /// White and large by default: with 4 attributes free, no arm learns its condition
    /// in a CPU budget (docs/study.md).
    #[arg(long, default_value = "colour=white,size=large")]
    pub fix: String,
    /// Runs trained at once.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// CPU threads for each training / sampling process. Two runs of one thread each do
    /// 1.7x the work of one run of two threads on this model (2-core CPU).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// Image side; `identity:4` latents are 8 x 8 x 48, SiT patch 1 gives 64 tokens (a 4 x 4
/// pixel block, 48 values, each: fewer than the width, which v-prediction in pixel space
/// needs to pass the noise through), and the encoder's patch 4 at 32 px the same 64 (+ its
/// class token).
const SIZE: u32 = 32;
const VAE: &str = "identity:4";
/// Caption tokens (the study's captions are short; the tokenizer pads and cuts to this).
const TEXT_LEN: i64 = 24;

fn spec(split: Split, per_class: u32, fixed: Wanted) -> SetSpec {
    SetSpec { size: SIZE, split, seed: 0, class_attribute: Attribute::Shape, per_class, captions_per_image: 4, fixed }
}

/// Runs this binary with `args`; a failure names the stage.
fn reg_ddp(stage: &str, args: &[String]) -> Result<()> {
    let exe = std::env::current_exe().context("locating reg-ddp")?;
    let out = Command::new(exe).args(args).output().with_context(|| format!("{stage}: cannot start"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::bail!("{stage} failed: {}", err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(no output)"));
    }
    Ok(())
}

fn s(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// The study's copy of the CLIP folder, with captions padded to `TEXT_LEN` tokens.
fn clip_folder(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from).with_context(|| format!("{}: cannot list", from.display()))?.flatten() {
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    let cfg = to.join("tokenizer_config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg)?)?;
    v["model_max_length"] = serde_json::json!(TEXT_LEN);
    std::fs::write(&cfg, serde_json::to_vec_pretty(&v)?)?;
    Ok(())
}

/// The held-out conditions: class labels and captions, and what each image is asked to show.
struct EvalSet {
    labels: Vec<i64>,
    prompts: Vec<String>,
    /// Per image: the shape (class condition) / the attributes its caption mentions.
    class_wanted: Vec<Wanted>,
    caption_wanted: Vec<Wanted>,
    real: Vec<shapes::Attributes>,
}

fn eval_set(n: usize, fixed: Wanted) -> EvalSet {
    let shapes_n = Attribute::Shape.values().len();
    let per = n.div_ceil(shapes_n) as u32;
    let items: Vec<shapes::Item> = shapes::items(&spec(Split::Heldout, per, fixed)).collect();
    // Interleave the shapes so that any prefix is balanced.
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| (i % per as usize, i / per as usize));
    let picked: Vec<&shapes::Item> = order.iter().take(n).map(|&i| &items[i]).collect();
    let classes = Attribute::Shape.values();
    EvalSet {
        labels: picked.iter().map(|it| classes.iter().position(|c| *c == it.class).expect("a shape class") as i64).collect(),
        prompts: picked.iter().map(|it| it.captions[0].text.clone()).collect(),
        class_wanted: picked.iter().map(|it| Wanted { shape: Some(it.attributes.shape), ..Default::default() }).collect(),
        // A fixed attribute is right in every image that has the set's look: only what
        // varies is scored.
        caption_wanted: picked.iter().map(|it| it.captions[0].wanted(&it.attributes).without(&fixed)).collect(),
        real: picked.iter().map(|it| it.attributes).collect(),
    }
}

/// The run config of one arm: the same model, data, schedule and seed for every method;
/// methods differ only in the loss weights and the REG token.
fn run_config(a: &Args, out: &Path, cond: &str, method: &str, seed: u64, z_dim: i64) -> String {
    let (depth, hidden, heads, batch) = if a.gpu { (8, 256, 8, 128) } else { (4, 96, 4, 32) };
    let (proj, cls, token) = match method {
        "sit" => (0.0, 0.0, false),
        "repa" => (0.5, 0.0, false),
        _ => (0.5, 0.03, true),
    };
    let text = if cond == "caption" {
        format!("  condition: text\n  text_dim: 32\n  text_len: {TEXT_LEN}\n  text_encoder: online\n",)
    } else {
        String::new()
    };
    let text_path = if cond == "caption" { format!("  text_encoder_path: {}\n", out.join("clip").display()) } else { String::new() };
    format!(
        "# The study's {cond}/{method} arm, seed {seed} (written by reg-ddp study).
model:
  depth: {depth}
  hidden_size: {hidden}
  num_heads: {heads}
  patch_size: 1
  input_size: 8
  in_channels: 48
  num_classes: 5
  encoder_depth: 2
  z_dim: {z_dim}
  projector_dim: 256
  class_dropout_prob: 0.1
  reg_token: {token}
{text}loss:
  path: linear
  weighting: uniform
  proj_coeff: {proj}
  cls_coeff: {cls}
  latent_scale: 1.0
optim:
  lr: 1.0e-3
  ema_decay: 0.995
  max_grad_norm: 1.0
train:
  name: {cond}-{method}-s{seed}
  output_dir: {runs}
  global_batch: {batch}
  steps: {steps}
  seed: {seed}
  log_every: {every}
  checkpoint_every: {every}
  keep_checkpoints: 1000
  device: {device}
data:
  path: {data}
{text_path}",
        runs = out.join("runs").display(),
        steps = a.steps,
        every = a.every,
        device = if a.gpu { "auto" } else { "cpu" },
        data = out.join("dataset").display(),
    )
}

/// Samples `step`'s EMA weights of a run on the held-out conditions and scores them.
#[allow(clippy::too_many_arguments)]
fn evaluate(a: &Args, run: &Path, step: i64, cond: &str, method: &str, seed: u64, set: &EvalSet, out: &Path) -> Result<Point> {
    let samples = out.join("samples").join(run.file_name().expect("a run folder")).join(format!("step-{step:07}"));
    let ckpt = run.join(format!("step-{step:07}"));
    let cls_cfg = if method == "reg" { a.cfg } else { 0.0 };
    let mut args: Vec<String> = ["sample", "--ckpt"].map(s).to_vec();
    args.extend([s(ckpt.display()), s("--ema"), s("--vae"), s(VAE), s("--out"), s(samples.display())]);
    args.extend([s("--num"), s(set.labels.len()), s("--steps"), s(a.sample_steps), s("--mode"), s("ode"), s("--heun")]);
    args.extend([s("--cfg"), s(a.cfg), s("--cls-cfg"), s(cls_cfg), s("--interval"), s("0,1"), s("--seed"), s(0)]);
    args.extend([s("--batch"), s(64), s("--threads"), s(a.threads), s("--device"), s(if a.gpu { "auto" } else { "cpu" })]);
    if cond == "caption" {
        let prompts = out.join("heldout_prompts.txt");
        args.extend([s("--prompts"), s(prompts.display())]);
    } else {
        args.extend([s("--labels"), set.labels.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(",")]);
    }
    if !samples.with_extension("npz").exists() {
        reg_ddp(&format!("sample {}", ckpt.display()), &args)?;
    }
    let images = reader::load_samples(&samples)?;
    let read: Vec<Option<shapes::Attributes>> = images.iter().map(reader::read).collect();
    let wanted = if cond == "caption" { &set.caption_wanted } else { &set.class_wanted };
    let acc = reader::accuracy(&read, wanted);
    let shape_only: Vec<Wanted> = set.real.iter().map(|r| Wanted { shape: Some(r.shape), ..Default::default() }).collect();
    let shape = reader::accuracy(&read, &shape_only);
    let dist = reader::distance(&read, &set.real);
    Ok(Point {
        condition: cond.into(),
        method: method.into(),
        seed,
        step,
        accuracy: acc.all,
        shape_accuracy: shape.all,
        colour_accuracy: acc.colour,
        size_accuracy: acc.size,
        position_accuracy: acc.position,
        readable: acc.readable,
        distance: dist.joint,
        marginal_distance: (dist.shape + dist.colour + dist.size + dist.position) / 4.0,
    })
}

pub fn run(a: Args) -> Result<()> {
    for m in &a.methods {
        if !["sit", "repa", "reg"].contains(&m.as_str()) {
            crate::bail_input!("--methods: {m:?} (sit, repa or reg)");
        }
    }
    for c in &a.conditions {
        if !["class", "caption"].contains(&c.as_str()) {
            crate::bail_input!("--conditions: {c:?} (class or caption)");
        }
    }
    if a.seeds == 0 || a.steps <= 0 || a.every <= 0 || a.steps % a.every != 0 || a.eval_num < 5 {
        crate::bail_input!("--seeds, --steps, --every: positive, --every dividing --steps; --eval-num: at least 5");
    }
    let fixed = Wanted::parse_flag("--fix", &a.fix)?;
    if a.jobs == 0 {
        crate::bail_input!("--jobs: at least 1");
    }
    let out = &a.out;
    std::fs::create_dir_all(out)?;
    // Everything in the folder (data, runs, samples) was made for one world: a rerun
    // with another --fix would mix them.
    let world = out.join("fixed.json");
    let this = serde_json::to_string(&fixed)?;
    match std::fs::read_to_string(&world) {
        Ok(before) if before != this => {
            crate::bail_input!("{}: this study was drawn with --fix {before}; use another --out for {this}", world.display())
        }
        Ok(_) => {}
        Err(_) => std::fs::write(&world, &this)?,
    }
    let started = std::time::Instant::now();
    let stage = |what: &str| eprintln!("reg-ddp study: [{:>6.0} s] {what}", started.elapsed().as_secs_f64());

    // 1. Data: disjoint training, encoder and held-out splits of the shapes set.
    for (name, split, per) in [("train", Split::Train, a.per_class), ("encoder", Split::Encoder, a.per_class)] {
        let dir = out.join("data").join(name);
        if !dir.join("attributes.jsonl").exists() {
            stage(&format!("drawing the {name} split"));
            shapes::write_set(&dir, &spec(split, per, fixed))?;
        }
    }
    let set = eval_set(a.eval_num, fixed);
    std::fs::write(out.join("heldout_prompts.txt"), set.prompts.join("\n") + "\n")?;
    if !out.join("clip/tokenizer_config.json").exists() {
        clip_folder(&a.clip, &out.join("clip"))?;
    }
    // 2. The representation encoder, trained on the encoder split.
    let encoder = out.join("encoder");
    if !encoder.join("model.safetensors").exists() {
        stage("training the shapes encoder");
        let mut args: Vec<String> = ["train-encoder", "--images"].map(s).to_vec();
        args.extend([s(out.join("data/encoder").display()), s("--out"), s(encoder.display()), s("--patch"), s(4)]);
        args.extend([s("--resolution"), s(SIZE), s("--threads"), s(a.threads)]);
        if let Some(n) = a.encoder_steps {
            args.extend([s("--steps"), s(n)]);
        }
        reg_ddp("train-encoder", &args)?;
    }
    let enc_cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(encoder.join("config.json"))?)?;
    let z_dim = enc_cfg["hidden_size"].as_i64().context("encoder config.json: hidden_size")?;
    // 3. One dataset for every arm: pixels, encoder features, labels and caption ids.
    let dataset = out.join("dataset");
    if !dataset.join("index.json").exists() {
        stage("preparing the dataset");
        let mut args: Vec<String> = ["prepare", "--images"].map(s).to_vec();
        args.extend([s(out.join("data/train").display()), s("--out"), s(dataset.display()), s("--vae"), s(VAE)]);
        args.extend([s("--encoder"), s(encoder.display()), s("--encoder-resolution"), s(SIZE), s("--resolution"), s(SIZE)]);
        args.extend([s("--caption-files"), s("--text-encoder"), s(out.join("clip").display()), s("--threads"), s(a.threads)]);
        args.extend([s("--device"), s(if a.gpu { "auto" } else { "cpu" })]);
        reg_ddp("prepare", &args)?;
    }
    // 4. The arms, `--jobs` at a time, seed-major so that a cut-short study still has
    // every arm.
    std::fs::create_dir_all(out.join("configs"))?;
    std::fs::create_dir_all(out.join("grids"))?;
    let mut queue = std::collections::VecDeque::new();
    for seed in 0..a.seeds {
        for cond in &a.conditions {
            for method in &a.methods {
                queue.push_back((queue.len(), seed, cond.as_str(), method.as_str()));
            }
        }
    }
    let queue = std::sync::Mutex::new(queue);
    let done = std::sync::Mutex::new(Vec::<(usize, Vec<Point>)>::new());
    let arm = |seed: u64, cond: &str, method: &str| -> Result<Vec<Point>> {
        let name = format!("{cond}-{method}-s{seed}");
        let run = out.join("runs").join(&name);
        let cfg = out.join("configs").join(format!("{name}.yaml"));
        std::fs::write(&cfg, run_config(&a, out, cond, method, seed, z_dim))?;
        if !run.join(format!("step-{:07}", a.steps)).join("manifest.json").exists() {
            stage(&format!("training {name}"));
            let mut args: Vec<String> = ["train", "--config"].map(s).to_vec();
            args.extend([s(cfg.display()), s("--resume"), s("auto"), s("--threads"), s(a.threads)]);
            reg_ddp(&format!("train {name}"), &args)?;
        }
        let steps = (a.every..=a.steps).step_by(a.every as usize);
        let points = steps.map(|step| evaluate(&a, &run, step, cond, method, seed, &set, out)).collect::<Result<Vec<_>>>()?;
        if seed == 0 {
            let last = out.join("samples").join(&name).join(format!("step-{:07}", a.steps));
            let images = reader::load_samples(&last)?;
            // Rows of 8, scaled up 2x for a look by eye.
            crate::diffusion::generate::save_grid(&images, 8, 2, &out.join("grids").join(format!("{cond}-{method}.png")))?;
        }
        Ok(points)
    };
    std::thread::scope(|sc| -> Result<()> {
        let workers: Vec<_> = (0..a.jobs)
            .map(|_| {
                sc.spawn(|| -> Result<()> {
                    loop {
                        let Some((i, seed, cond, method)) = queue.lock().expect("queue").pop_front() else { return Ok(()) };
                        let finished = arm(seed, cond, method).and_then(|points| {
                            let mut done = done.lock().expect("results");
                            done.push((i, points));
                            done.sort_by_key(|(i, _)| *i);
                            let all: Vec<Point> = done.iter().flat_map(|(_, p)| p.iter().cloned()).collect();
                            curves::write_csv(&out.join("study.csv"), &all)
                        });
                        // A failure stops the other workers from starting new arms.
                        finished.inspect_err(|_| queue.lock().expect("queue").clear())?;
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("a study worker panicked"))
    })?;
    let points: Vec<Point> = done.into_inner().expect("results").into_iter().flat_map(|(_, p)| p).collect();
    // 5. Curves and the table.
    curves::plot(&out.join("study.png"), &points)?;
    let table = curves::table(&points);
    std::fs::write(out.join("study.md"), &table)?;
    stage("done");
    println!("{table}");
    eprintln!(
        "reg-ddp study: wrote {}, {}, {} and grids/ in {:.0} s",
        out.join("study.csv").display(),
        out.join("study.png").display(),
        out.join("study.md").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
