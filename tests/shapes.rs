//! The pixel-space path and the captioned shapes set: the identity autoencoder
//! round-trips images exactly through `prepare`, the set is deterministic with varied
//! captions and disjoint splits, and the analytic scorer reads real images right.

mod common;

use common::{bin, ok, ok_stdout};
use reg::encoders::decoder::Decoder;
use reg::formats::pillow_resample::center_crop_adm;
use reg::shapes::reader::{accuracy, attribute_accuracy, distance, read, Accuracy};
use reg::shapes::{self, Attribute, Attributes, SetSpec, Split, Value, Wanted};
use std::collections::HashSet;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn spec(split: Split, per_class: u32) -> SetSpec {
    SetSpec { size: 32, split, seed: 0, class_attribute: Attribute::Shape, per_class, captions_per_image: 4, fixed: Wanted::default() }
}

/// `prepare --vae SPEC` of `images` at 32 px, then the stored means decoded: they must be
/// the ADM crops of the files, byte for byte.
fn round_trip(images: &Path, out: &Path, vae: &str, latent_shape: [i64; 3]) {
    ok(bin().args(["prepare", "--images"]).arg(images).arg("--out").arg(out).args([
        "--vae",
        vae,
        "--no-features",
        "--store-images",
        "--resolution",
        "32",
        "--shard-size",
        "1000",
        "--threads",
        "1",
    ]));
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["vae"], vae);
    assert_eq!(index["latent_shape"], serde_json::json!(latent_shape));
    let shard = reg::formats::weights::read_map(&out.join("shard-00000.safetensors")).unwrap();
    let (moments, stored) = (&shard["latents"], &shard["images"]);
    let c = latent_shape[0] / 2;
    assert_eq!(f64::try_from(moments.narrow(1, c, c).abs().max()).unwrap(), 0.0, "{vae}: std must be zero");
    let decoded = Decoder::load(vae, Device::Cpu).unwrap().decode(&moments.narrow(1, 0, c), Kind::Float);
    assert!(decoded.equal(stored), "{vae}: decoded means differ from the stored crops");
    // And the crops are those of the files (prepare lists classes and files sorted).
    let (_, entries) = reg::data::sources::list_image_tree(images).unwrap();
    for (i, e) in entries.iter().enumerate() {
        let img = center_crop_adm(&image::open(e.image.name()).unwrap().to_rgb8(), 32);
        let want = Tensor::from_slice(img.as_raw()).view([32, 32, 3]).permute([2, 0, 1]);
        assert!(decoded.get(i as i64).equal(&want), "{vae}: image {i}");
    }
}

#[test]
fn identity_autoencoder_round_trips_images_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    // The classic demo images are not square and larger than the crop: the ADM crop resizes them.
    let images = tmp.path().join("images");
    ok(bin().args(["demo-images", "--classes", "3", "--per-class", "3", "--out"]).arg(&images));
    round_trip(&images, &tmp.path().join("id1"), "identity", [6, 32, 32]);
    round_trip(&images, &tmp.path().join("id2"), "identity:2", [24, 16, 16]);
    // The captioned set at its own size (no resize).
    let shapes = tmp.path().join("shapes");
    ok(bin().args(["demo-images", "--captioned", "--per-class", "2", "--out"]).arg(&shapes));
    round_trip(&shapes, &tmp.path().join("id4"), "identity:4", [96, 8, 8]);
    // A factor that does not divide the resolution is bad input, not a crash.
    let o = bin()
        .args(["prepare", "--images"])
        .arg(&shapes)
        .arg("--out")
        .arg(tmp.path().join("bad"))
        .args(["--vae", "identity:3", "--no-features", "--store-images", "--resolution", "32"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
}

fn measure(size: u32, per_class: u32) -> Accuracy {
    let s = SetSpec { size, ..spec(Split::Heldout, per_class) };
    let items: Vec<_> = shapes::items(&s).collect();
    let images: Vec<_> = items.iter().map(|i| i.image.clone()).collect();
    let wanted: Vec<Wanted> = items.iter().map(|i| Wanted::from(&i.attributes)).collect();
    attribute_accuracy(&images, &wanted)
}

/// The bound: the scorer reads >= 98% of each attribute of real images right.
/// 500 held-out images (100 per shape; the other attributes drawn at random).
#[test]
fn scorer_reads_real_images_right() {
    for size in [32, 64] {
        let acc = measure(size, 100);
        eprintln!("scorer accuracy on 500 real {size}px images: {acc:?}");
        assert_eq!(acc.n, 500);
        for (name, a) in [("shape", acc.shape), ("colour", acc.colour), ("size", acc.size), ("position", acc.position)] {
            assert!(a.unwrap() >= 0.98, "{size}px {name}: {a:?}");
        }
        assert!(acc.all >= 0.98 && acc.readable == 1.0, "{size}px: {acc:?}");
    }
}

#[test]
fn scorer_metrics_see_wrong_and_collapsed_samples() {
    let items: Vec<_> = shapes::items(&spec(Split::Heldout, 20)).collect();
    let real: Vec<Attributes> = items.iter().map(|i| i.attributes).collect();
    let read_back: Vec<_> = items.iter().map(|i| read(&i.image)).collect();
    // Asked for the attributes of the next image: most are wrong.
    let shifted: Vec<Wanted> = real.iter().cycle().skip(1).take(real.len()).map(Wanted::from).collect();
    assert!(accuracy(&read_back, &shifted).all < 0.2);
    // Captions name fewer attributes: an image is right on what its caption says.
    let by_caption: Vec<Wanted> = items.iter().map(|i| i.captions[0].wanted(&i.attributes)).collect();
    assert!(by_caption.iter().any(|w| w.size.is_none()) && by_caption.iter().any(|w| w.position.is_none()));
    let acc = accuracy(&read_back, &by_caption);
    assert!(acc.all >= 0.98, "{acc:?}");
    // Diversity: the real images are near their own distribution (only the joint's
    // sampling noise of 100 images over 280 cells), a collapsed set is far.
    let other: Vec<Attributes> = shapes::items(&spec(Split::Train, 20)).map(|i| i.attributes).collect();
    let near = distance(&read_back, &other);
    let collapsed = distance(&vec![read_back[0]; read_back.len()], &other);
    assert!(near.shape < 0.05 && near.colour < 0.2 && near.position < 0.2, "{near:?}");
    assert!(collapsed.colour > 0.7 && collapsed.joint > near.joint, "{collapsed:?} vs {near:?}");
}

#[test]
fn set_is_deterministic_with_disjoint_splits() {
    let a: Vec<_> = shapes::items(&spec(Split::Train, 6)).collect();
    let b: Vec<_> = shapes::items(&spec(Split::Train, 6)).collect();
    assert!(a.iter().zip(&b).all(|(x, y)| x.image == y.image && x.captions == y.captions && x.attributes == y.attributes));
    // Pinned bytes: the same set on every machine (integer and IEEE +-*/sqrt arithmetic only).
    let all: Vec<u8> = a.iter().flat_map(|i| i.image.as_raw().clone()).collect();
    assert_eq!(
        reg::formats::weights::sha256_hex(&all),
        "cb8887d0ede5f7caae9d300aa08f7e4d440f4ec477aa44898fe056aa84054b07",
        "the set's pixels changed: if on purpose, update the pin"
    );
    let bytes = |s: Split| -> HashSet<Vec<u8>> { shapes::items(&spec(s, 60)).map(|i| i.image.into_raw()).collect() };
    let (train, held, enc) = (bytes(Split::Train), bytes(Split::Heldout), bytes(Split::Encoder));
    assert_eq!((train.len(), held.len(), enc.len()), (300, 300, 300), "images repeat within a split");
    assert!(train.is_disjoint(&held) && train.is_disjoint(&enc) && held.is_disjoint(&enc));
    // Another seed is another set.
    let other: HashSet<Vec<u8>> = shapes::items(&SetSpec { seed: 1, ..spec(Split::Train, 60) }).map(|i| i.image.into_raw()).collect();
    assert!(train.is_disjoint(&other));
}

#[test]
fn captions_are_varied_and_name_their_image() {
    let items: Vec<_> = shapes::items(&spec(Split::Train, 40)).collect();
    let mut texts = HashSet::new();
    let mut omitted = [0usize; 2];
    for it in &items {
        assert_eq!(it.captions.len(), 4);
        let own: HashSet<_> = it.captions.iter().map(|c| c.text.as_str()).collect();
        assert!(own.len() >= 3, "{:?}", it.captions);
        for c in &it.captions {
            assert!(!c.text.trim().is_empty() && !c.text.contains("  "), "{:?}", c.text);
            omitted[0] += !c.mentions.contains(&Attribute::Size) as usize;
            omitted[1] += !c.mentions.contains(&Attribute::Position) as usize;
            texts.insert(c.text.clone());
        }
    }
    // 800 captions of 200 images: nearly all distinct; size and position each left out
    // about 1 time in 4 (200 expected; bounds are > 5 sigma away).
    assert!(texts.len() > 600, "{}", texts.len());
    assert!(omitted.iter().all(|&n| (120..280).contains(&n)), "{omitted:?}");
}

#[test]
fn captioned_demo_images_write_a_class_tree_with_captions() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("set");
    ok(bin()
        .args(["demo-images", "--captioned", "--class-attribute", "colour", "--per-class", "3", "--split", "heldout", "--out"])
        .arg(&out));
    let (classes, entries) = reg::data::sources::list_image_tree(&out).unwrap();
    assert_eq!(classes, ["blue", "cyan", "green", "magenta", "red", "white", "yellow"]);
    assert_eq!(entries.len(), 21);
    let lines = std::fs::read_to_string(out.join("attributes.jsonl")).unwrap();
    let records: Vec<shapes::Record> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 21);
    for r in &records {
        assert_eq!(r.class, r.attributes.colour.name());
        let png = out.join(&r.file);
        let txt = std::fs::read_to_string(png.with_extension("txt")).unwrap();
        assert_eq!(txt.lines().collect::<Vec<_>>(), r.captions.iter().map(|c| c.text.as_str()).collect::<Vec<_>>());
        assert_eq!(read(&image::open(&png).unwrap().to_rgb8()), Some(r.attributes), "{}", r.file);
    }
    // The CLI scorer over the same images as an .npz: all right, no distance to itself.
    let npz = tmp.path().join("samples.npz");
    let mut z = reg::formats::npy::NpzWriter::create(&npz, &[21, 32, 32, 3]).unwrap();
    for r in &records {
        z.write(image::open(out.join(&r.file)).unwrap().to_rgb8().as_raw()).unwrap();
    }
    z.finish().unwrap();
    let line = ok_stdout(bin().args(["score-shapes", "--samples"]).arg(&npz).arg("--attributes").arg(out.join("attributes.jsonl")));
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["accuracy"]["all"], 1.0, "{v}");
    assert_eq!(v["distance"]["joint"], 0.0, "{v}");
    // --classes belongs to the other set.
    let o = bin().args(["demo-images", "--captioned", "--classes", "3", "--out"]).arg(tmp.path().join("x")).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}

/// `--fix`: every image has the fixed values, the free attributes are the ones the same
/// keys draw without it, and the class attribute cannot be fixed.
#[test]
fn fixed_attributes_hold_and_leave_the_rest_as_drawn() {
    let fixed = Wanted::parse("colour=white, size=large").unwrap();
    let free: Vec<Attributes> = shapes::items(&spec(Split::Train, 40)).map(|i| i.attributes).collect();
    let held: Vec<Attributes> = shapes::items(&SetSpec { fixed, ..spec(Split::Train, 40) }).map(|i| i.attributes).collect();
    for (f, h) in free.iter().zip(&held) {
        assert_eq!((h.colour, h.size), (shapes::Colour::White, shapes::Size::Large));
        assert_eq!((h.shape, h.position), (f.shape, f.position));
    }
    assert!(Wanted::parse("colour=mauve").unwrap_err().contains("not a colour"));
    assert!(Wanted::parse("hue=red").unwrap_err().contains("no attribute"));
    let dir = tempfile::tempdir().unwrap();
    let shape = SetSpec { fixed: Wanted::parse("shape=disc").unwrap(), ..spec(Split::Train, 2) };
    assert!(format!("{:#}", shapes::write_set(dir.path(), &shape).unwrap_err()).contains("cannot be fixed"));
}
