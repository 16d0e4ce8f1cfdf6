"""The Python API against the CLI: bit-identical maps, masks, summaries and scores."""
import json
import subprocess

import numpy as np
import pytest
from PIL import Image

import clipmask
from conftest import BIN, MODEL, generate_args, image_path, read_mask, run_bin


def test_maps_and_masks_are_the_npz_and_png_of_generate(gen, voc, ids, labels, binary_out):
    lo, hi = 1.0, 0.0
    for i in ids:
        r = gen(image_path(voc, i), labels[i])
        z = np.load(binary_out / "cams" / f"{i}.npz")
        assert r.keys.dtype == np.int64 and r.cams.dtype == np.float32 and r.raw_cams.dtype == np.float32
        assert np.array_equal(r.keys, z["keys"])
        assert np.array_equal(r.cams, z["cams"]), i
        assert np.array_equal(r.raw_cams, z["raw_cams"]), i
        assert r.class_names == list(z["class_names"])
        mask = r.labels()
        assert mask.dtype == np.uint8 and mask.shape == r.cams.shape[1:]
        assert np.array_equal(mask, read_mask(binary_out / "masks" / f"{i}.png")), i
        lo, hi = min(lo, float(r.probs.min())), max(hi, float(r.probs.max()))
    # Well-conditioned fixture (logit scale 10): the label probabilities the maps came from.
    print(f"label probabilities covered: {lo:.3g} .. {hi:.3g}")
    assert hi > 1e-3


def test_pil_and_array_inputs_equal_the_path(gen, voc, ids, labels):
    i = ids[0]
    ref = gen(image_path(voc, i), labels[i])
    with Image.open(image_path(voc, i)) as im:
        from_pil = gen(im, labels[i])
        arr = np.asarray(im.convert("RGB"))
    from_arr = gen(arr, labels[i])
    for r in (from_pil, from_arr):
        assert np.array_equal(r.cams, ref.cams) and np.array_equal(r.raw_cams, ref.raw_cams)
    # Class indices are accepted as well as names.
    names = gen.config.class_names
    by_index = gen(arr, [names.index(n) for n in labels[i]])
    assert np.array_equal(by_index.cams, ref.cams)


def test_batch_form_equals_one_at_a_time(gen, voc, ids, labels):
    paths = [image_path(voc, i) for i in ids]
    batch = gen(paths, [labels[i] for i in ids], batch_size=4)
    assert len(batch) == len(ids)
    for i, r in zip(ids, batch):
        one = gen(image_path(voc, i), labels[i])
        assert np.array_equal(r.cams, one.cams) and np.array_equal(r.raw_cams, one.raw_cams)


def test_run_writes_the_files_generate_writes_and_resumes(gen, voc, ids, work, binary_out, tmp_path):
    out = tmp_path / "out"
    s = gen.run(voc / "JPEGImages", work / "labels.json", out, split=work / "split.txt", save_cams=True)
    assert s["schema"] == 1 and s["done"] == len(ids) and s["failed"] == 0
    for i in ids:
        assert (out / "masks" / f"{i}.png").read_bytes() == (binary_out / "masks" / f"{i}.png").read_bytes()
        a, b = np.load(out / "cams" / f"{i}.npz"), np.load(binary_out / "cams" / f"{i}.npz")
        assert np.array_equal(a["cams"], b["cams"])
    again = gen.run(voc / "JPEGImages", work / "labels.json", out, split=work / "split.txt", save_cams=True)
    assert again["skipped"] == len(ids) and again["done"] == 0
    # Labels as a dict, and a failure report for an unknown class.
    bad = {ids[0]: ["dog"], ids[1]: ["no-such-class"]}
    s = gen.run(voc / "JPEGImages", bad, tmp_path / "out2")
    assert s["done"] == 1 and s["failed"] == 1
    fail = [json.loads(l) for l in (tmp_path / "out2" / "failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in fail] == [ids[1]]
    with pytest.raises(RuntimeError, match="failures.jsonl"):
        gen.run(voc / "JPEGImages", bad, tmp_path / "out3", allow_failures=False)


def test_crf_labels_are_the_masks_of_generate_crf(gen, voc, ids, labels, binary_crf_out):
    for i in ids[:2]:
        r = gen(image_path(voc, i), labels[i])
        mask, conf = r.crf_labels()
        assert np.array_equal(mask, read_mask(binary_crf_out / "masks" / f"{i}.png")), i
        assert conf.dtype == np.float32 and conf.shape == mask.shape
        assert np.all((mask == 255) == (conf < 0.95))


def test_crf_function_agrees_with_pydensecrf(voc, ids):
    import pydensecrf.densecrf as pdcrf
    from pydensecrf.utils import unary_from_softmax

    img = np.asarray(Image.open(image_path(voc, ids[0])).convert("RGB"))
    h, w = img.shape[:2]
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, h // 8 + 1, w // 8 + 1)).astype(np.float32)
    # Smooth probabilities: upsampled blocks, softmax over 3 labels.
    logits = np.repeat(np.repeat(logits, 8, 1), 8, 2)[:, :h, :w] * 2
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    labels, conf = clipmask.crf(img, probs.astype(np.float32), image_mode="rgb")
    # CLIP-ES's own call (eval_cam_with_crf.py) on the plain photo.
    d = pdcrf.DenseCRF2D(w, h, 3)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(np.copy(img)), compat=4)
    q = np.array(d.inference(10)).reshape(3, h, w)
    ref = q.argmax(0).astype(np.uint8)
    ref[q.max(0) < 0.95] = 255
    agree = float((labels == ref).mean())
    print(f"labels agree with pydensecrf on {agree:.5%}; confidence max diff {np.abs(conf - q.max(0)).max():.2e}")
    assert agree >= 0.999
    assert np.abs(conf - q.max(0)).max() < 1e-3


def test_evaluate_is_eval_json(binary_out, voc, work):
    got = clipmask.evaluate(binary_out / "masks", voc / "SegmentationClass", "voc12", split=work / "split.txt")
    r = run_bin("eval", "--pred", binary_out / "masks", "--gt", voc / "SegmentationClass", "--split",
                work / "split.txt", "--json")
    assert got == json.loads(r.stdout)
    assert got["schema"] == 1 and 0.0 <= got["miou"] <= 1.0


def test_classify_is_classify_json(model, voc, ids):
    paths = [image_path(voc, i) for i in ids[:2]]
    probs = clipmask.classify(model, "voc12", paths)
    r = run_bin("classify", "--model", MODEL, "--device", "cpu", "--json", *paths)
    names = clipmask.Config("voc12").class_names
    for row, line in zip(probs, r.stdout.splitlines()):
        ref = json.loads(line)["probs"]
        assert np.array_equal(row, np.array([ref[n] for n in names], dtype=np.float32))
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_tag_is_tag(model, voc, ids, work, tmp_path):
    got = clipmask.tag(model, "voc12", [image_path(voc, i) for i in ids[:2]])
    out = tmp_path / "labels.json"
    run_bin("tag", "--model", MODEL, "--device", "cpu", "--images", voc / "JPEGImages", "--split",
            work / "split.txt", "--out", out)
    ref = json.loads(out.read_text())
    for i, g in zip(ids[:2], got):
        assert g["labels"] == ref[i]


def test_readme_python_example_runs_as_written(tmp_path, voc, ids, labels, monkeypatch):
    """The README's Python API example, extracted from README.md, with the test model and the
    sample photos in place of ViT-B/16 and VOC2012."""
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'clipmask.Model("ViT-B/16")' in code and 'Path("VOC2012/JPEGImages")' in code
    code = code.replace('"ViT-B/16"', repr(MODEL) + ', device="cpu"').replace(
        '"VOC2012/JPEGImages"', repr(str(voc / "JPEGImages")))
    (tmp_path / "labels.json").write_text(json.dumps({i: labels[i] for i in ids[:2]}))
    monkeypatch.chdir(tmp_path)
    import matplotlib

    matplotlib.use("Agg")
    exec(compile(code, "README.md", "exec"), {})
    for i in ids[:2]:
        assert read_mask(tmp_path / "pseudo_masks" / f"{i}.png").shape == np.asarray(Image.open(image_path(voc, i))).shape[:2]
    assert (tmp_path / "overlay.png").stat().st_size > 0
