//! The shard format and loader: every record once per epoch across ranks, seeded
//! order, exact position restore, and bad datasets refused with exit code 2.

mod common;

use common::{assert_bad_input, assert_bad_input_midway, bin};

use reg::data::loader::{assemble, permutation, position, ShardLoader};
use reg::data::shards::{write_index, write_shard, Dataset, EncoderInfo, Index};
use reg::data::BatchSource;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// A dataset for the demo model (8x8 latents, 17 tokens of width 32, 10 classes)
/// whose record `i` carries `i` in `latents[0, 0, 0]`.
fn make_dataset(dir: &Path, records: &[i64]) -> Index {
    let mut shards = Vec::new();
    let mut next = 0;
    for (i, &n) in records.iter().enumerate() {
        let ids = Tensor::arange_start(next, next + n, (Kind::Float, Device::Cpu));
        let latents = Tensor::randn([n, 8, 8, 8], (Kind::Float, Device::Cpu));
        latents.narrow(1, 0, 1).narrow(2, 0, 1).narrow(3, 0, 1).view([n]).copy_(&ids);
        let labels = Tensor::arange_start(next, next + n, (Kind::Int64, Device::Cpu)).remainder(10);
        let features = Tensor::randn([n, 17, 32], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        shards.push(write_shard(dir, i, &[("latents".into(), latents), ("labels".into(), labels), ("features".into(), features)]).unwrap());
        next += n;
    }
    let index = Index {
        format_version: 1,
        resolution: 64,
        latent_shape: vec![8, 8, 8],
        latent_dtype: "f32".into(),
        vae: "test".into(),
        encoder: Some(EncoderInfo { name: "test".into(), tokens: 17, z_dim: 32 }),
        features: true,
        images: false,
        class_names: (0..10).map(|c| format!("class{c}")).collect(),
        shards,
        bad_images: 0,
        bad_images_report: None,
        text: None,
    };
    write_index(dir, &index).unwrap();
    index
}

fn ids(b: &reg::data::Batch) -> Vec<i64> {
    let t = b.moments.select(1, 0).select(1, 0).select(1, 0).to_kind(Kind::Int64);
    Vec::<i64>::try_from(t).unwrap()
}

#[test]
fn every_record_once_per_epoch_across_ranks() {
    let dir = tempfile::tempdir().unwrap();
    make_dataset(dir.path(), &[7, 5, 9]); // 21 records
    let ds = Arc::new(Dataset::open(dir.path(), true).unwrap());
    let (batch, steps_per_epoch) = (4, 21 / 4);
    for world in [1i64, 2, 4] {
        let rows = batch / world;
        let mut seen = Vec::new();
        for rank in 0..world {
            let mut l = ShardLoader::new(ds.clone(), 3, batch, 2, Device::Cpu).unwrap();
            for step in 0..steps_per_epoch {
                seen.extend(ids(&l.batch(step as u64, rank * rows, rows).unwrap()));
            }
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len() as i64, steps_per_epoch * batch, "world {world}: each record at most once, 20 of 21 used");
        // The same global batches whatever the world size: epoch 0 is a prefix of the permutation.
        let mut want = permutation(21, 3, 0)[..20].to_vec();
        want.sort();
        assert_eq!(seen, want);
    }
}

#[test]
fn same_seed_same_order_and_a_restored_position_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    make_dataset(dir.path(), &[6, 6, 6]);
    let ds = Arc::new(Dataset::open(dir.path(), true).unwrap());
    let mut a = ShardLoader::new(ds.clone(), 11, 4, 2, Device::Cpu).unwrap();
    let straight: Vec<Vec<i64>> = (0..9u64).map(|s| ids(&a.batch(s, 0, 4).unwrap())).collect();
    let mut b = ShardLoader::new(ds.clone(), 11, 4, 2, Device::Cpu).unwrap();
    let again: Vec<Vec<i64>> = (0..9u64).map(|s| ids(&b.batch(s, 0, 4).unwrap())).collect();
    assert_eq!(straight, again);
    // Stop in the middle of epoch 1 (4 steps per epoch), restart at step 6.
    let mut c = ShardLoader::new(ds.clone(), 11, 4, 2, Device::Cpu).unwrap();
    let resumed: Vec<Vec<i64>> = (6..9u64).map(|s| ids(&c.batch(s, 0, 4).unwrap())).collect();
    assert_eq!(&straight[6..], &resumed[..]);
    assert_eq!(position(6, 18, 4), (1, 8));
    let mut d = ShardLoader::new(ds.clone(), 12, 4, 2, Device::Cpu).unwrap();
    assert_ne!(ids(&d.batch(0, 0, 4).unwrap()), straight[0], "another seed, another order");
    // A record is the stored bytes: labels follow their record.
    let perm = permutation(18, 11, 0);
    let bt = assemble(&ds, &perm, 0, 0, 4, false, reg::data::loader::Key { seed: 0, step: 0 }).unwrap();
    let want: Vec<i64> = perm[..4].iter().map(|i| i % 10).collect();
    assert_eq!(Vec::<i64>::try_from(bt.y).unwrap(), want);
}

fn train_on(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    bin()
        .args(["train", "--config"])
        .arg(common::repo().join("configs/demo.yaml"))
        .args(["--set", "data.source=shards", "--set", &format!("data.path={}", data.display())])
        .args(["--set", &format!("train.output_dir={}", out.display())])
        .args(["--set", "train.steps=3", "--threads", "1"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn training_reads_shards_and_bad_datasets_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let (good, out) = (tmp.path().join("good"), tmp.path().join("runs"));
    std::fs::create_dir_all(&good).unwrap();
    make_dataset(&good, &[20, 20]);
    let ok = train_on(&good, &out, &[]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    let copy = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&good).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    let missing = tmp.path().join("empty");
    std::fs::create_dir_all(&missing).unwrap();
    assert_bad_input(&train_on(&missing, &out, &[]), &["index.json"]);

    let d = copy("truncated");
    let f = d.join("shard-00001.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    assert_bad_input(&train_on(&d, &out, &[]), &["shard-00001.safetensors"]);

    let d = copy("sha");
    let f = d.join("shard-00000.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&f, bytes).unwrap();
    assert_bad_input_midway(&train_on(&d, &out, &[]), &["shard-00000.safetensors", "SHA-256"]);

    let d = copy("shape");
    let ix = std::fs::read_to_string(d.join("index.json")).unwrap().replace("\"z_dim\": 32", "\"z_dim\": 48");
    std::fs::write(d.join("index.json"), ix).unwrap();
    assert_bad_input(&train_on(&d, &out, &[]), &["shard-00000.safetensors", "features"]);

    // The dataset's encoder disagrees with the model: 17 tokens of 32 vs a 16-wide z.
    assert_bad_input(&train_on(&good, &out, &["--set", "model.z_dim=16"]), &["index.json", "z_dim"]);
    assert_bad_input(&train_on(&good, &out, &["--set", "model.patch_size=4"]), &["index.json", "tokens"]);

    // A label outside the class range (labels are the last-but-one field in the shard;
    // rewrite through the library to keep the file valid).
    let d = tmp.path().join("labels");
    std::fs::create_dir_all(&d).unwrap();
    let mut ix = make_dataset(&d, &[20, 20]);
    let t = reg::formats::weights::read(&d.join("shard-00001.safetensors")).unwrap();
    let t: Vec<(String, Tensor)> = t.into_iter().map(|(n, mut v)| if n == "labels" { (n, v.fill_(12)) } else { (n, v) }).collect();
    ix.shards[1] = write_shard(&d, 1, &t).unwrap();
    write_index(&d, &ix).unwrap();
    assert_bad_input_midway(&train_on(&d, &out, &["--set", "train.steps=10"]), &["shard-00001.safetensors", "labels", "12"]);
}
