//! A miniature of the study (`launch/study.sh`): two arms, a few steps, end to end through
//! the real binary; it writes its CSV, its plot and its table, and resumes without
//! redoing finished work.

mod common;

use common::{bin, ok, repo};

fn study(out: &std::path::Path) -> std::process::Output {
    ok(bin()
        .current_dir(repo())
        .args(["study", "--out"])
        .arg(out)
        .args(["--seeds", "1", "--steps", "4", "--every", "2", "--per-class", "8", "--eval-num", "5", "--sample-steps", "2"])
        .args(["--methods", "sit,reg", "--conditions", "caption", "--encoder-steps", "3", "--threads", "1"]))
}

#[test]
fn a_miniature_study_writes_its_csv_plot_and_table() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("study");
    let o = study(&out);
    let mut csv = csv::Reader::from_path(out.join("study.csv")).unwrap();
    let rows: Vec<reg::shapes::curves::Point> = csv.deserialize().map(|r| r.unwrap()).collect();
    // 2 arms x 1 seed x evaluations at steps 2 and 4.
    assert_eq!(rows.len(), 4, "{rows:?}");
    let arms: std::collections::BTreeSet<(String, String)> = rows.iter().map(|r| (r.condition.clone(), r.method.clone())).collect();
    assert_eq!(arms.len(), 2);
    for r in &rows {
        assert!((0.0..=1.0).contains(&r.accuracy) && (0.0..=1.0).contains(&r.distance), "{r:?}");
        assert!([2, 4].contains(&r.step));
    }
    let png = image::open(out.join("study.png")).unwrap();
    assert!(png.width() >= 500 && png.height() >= 400);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("| caption | SiT + REG | 1 |") && table.contains("| caption | SiT | 1 |"), "{table}");
    assert!(out.join("grids/caption-reg.png").exists());
    // A second run finds everything done: same points, no new checkpoints or samples.
    let before = std::fs::metadata(out.join("runs/caption-reg-s0/step-0000004/manifest.json")).unwrap().modified().unwrap();
    study(&out);
    let again: Vec<reg::shapes::curves::Point> =
        csv::Reader::from_path(out.join("study.csv")).unwrap().deserialize().map(|r| r.unwrap()).collect();
    assert_eq!(again, rows);
    let after = std::fs::metadata(out.join("runs/caption-reg-s0/step-0000004/manifest.json")).unwrap().modified().unwrap();
    assert_eq!(before, after, "a finished run was trained again");
}
