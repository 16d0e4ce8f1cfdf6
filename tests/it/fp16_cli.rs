//! `--precision fp16` on the CPU: every subcommand that runs the model (classify, generate,
//! generate --crf, prompts rank) runs in fp16 without a dtype error and writes finite maps.
use crate::support::*;
use std::process::Command;

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn clipmask");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "exit {:?}\n{}\n{stderr}", out.status.code(), String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stdout).into_owned() + &stderr
}

#[test]
fn every_model_command_runs_in_fp16_on_cpu() {
    let model = tiny_model();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for (i, (w, h)) in [(180u32, 140u32), (120, 200), (160, 160)].into_iter().enumerate() {
        synthetic_image(w, h, 40 + i as u64).save(images.join(format!("im{i}.png"))).unwrap();
    }
    let labels = tmp.path().join("labels.json");
    std::fs::write(&labels, r#"{"im0": ["dog", "person"], "im1": ["cat"], "im2": ["car", "bus", "person"]}"#).unwrap();
    let common = |c: &mut Command| {
        c.args(["--device", "cpu", "--precision", "fp16", "--model"]).arg(&model);
    };

    let mut c = clipmask(&cache);
    c.args(["classify", "--json"]);
    common(&mut c);
    c.arg(images.join("im0.png"));
    let out = ok(&mut c);
    let line = out.lines().find(|l| l.starts_with('{')).expect("a JSON line");
    crate::json_schemas::assert_valid("classify", line);
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let probs: Vec<f64> = v["probs"].as_object().unwrap().values().map(|p| p.as_f64().unwrap()).collect();
    assert_eq!(probs.len(), 20);
    assert!(probs.iter().all(|p| p.is_finite()) && (probs.iter().sum::<f64>() - 1.0).abs() < 1e-2, "{probs:?}");

    for crf in [false, true] {
        let out_dir = tmp.path().join(if crf { "out-crf" } else { "out" });
        let mut c = clipmask(&cache);
        c.args(["generate", "--save-cams", "--images"])
            .arg(&images)
            .arg("--labels")
            .arg(&labels)
            .arg("--out")
            .arg(&out_dir);
        common(&mut c);
        if crf {
            c.arg("--crf");
        }
        ok(&mut c);
        for id in ["im0", "im1", "im2"] {
            assert!(out_dir.join("masks").join(format!("{id}.png")).is_file());
            let a = clipmask::outputs::CamArchive::read(&out_dir.join("cams").join(format!("{id}.npz"))).unwrap();
            assert!(a.cams.iter().chain(a.raw_cams.iter()).all(|v| v.is_finite()), "{id}: non-finite fp16 maps");
            // Min-max normalised maps lie in [0, 1]. (A map can be all zero: when the weighted
            // sum is negative everywhere, the ReLU leaves nothing, as in the original.)
            assert!(
                a.cams.iter().chain(a.raw_cams.iter()).all(|v| (0.0..=1.0).contains(v)),
                "{id}: maps outside [0, 1]"
            );
        }
    }

    let templates = tmp.path().join("templates.txt");
    std::fs::write(&templates, "a photo of a {}.\na clean origami {}.\n").unwrap();
    let mut c = clipmask(&cache);
    c.args(["prompts", "rank", "--json", "--images"])
        .arg(&images)
        .arg("--labels")
        .arg(&labels)
        .arg("--templates")
        .arg(&templates);
    common(&mut c);
    let out = ok(&mut c);
    let json_start = out.find('{').expect("a JSON object");
    let ranked: serde_json::Value =
        serde_json::Deserializer::from_str(&out[json_start..]).into_iter().next().unwrap().unwrap();
    crate::json_schemas::assert_valid("prompts-rank", &ranked.to_string());
    let ranked = ranked["templates"].as_array().unwrap();
    assert_eq!(ranked.len(), 2);
    assert!(ranked.iter().all(|r| r["sharpness"].as_f64().is_some_and(f64::is_finite)), "{ranked:?}");
}
