//! Errors that say what to do next: each message names its fix (issue 25, point 4).
use crate::support::*;

#[test]
fn an_offline_released_name_says_to_pass_a_local_file_or_a_cached_hub_repo() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let hf_home = tmp.path().join("hf");
    let img = save_png(tmp.path(), "img", 64, 48, 1);
    // A port nobody listens on: the download fails as it does offline.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let r = run(clipmask(&cache)
        .env("CLIPMASK_MODEL_BASE_URL", format!("http://127.0.0.1:{closed}"))
        .env("HF_HOME", &hf_home)
        .env_remove("HF_HUB_CACHE")
        .args(["classify", "--device", "cpu", "--model", "ViT-B/16"])
        .arg(&img));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("ViT-B/16"), "{line}");
    // Where it looked, and the two ways around the network.
    assert!(line.contains(&format!("not in the cache {}", cache.display())), "names the cache: {line}");
    assert!(line.contains("local checkpoint file"), "{line}");
    assert!(line.contains(".pt") && line.contains(".safetensors") && line.contains(".bin"), "{line}");
    assert!(line.contains("Hugging Face repo id"), "{line}");
    assert!(line.contains(&hf_home.join("hub").display().to_string()), "names the HF cache: {line}");
    assert!(line.contains("openai/clip-vit-base-patch16"), "the matching repo id: {line}");
    assert!(files_under(&cache).is_empty(), "{:?}", files_under(&cache));
}

#[test]
fn eval_without_anything_to_score_lists_the_three_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let r = run(clipmask(&shared_cache()).args(["eval", "--gt"]).arg(tmp.path()));
    assert_eq!(r.code, Some(2), "{}", r.show());
    for flag in ["--pred", "--cams", "--labels-pred"] {
        assert!(r.stderr.contains(flag), "{flag} not offered:\n{}", r.stderr);
    }
    // Each of them satisfies the parser on its own (what fails next is the missing directory).
    for flag in ["--cams", "--labels-pred"] {
        let r = run(clipmask(&shared_cache())
            .args(["eval", flag])
            .arg(tmp.path().join("nothing"))
            .arg("--gt")
            .arg(tmp.path()));
        assert!(!r.stderr.contains("required"), "{flag} alone is enough:\n{}", r.show());
    }
}

#[test]
fn generate_without_labels_mentions_labels_auto() {
    let tmp = tempfile::tempdir().unwrap();
    let (imgs, _) = one_image_dataset(tmp.path(), 3);
    let r = run(&mut generate_cmd(&shared_cache(), &imgs, &tmp.path().join("out")));
    let line = assert_one_line_error(&r, 2);
    for flag in ["--labels FILE", "--annotations", "--coco", "--labels auto"] {
        assert!(line.contains(flag), "{flag} not offered: {line}");
    }
}

#[test]
fn model_help_lists_hub_repo_ids_and_bin_files() {
    for cmd in ["generate", "classify", "tag"] {
        let r = run(clipmask(&shared_cache()).args([cmd, "--help"]));
        assert_eq!(r.code, Some(0), "{}", r.show());
        // The --model entry, up to the next flag.
        let help =
            r.stdout.split("--model <MODEL>").nth(1).unwrap_or_else(|| panic!("{cmd}: no --model:\n{}", r.stdout));
        let entry = help.split("\n  -").next().unwrap_or("");
        let entry = entry.split_whitespace().collect::<Vec<_>>().join(" ");
        for word in [".pt", ".safetensors", ".bin", "org/name", "openai/clip-vit-base-patch16", "ViT-B/16"] {
            assert!(entry.contains(word), "{cmd} --model help lacks {word:?}: {entry}");
        }
    }
}

#[test]
fn class_names_equal_but_for_case_or_spaces_are_a_config_error_naming_both() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("configs/voc12.json")).unwrap()).unwrap();
    assert!(cfg["classes"].as_array().unwrap().iter().any(|c| c["name"] == "dog"));
    for (variant, what) in [("Dog", "case"), (" dog ", "spaces"), ("DOG ", "both")] {
        let mut c = cfg.clone();
        c["classes"][0]["name"] = serde_json::json!(variant);
        let path = tmp.path().join(format!("{what}.json"));
        std::fs::write(&path, c.to_string()).unwrap();
        let r = run(clipmask(&shared_cache()).args(["prompts", "show", "--config"]).arg(&path));
        let line = assert_one_line_error(&r, 2);
        assert!(line.contains(&format!("{variant:?}")) && line.contains("\"dog\""), "{what}: names both: {line}");
        assert!(line.contains("rename"), "{what}: says what to do: {line}");
    }
    // The shipped configs hold no such pair.
    for shipped in ["voc12", "coco14"] {
        let r = run(clipmask(&shared_cache()).args(["prompts", "show", "--config", shipped]));
        assert_eq!(r.code, Some(0), "{shipped}: {}", r.show());
    }
}
