//! `reg-ddp prepare` with captions: COCO's annotations JSON and `.txt` sidecars (flat and
//! class tree) give shards with every caption's token ids (and CLIP text states), the
//! loader picks one caption per row the same way for any rank layout, and bad caption
//! files exit 2 with one line.

mod common;

use common::{assert_bad_input, assert_rel, bin, ok, repo};
use reg::data::loader::{assemble, caption_pick, permutation, Key};
use reg::data::shards::Dataset;
use reg::encoders::clip::{Clip, Towers};
use reg::encoders::clip_tokenizer::ClipTokenizer;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

fn clip_dir() -> PathBuf {
    repo().join("tests/data/clip_tiny")
}

fn coco_excerpt() -> PathBuf {
    repo().join("tests/data/coco_captions/captions_val2014_excerpt.json")
}

/// `prepare` of `images` into `out` with the tiny VAE and DINOv2 at 64 px, plus `extra`.
fn prepare(images: &Path, out: &Path, extra: &[&str]) -> Command {
    let r = repo();
    let mut c = bin();
    c.args(["prepare", "--images"]).arg(images).arg("--out").arg(out);
    c.arg("--vae").arg(r.join("tests/data/vae_tiny")).arg("--encoder").arg(r.join("tests/data/dinov2_tiny"));
    c.args(["--resolution", "64", "--shard-size", "4", "--batch", "3", "--threads", "1"]).args(extra);
    c
}

/// `demo-images` (class00/img0000.png, ...) under `dir`.
fn demo_images(dir: &Path, classes: u32, per_class: u32) {
    ok(bin().args(["demo-images", "--classes", &classes.to_string(), "--per-class", &per_class.to_string(), "--out"]).arg(dir));
}

fn index(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap()
}

/// Every tensor of every shard, in shard order, as one map per shard.
fn shards(dir: &Path) -> Vec<std::collections::HashMap<String, Tensor>> {
    let ix = index(dir);
    ix["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| reg::formats::weights::read_map(&dir.join(s["file"].as_str().unwrap())).unwrap())
        .collect()
}

/// The captions of the records of a dataset, in record order, read back through
/// `caption_offsets` / `caption_ids`; and the labels.
fn stored_captions(dir: &Path) -> (Vec<Vec<Vec<i64>>>, Vec<i64>) {
    let (mut records, mut labels) = (Vec::new(), Vec::new());
    for s in shards(dir) {
        let ids = &s["caption_ids"];
        assert_eq!(ids.kind(), Kind::Int);
        let off = Vec::<i64>::try_from(&s["caption_offsets"]).unwrap();
        assert_eq!(off[0], 0);
        assert_eq!(*off.last().unwrap(), ids.size()[0]);
        for r in 0..off.len() - 1 {
            records.push((off[r]..off[r + 1]).map(|c| Vec::<i64>::try_from(ids.get(c).to_kind(Kind::Int64)).unwrap()).collect());
        }
        labels.extend(Vec::<i64>::try_from(&s["labels"]).unwrap());
    }
    (records, labels)
}

/// Three demo images under the excerpt's COCO file names (PNG bytes: images are decoded by
/// content, as COCO's own folders hold a few PNGs named .jpg).
fn coco_images(dir: &Path) -> PathBuf {
    demo_images(&dir.join("demo"), 1, 3);
    let images = dir.join("val2014");
    std::fs::create_dir_all(&images).unwrap();
    for (k, id) in [318219, 331352, 289393].iter().enumerate() {
        std::fs::copy(dir.join(format!("demo/class00/img{k:04}.png")), images.join(format!("COCO_val2014_{id:012}.jpg"))).unwrap();
    }
    images
}

#[test]
fn coco_captions_keep_every_caption_and_precompute_clip_states() {
    let tmp = tempfile::tempdir().unwrap();
    let images = coco_images(tmp.path());
    let out = tmp.path().join("coco");
    let excerpt = coco_excerpt().display().to_string();
    let clip = clip_dir().display().to_string();
    let o = ok(&mut prepare(&images, &out, &["--captions", &excerpt, "--text-encoder", &clip, "--text-precomputed"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("1 images without a caption skipped"), "{err}");

    // The excerpt's captions, image by image in the order of `images`, each image's in
    // the order of `annotations`; image 318219 has none and is left out.
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(coco_excerpt()).unwrap()).unwrap();
    let want_text: Vec<Vec<String>> = [331352, 289393]
        .iter()
        .map(|id| {
            json["annotations"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["image_id"] == *id)
                .map(|a| a["caption"].as_str().unwrap().to_string())
                .collect()
        })
        .collect();
    let tk = ClipTokenizer::load(&clip_dir()).unwrap();
    let want: Vec<Vec<Vec<i64>>> = want_text.iter().map(|caps| caps.iter().map(|c| tk.encode_padded(c).unwrap()).collect()).collect();
    let (got, labels) = stored_captions(&out);
    assert_eq!(got, want, "every caption kept, tokenized as ClipTokenizer does");
    assert_eq!(labels, vec![0, 0]);

    let ix = index(&out);
    assert_eq!(ix["class_names"], serde_json::json!(["image"]));
    let t = &ix["text"];
    assert_eq!(t["captions"], 10);
    assert_eq!(t["max_length"], 77);
    assert_eq!(t["hidden_size"], 32);
    assert_eq!(t["precomputed"], true);
    assert_eq!(t["tokenizer"], "clip_tiny");
    assert_eq!(t["encoder"], "clip_tiny");
    // The files the tokenizer read: tokenizer.json, then tokenizer_config.json.
    let mut bytes = std::fs::read(clip_dir().join("tokenizer.json")).unwrap();
    bytes.extend(std::fs::read(clip_dir().join("tokenizer_config.json")).unwrap());
    assert_eq!(t["tokenizer_sha256"], reg::formats::weights::sha256_hex(&bytes));

    // Stored states against the text tower run here on the same ids: bf16 storage rounds
    // to 2^-9 relative, so 1e-2 of the largest value holds with room and fails on any
    // wrong row, token or layer.
    let model = Clip::load(&clip_dir(), Device::Cpu, Towers::Text).unwrap();
    let s = &shards(&out)[0];
    let enc = model.encode_text(&s["caption_ids"].to_kind(Kind::Int64), Kind::Float).unwrap();
    assert_eq!(s["caption_hidden"].kind(), Kind::BFloat16);
    assert_rel("caption_hidden", &s["caption_hidden"].to_kind(Kind::Float), &enc.last_hidden_state, 1e-2);
    assert_rel("caption_pooled", &s["caption_pooled"].to_kind(Kind::Float), &enc.pooled, 1e-2);

    // The null condition: the empty caption, in f32 (computed the same way here, so
    // only the order of float operations could differ).
    let ds = Dataset::open(&out, true).unwrap();
    let (hidden, pooled) = ds.null_caption().unwrap().expect("precomputed dataset");
    let null = model.encode_text(&tk.batch(&[""]).unwrap(), Kind::Float).unwrap();
    assert_rel("null hidden", &hidden, &null.last_hidden_state, 1e-6);
    assert_rel("null pooled", &pooled, &null.pooled, 1e-6);

    // The loader delivers the precomputed rows of the captions it picks.
    let perm = permutation(ds.len(), 3, 0);
    let b = assemble(&ds, &perm, 0, 0, 2, false, Key { seed: 3, step: 0 }).unwrap();
    let ids = b.captions.expect("captioned dataset");
    let (h, p) = b.text.expect("precomputed");
    assert_eq!((ids.size(), h.size(), p.size()), (vec![2, 77], vec![2, 77, 32], vec![2, 32]));
    let again = model.encode_text(&ids, Kind::Float).unwrap();
    assert_rel("loaded hidden", &h.to_kind(Kind::Float), &again.last_hidden_state, 1e-2);
}

/// Writes `name.txt` beside `image` with `text`.
fn sidecar(image: &Path, text: &str) {
    std::fs::write(image.with_extension("txt"), text).unwrap();
}

#[test]
fn sidecar_captions_flat_and_class_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let clip = clip_dir().display().to_string();
    let tk = ClipTokenizer::load(&clip_dir()).unwrap();
    let pad = |caps: &[&str]| caps.iter().map(|c| tk.encode_padded(c).unwrap()).collect::<Vec<_>>();

    // Class tree: labels are the class folders' indices; several lines are several
    // captions; blank lines and surrounding spaces are dropped.
    let tree = tmp.path().join("tree");
    demo_images(&tree, 2, 3);
    let mut want = Vec::new();
    for c in 0..2 {
        for k in 0..3 {
            let caps: Vec<String> = (0..=k).map(|j| format!("a pattern of class {c}, picture {k}, caption {j}")).collect();
            sidecar(&tree.join(format!("class{c:02}/img{k:04}.png")), &format!("\n  {}  \r\n\n", caps.join("\n")));
            want.push(pad(&caps.iter().map(String::as_str).collect::<Vec<_>>()));
        }
    }
    let out = tmp.path().join("tree-out");
    ok(&mut prepare(&tree, &out, &["--caption-files", "--text-encoder", &clip]));
    let (got, labels) = stored_captions(&out);
    assert_eq!(got, want);
    assert_eq!(labels, vec![0, 0, 0, 1, 1, 1]);
    let ix = index(&out);
    assert_eq!(ix["class_names"], serde_json::json!(["class00", "class01"]));
    assert_eq!(ix["text"]["captions"], 12);
    assert_eq!(ix["text"]["precomputed"], false);
    assert!(!out.join("null_caption.safetensors").exists());
    assert!(!shards(&out)[0].contains_key("caption_hidden"));

    // Flat folder: one class, "image".
    let flat = tmp.path().join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    for k in 0..2 {
        std::fs::copy(tree.join(format!("class00/img{k:04}.png")), flat.join(format!("photo{k}.png"))).unwrap();
    }
    sidecar(&flat.join("photo0.png"), "a red square");
    sidecar(&flat.join("photo1.png"), "a blue circle\nA BLUE CIRCLE, AGAIN!");
    let out = tmp.path().join("flat-out");
    ok(&mut prepare(&flat, &out, &["--caption-files", "--text-encoder", &clip]));
    let (got, labels) = stored_captions(&out);
    assert_eq!(got, vec![pad(&["a red square"]), pad(&["a blue circle", "A BLUE CIRCLE, AGAIN!"])]);
    assert_eq!(labels, vec![0, 0]);
    assert_eq!(index(&out)["class_names"], serde_json::json!(["image"]));
}

#[test]
fn caption_pick_is_the_same_for_any_rank_split_and_varies_with_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    demo_images(&tree, 2, 4);
    // Record k of a class has k + 1 captions (1 to 4), spread over two shards of 4.
    for c in 0..2 {
        for k in 0..4 {
            let caps: Vec<String> = (0..=k).map(|j| format!("class {c} image {k} caption {j}")).collect();
            sidecar(&tree.join(format!("class{c:02}/img{k:04}.png")), &caps.join("\n"));
        }
    }
    let out = tmp.path().join("out");
    ok(&mut prepare(&tree, &out, &["--caption-files", "--text-encoder", &clip_dir().display().to_string(), "--text-precomputed"]));
    let ds = Dataset::open(&out, true).unwrap();
    let (stored, _) = stored_captions(&out);
    let n = ds.len();
    assert_eq!(n, 8);
    let seed = 11;
    let mut seen: Vec<std::collections::HashSet<Vec<i64>>> = vec![Default::default(); n as usize];
    for step in 0..24u64 {
        let perm = permutation(n, seed, step as i64);
        let key = Key { seed, step };
        let whole = assemble(&ds, &perm, 0, 0, n, false, key).unwrap();
        // Two ranks: rows [0, 3) and [3, 8) of the same global batch.
        let a = assemble(&ds, &perm, 0, 0, 3, false, key).unwrap();
        let b = assemble(&ds, &perm, 0, 3, n - 3, false, key).unwrap();
        let ids = whole.captions.as_ref().unwrap();
        assert!(ids.equal(&Tensor::cat(&[a.captions.unwrap(), b.captions.unwrap()], 0)), "step {step}: ids differ across splits");
        let (h, p) = whole.text.as_ref().unwrap();
        let ((ha, pa), (hb, pb)) = (a.text.unwrap(), b.text.unwrap());
        assert!(h.equal(&Tensor::cat(&[ha, hb], 0)) && p.equal(&Tensor::cat(&[pa, pb], 0)), "step {step}: states differ");
        for (r, &rec) in perm[..n as usize].iter().enumerate() {
            let row = Vec::<i64>::try_from(ids.get(r as i64)).unwrap();
            let caps = &stored[rec as usize];
            // The row is the caption `caption_pick` names, among the record's own.
            let j = caption_pick(seed, step, r as u64, caps.len() as u64) as usize;
            assert_eq!(row, caps[j], "step {step} row {r}");
            seen[rec as usize].insert(row);
        }
    }
    // Over 24 steps a record with 4 captions is read with more than one of them
    // (the chance that one caption is drawn 24 times running is 4^-23).
    for (rec, caps) in stored.iter().enumerate() {
        if caps.len() == 4 {
            assert!(seen[rec].len() > 1, "record {rec}: always the same caption");
        }
    }
}

#[test]
fn bad_caption_files_exit_2_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let images = coco_images(tmp.path());
    let clip = clip_dir().display().to_string();
    let out = tmp.path().join("out");
    let json = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let images_list = r#""images": [{"id": 331352, "file_name": "COCO_val2014_000000331352.jpg"}]"#;
    for (name, text, needles) in [
        (
            "unknown.json",
            format!(
                r#"{{{images_list}, "annotations": [{{"image_id": 331352, "id": 1, "caption": "a"}}, {{"image_id": 7, "id": 2, "caption": "b"}}]}}"#
            ),
            vec!["unknown.json", "annotations[1].image_id", "7"],
        ),
        (
            "missing.json",
            format!(r#"{{{images_list}, "annotations": [{{"image_id": 331352, "id": 1}}]}}"#),
            vec!["missing.json", "annotations[0].caption: missing"],
        ),
        (
            "number.json",
            format!(r#"{{{images_list}, "annotations": [{{"image_id": 331352, "id": 1, "caption": 5}}]}}"#),
            vec!["number.json", "annotations[0].caption", "not a string"],
        ),
        ("malformed.json", format!(r#"{{{images_list}, "annotations": [{{"image_id": 331352,"#), vec!["malformed.json", "not valid JSON"]),
        (
            "escape.json",
            r#"{"images": [{"id": 1, "file_name": "../x.jpg"}], "annotations": []}"#.to_string(),
            vec!["escape.json", "images[0].file_name"],
        ),
    ] {
        let f = json(name, &text);
        assert_bad_input(&prepare(&images, &out, &["--captions", &f, "--text-encoder", &clip]).output().unwrap(), &needles);
    }
    // Captions need a tokenizer.
    assert_bad_input(
        &prepare(&images, &out, &["--captions", &coco_excerpt().display().to_string()]).output().unwrap(),
        &["--text-encoder"],
    );

    let flat = tmp.path().join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    std::fs::copy(images.join("COCO_val2014_000000331352.jpg"), flat.join("a.png")).unwrap();
    std::fs::copy(images.join("COCO_val2014_000000289393.jpg"), flat.join("b.png")).unwrap();
    sidecar(&flat.join("a.png"), "a caption");
    let run = || prepare(&flat, &out, &["--caption-files", "--text-encoder", &clip]).output().unwrap();
    assert_bad_input(&run(), &["b.txt", "missing"]);
    sidecar(&flat.join("b.png"), " \n\n  \n");
    assert_bad_input(&run(), &["b.txt", "empty"]);
    std::fs::write(flat.join("b.txt"), b"caf\xe9\n").unwrap();
    assert_bad_input(&run(), &["b.txt", "UTF-8"]);
    assert!(!out.join("index.json").exists());
}

#[test]
fn index_text_and_caption_tensors_are_checked_with_one_line_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let flat = tmp.path().join("flat");
    demo_images(&tmp.path().join("demo"), 1, 2);
    std::fs::create_dir_all(&flat).unwrap();
    for k in 0..2 {
        let img = flat.join(format!("p{k}.png"));
        std::fs::copy(tmp.path().join(format!("demo/class00/img{k:04}.png")), &img).unwrap();
        sidecar(&img, "one\ntwo");
    }
    let out = tmp.path().join("out");
    ok(&mut prepare(&flat, &out, &["--caption-files", "--text-encoder", &clip_dir().display().to_string()]));
    let good = std::fs::read_to_string(out.join("index.json")).unwrap();
    let open_err = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut ix: serde_json::Value = serde_json::from_str(&good).unwrap();
        edit(&mut ix);
        std::fs::write(out.join("index.json"), serde_json::to_string(&ix).unwrap()).unwrap();
        let e = Dataset::open(&out, true).err().expect("must be refused");
        assert!(reg::error::is_input_error(&e), "{e:#}");
        let msg = format!("{e:#}");
        assert_eq!(msg.lines().count(), 1, "{msg}");
        msg
    };
    let m = open_err(&|ix| ix["text"]["captions"] = 5.into());
    assert!(m.contains("index.json") && m.contains("text.captions"), "{m}");
    let m = open_err(&|ix| ix["text"]["max_length"] = 70.into());
    assert!(m.contains("shard-00000.safetensors") && m.contains("caption_ids"), "{m}");
    let m = open_err(&|ix| ix["text"]["precomputed"] = true.into());
    assert!(m.contains("shard-00000.safetensors") && m.contains("caption_hidden: missing"), "{m}");
    let m = open_err(&|ix| ix["shards"][0].as_object_mut().unwrap().remove("captions").map(|_| ()).unwrap());
    assert!(m.contains("shards[0].captions: missing"), "{m}");

    // A shard whose offsets give a record no caption (rewritten, with its checksum): the
    // loader names the shard and the field.
    let shard = out.join("shard-00000.safetensors");
    let mut tensors = reg::formats::weights::read(&shard).unwrap();
    for (name, t) in tensors.iter_mut() {
        if name == "caption_offsets" {
            *t = Tensor::from_slice(&[0i64, 2, 2]);
        }
    }
    reg::formats::weights::write(&shard, &tensors, None).unwrap();
    let mut ix: serde_json::Value = serde_json::from_str(&good).unwrap();
    ix["shards"][0]["sha256"] = reg::formats::weights::sha256_hex(&std::fs::read(&shard).unwrap()).into();
    std::fs::write(out.join("index.json"), serde_json::to_string(&ix).unwrap()).unwrap();
    let ds = Dataset::open(&out, true).unwrap();
    let perm: Vec<i64> = vec![0, 1];
    let e = assemble(&ds, &perm, 0, 0, 2, false, Key { seed: 0, step: 0 }).err().expect("an empty caption range");
    let msg = format!("{e:#}");
    assert!(reg::error::is_input_error(&e) && msg.lines().count() == 1, "{msg}");
    assert!(msg.contains("shard-00000.safetensors") && msg.contains("caption_offsets[1..=2]"), "{msg}");
}
