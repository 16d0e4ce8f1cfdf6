"""clipmask: pixel pseudo-masks from image-level labels with a frozen CLIP ViT (CLIP-ES, CVPR 2023).

The same library as the ``clipmask`` command, in-process, returning numpy arrays that are
bit-identical to the files ``clipmask generate`` writes::

    import clipmask
    model = clipmask.Model("ViT-B/16")            # or a local .pt/.safetensors/.bin, or an HF repo id
    gen = clipmask.Generator(model, "voc12")
    r = gen("photo.jpg", ["dog", "person"])
    r.cams        # float32 (K, H, W): the CAA-refined maps (npz ``cams``)
    r.labels()    # uint8 (H, W): the mask ``generate`` writes (0 background, class index + 1)

``gen.run(...)`` is the batch job (files, resume, failure report); :func:`evaluate`,
:func:`classify`, :func:`tag` and :func:`crf` are the other commands; :mod:`clipmask.densecrf`
is a drop-in for pydensecrf.

Errors are Python exceptions carrying the command's one-line messages: ``FileNotFoundError``
for a missing file, ``ValueError`` for bad input, ``RuntimeError`` otherwise. Long calls release
the GIL; Ctrl-C raises ``KeyboardInterrupt``.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "Model",
    "Config",
    "Generator",
    "Maps",
    "classify",
    "tag",
    "evaluate",
    "crf",
    "version",
]

_NATIVE = None


def _load_native():
    """The extension. It finds libtorch through its RUNPATH ($ORIGIN/../torch/lib, the installed
    torch package); if that fails (an unusual layout), importing torch first loads libtorch."""
    global _NATIVE
    if _NATIVE is None:
        try:
            from . import _native
        except ImportError:
            import torch  # noqa: F401  (loads libtorch and its libraries)
            from . import _native
        _NATIVE = _native
    return _NATIVE


_native = _load_native()

ImageLike = Union[str, "os.PathLike[str]", np.ndarray, Any]
"""A path, a PIL image, or an H x W x 3 uint8 RGB array."""


def version() -> str:
    """What ``clipmask --version`` prints: the version, the libtorch it uses, CUDA."""
    return _native.version_text()


def _image_arg(image: ImageLike):
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if hasattr(image, "convert") and hasattr(image, "size") and not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"an image array must be H x W x 3 uint8 RGB, got shape {image.shape} dtype {image.dtype}"
            )
        h, w = image.shape[:2]
        return (np.ascontiguousarray(image).tobytes(), int(h), int(w))
    raise ValueError(
        f"an image is a path, a PIL image or an H x W x 3 uint8 array, not {type(image).__name__}"
    )


class Model:
    """A CLIP ViT, loaded once.

    Args:
        name_or_path: a released name (``ViT-B/16``, ``ViT-B/32``, ``ViT-L/14``,
            ``ViT-L/14@336px``, downloaded once and verified), a Hugging Face repo id
            (``openai/clip-vit-base-patch16``), or a local ``.pt`` / ``.safetensors`` / ``.bin``
            file: what ``--model`` accepts.
        device: ``auto`` (the GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` (fp16 on CUDA, fp32 on CPU), ``fp32`` or ``fp16``.
    """

    def __init__(self, name_or_path: Union[str, "os.PathLike[str]"], device: str = "auto", precision: str = "auto"):
        self._m = _native.Model(os.fspath(name_or_path), device, precision)

    @property
    def name(self) -> str:
        return self._m.name

    @property
    def device(self) -> str:
        return self._m.device

    @property
    def precision(self) -> str:
        return self._m.precision

    def __repr__(self) -> str:
        return f"clipmask.Model({self.name!r}, device={self.device!r}, precision={self.precision!r})"


class Config:
    """A dataset config: a shipped name (``voc12``, ``coco14``), a JSON path, or a dict with the
    same keys as the JSON files in ``configs/``."""

    def __init__(self, spec: Union[str, "os.PathLike[str]", Dict[str, Any], "Config"] = "voc12"):
        if isinstance(spec, Config):
            self._c = spec._c
        elif isinstance(spec, dict):
            self._c = _native.Config.from_json(json.dumps(spec))
        elif isinstance(spec, (str, os.PathLike)):
            self._c = _native.Config.resolve(os.fspath(spec))
        else:
            raise ValueError(f"a config is a name, a path or a dict, not {type(spec).__name__}")

    @property
    def name(self) -> str:
        return self._c.name

    @property
    def class_names(self) -> List[str]:
        """Foreground classes in order; class index i is label value i + 1 in masks."""
        return list(self._c.class_names)

    @property
    def palette(self) -> np.ndarray:
        """(256, 3) uint8 colours of the label values (the palette PNGs use)."""
        return np.frombuffer(bytes(self._c.palette), dtype=np.uint8).reshape(-1, 3)

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(self._c.to_json())

    def __repr__(self) -> str:
        return f"clipmask.Config({self.name!r}, {len(self.class_names)} classes)"


class Maps:
    """One image's maps, as ``generate --save-cams`` writes them to ``cams/<id>.npz``.

    Attributes:
        keys: int64 (K,), 0-based class indices of the labels, in label order.
        cams: float32 (K, H, W), CAA-refined maps at the original resolution.
        raw_cams: float32 (K, H, W), the maps before CAA, resized the same way.
        probs: float32, the softmax over labels and background words (GradCAM).
        class_names: the names of ``keys``.
    """

    def __init__(self, gen: "Generator", d: Dict[str, Any], image: ImageLike):
        h, w = d["height"], d["width"]
        self.keys = np.frombuffer(d["keys"], dtype="<i8").astype(np.int64)
        k = len(self.keys)
        self.cams = np.frombuffer(d["cams"], dtype="<f4").reshape(k, h, w)
        self.raw_cams = np.frombuffer(d["raw_cams"], dtype="<f4").reshape(k, h, w)
        self.probs = np.frombuffer(d["probs"], dtype="<f4").copy()
        names = gen.config.class_names
        self.class_names = [names[i] for i in self.keys]
        self._gen = gen
        self._image = image

    @property
    def shape(self) -> Tuple[int, int]:
        return self.cams.shape[1], self.cams.shape[2]

    def labels(self, alpha: float = 1.0) -> np.ndarray:
        """The mask ``generate`` writes without ``--crf``: uint8 (H, W), 0 background, class
        index + 1 elsewhere; background = (1 - max_k cams_k) ** alpha (docs/method.md §6)."""
        h, w = self.shape
        k = len(self.keys)
        out = _native.label_map(np.ascontiguousarray(self.cams, dtype="<f4").tobytes(), (k, h, w), self.keys.tolist(), float(alpha))
        return np.frombuffer(out, dtype=np.uint8).reshape(h, w)

    def crf_labels(
        self, alpha: float = 1.0, confidence: float = 0.95, image_mode: str = "faithful", image: Optional[ImageLike] = None
    ) -> Tuple[np.ndarray, np.ndarray]:
        """The mask ``generate --crf`` writes and its confidence map: (uint8 (H, W) with 255
        where the largest marginal is below ``confidence``; float32 (H, W))."""
        src = self._image if image is None else image
        arg = _image_arg(src)
        if isinstance(arg, str):
            from PIL import Image

            with Image.open(arg) as im:
                arg = _image_arg(im)
        pixels, h, w = arg
        if (h, w) != self.shape:
            raise ValueError(f"the image is {h} x {w} but the maps are {self.shape[0]} x {self.shape[1]}")
        k = len(self.keys)
        labels, conf = self._gen._g.crf_labels(
            pixels, np.ascontiguousarray(self.cams, dtype="<f4").tobytes(), (k, h, w), self.keys.tolist(),
            float(alpha), image_mode, float(confidence),
        )
        return (
            np.frombuffer(labels, dtype=np.uint8).reshape(h, w),
            np.frombuffer(conf, dtype="<f4").reshape(h, w),
        )

    def __repr__(self) -> str:
        return f"clipmask.Maps({self.class_names}, {self.shape[0]}x{self.shape[1]})"


class Generator:
    """CLIP-ES maps for images with image-level labels (text features computed once).

    Args:
        model: a :class:`Model`.
        config: a :class:`Config`, or what :class:`Config` accepts.
        cam: the map source: ``gradcam`` (CLIP-ES) or a dense source (``maskclip``, ``sclip``,
            ``clearclip``, ``naclip``), as ``--cam``.
        scales: input scales for test-time augmentation (``--scales``).
        flip: also the mirrored image (``--flip``).
        box_threshold: CAA box threshold; the config's when None.
        max_side: cap on the longer side of the model input (``--max-side``).
    """

    def __init__(
        self,
        model: Model,
        config: Union[Config, str, Dict[str, Any]] = "voc12",
        cam: str = "gradcam",
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        box_threshold: Optional[float] = None,
        max_side: int = 1024,
    ):
        if not isinstance(model, Model):
            raise ValueError("model must be a clipmask.Model")
        self.model = model
        self.config = config if isinstance(config, Config) else Config(config)
        self.cam = cam
        self.scales = tuple(float(s) for s in scales)
        self.flip = bool(flip)
        self.box_threshold = box_threshold
        self.max_side = int(max_side)
        self._g = _native.Generator(
            model._m, self.config._c, cam, list(self.scales), self.flip, box_threshold, self.max_side
        )

    def _names(self, labels: Sequence[Union[str, int]]) -> List[str]:
        if isinstance(labels, (str, bytes)):
            raise ValueError("labels is a list of class names or indices, not one string")
        names = self.config.class_names
        out = []
        for lab in labels:
            if isinstance(lab, (int, np.integer)) and not isinstance(lab, bool):
                if not 0 <= int(lab) < len(names):
                    raise ValueError(f"class index {lab} outside 0..{len(names) - 1}")
                out.append(names[int(lab)])
            elif isinstance(lab, str):
                out.append(lab)
            else:
                raise ValueError(f"a label is a class name or a 0-based class index, not {lab!r}")
        return out

    def __call__(self, image, labels, batch_size: int = 1):
        """Maps of one image (``gen(image, ["dog"])`` -> :class:`Maps`), or of several
        (``gen([im1, im2], [["dog"], ["cat", "person"]])`` -> list of :class:`Maps`), batched
        by grid size with ``batch_size`` inputs per batch."""
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        label_lists = [labels] if single else list(labels)
        if len(images) != len(label_lists):
            raise ValueError(f"{len(images)} images but {len(label_lists)} label lists")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        args = [_image_arg(im) for im in images]
        names = [self._names(lab) for lab in label_lists]
        results = self._g.compute(args, names, batch_size)
        maps = [Maps(self, d, im) for d, im in zip(results, images)]
        return maps[0] if single else maps

    def run(
        self,
        images: Union[str, "os.PathLike[str]"],
        labels: Union[str, "os.PathLike[str]", Dict[str, Sequence[str]]],
        out: Union[str, "os.PathLike[str]"],
        *,
        crf: bool = False,
        save_cams: bool = False,
        overlays: bool = False,
        overwrite: bool = False,
        split: Optional[Union[str, "os.PathLike[str]"]] = None,
        alpha: float = 1.0,
        batch_size: int = 0,
        mask_format: str = "gray",
        allow_failures: bool = True,
        extra_args: Sequence[str] = (),
    ) -> Dict[str, Any]:
        """The batch job of ``clipmask generate`` with this generator's model and settings:
        the same files under ``out`` (masks/, cams/, overlays/, confidence/, failures.jsonl),
        resume (images whose outputs exist are skipped unless ``overwrite``) and failure
        report. A progress bar is drawn when stderr is a terminal.

        Args:
            images: the image folder (``--images``).
            labels: a labels file (JSON ``{id: [names]}`` or text), ``"auto"`` (TagCLIP), or a
                dict ``{id: [class names]}``.
            out: the output folder.
            extra_args: further ``generate`` flags, e.g. ``["--crf-image", "rgb"]``.

        Returns:
            The run's summary (``--summary-json``) as a dict. Failed images are counted in it
            (and listed in ``out/failures.jsonl``); with ``allow_failures=False`` any failure
            raises RuntimeError.
        """
        argv = ["--images", os.fspath(images), "--out", os.fspath(out), "--alpha", str(alpha),
                "--batch-size", str(int(batch_size)), "--mask-format", mask_format,
                "--cam", self.cam, "--max-side", str(self.max_side)]
        tmp = None
        if isinstance(labels, dict):
            tmp = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
            with tmp:
                json.dump({str(k): list(v) for k, v in labels.items()}, tmp)
            argv += ["--labels", tmp.name]
        else:
            argv += ["--labels", os.fspath(labels)]
        for flag, on in (("--crf", crf), ("--save-cams", save_cams), ("--overlays", overlays), ("--overwrite", overwrite)):
            if on:
                argv.append(flag)
        if split is not None:
            argv += ["--split", os.fspath(split)]
        argv += list(extra_args)
        try:
            text = self._g.run(argv)
        finally:
            if tmp is not None:
                os.unlink(tmp.name)
        if text is None:
            raise KeyboardInterrupt("stopped while tagging")
        summary = json.loads(text)
        if summary.get("failed", 0) and not allow_failures:
            raise RuntimeError(f"{summary['failed']} images failed: see {os.path.join(os.fspath(out), 'failures.jsonl')}")
        return summary

    def __repr__(self) -> str:
        return f"clipmask.Generator({self.model!r}, {self.config!r}, cam={self.cam!r})"


def classify(model: Model, config: Union[Config, str, Dict[str, Any]], images: Sequence[ImageLike]) -> np.ndarray:
    """Zero-shot class probabilities (``clipmask classify``): float32 (N, C), columns in
    ``Config.class_names`` order."""
    cfg = config if isinstance(config, Config) else Config(config)
    rows = _native.classify(model._m, cfg._c, [_image_arg(im) for im in images])
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), len(cfg.class_names))


def tag(
    model: Model,
    config: Union[Config, str, Dict[str, Any]],
    images: Sequence[ImageLike],
    threshold: Optional[float] = None,
) -> List[Dict[str, Any]]:
    """Image-level labels predicted by CLIP (TagCLIP, ``clipmask tag``): per image a dict with
    ``labels`` (class names) and ``scores`` (float32 (C,))."""
    cfg = config if isinstance(config, Config) else Config(config)
    names = cfg.class_names
    out = []
    for scores, chosen in _native.tag(model._m, cfg._c, [_image_arg(im) for im in images], threshold):
        out.append({"labels": [names[i] for i in chosen], "scores": np.asarray(scores, dtype=np.float32)})
    return out


def evaluate(
    pred: Optional[Union[str, "os.PathLike[str]"]],
    gt: Union[str, "os.PathLike[str]"],
    config: Union[str, "os.PathLike[str]"] = "voc12",
    *,
    split: Optional[Union[str, "os.PathLike[str]"]] = None,
    cams: Optional[Union[str, "os.PathLike[str]", Sequence[str]]] = None,
    alpha: Optional[Sequence[float]] = None,
    strict: bool = False,
    allow_missing: bool = False,
    extra_args: Sequence[str] = (),
) -> Dict[str, Any]:
    """``clipmask eval --json``: mIoU (fractions) of label maps in ``pred`` (or of maps saved
    in ``cams``, swept over ``alpha``) against the ground truth in ``gt``. Returns the JSON
    object (docs/schemas/eval.schema.json): ``miou``, ``per_class_iou`` and more."""
    argv = ["--gt", os.fspath(gt), "--config", os.fspath(config), "--json"]
    if pred is not None:
        argv += ["--pred", os.fspath(pred)]
    if cams is not None:
        for c in [cams] if isinstance(cams, (str, os.PathLike)) else cams:
            argv += ["--cams", os.fspath(c)]
    if alpha is not None:
        argv += ["--alpha", ",".join(str(a) for a in alpha)]
    if split is not None:
        argv += ["--split", os.fspath(split)]
    if strict:
        argv.append("--strict")
    if allow_missing:
        argv.append("--allow-missing")
    argv += list(extra_args)
    return json.loads(_native.evaluate(argv))


def crf(
    image: ImageLike,
    probs: np.ndarray,
    *,
    confidence: float = 0.95,
    image_mode: str = "faithful",
    iterations: int = 10,
    gaussian_sxy: float = 1.0,
    gaussian_weight: float = 3.0,
    bilateral_sxy: float = 67.0,
    bilateral_srgb: float = 3.0,
    bilateral_weight: float = 4.0,
) -> Tuple[np.ndarray, np.ndarray]:
    """CLIP-ES's dense CRF (docs/method.md §6) on probabilities ``probs`` float32 (C, H, W)
    (channel c is label value c) of ``image`` (H x W x 3 RGB). The defaults are CLIP-ES's
    parameters; ``image_mode`` ``faithful`` feeds the CRF the image as CLIP-ES does (see
    ``clipmask crf --help``), ``rgb`` the plain photo.

    Returns:
        (labels uint8 (H, W): argmax channel, 255 where its marginal is below ``confidence``;
        confidence float32 (H, W): the largest marginal).
    """
    arg = _image_arg(image)
    if isinstance(arg, str):
        from PIL import Image

        with Image.open(arg) as im:
            arg = _image_arg(im)
    pixels, h, w = arg
    p = np.asarray(probs)
    if p.ndim != 3 or p.shape[1:] != (h, w):
        raise ValueError(f"probs must be (C, {h}, {w}) for this image, got shape {p.shape}")
    params = {
        "iterations": int(iterations),
        "gaussian_sxy": float(gaussian_sxy),
        "gaussian_weight": float(gaussian_weight),
        "bilateral_sxy": float(bilateral_sxy),
        "bilateral_srgb": float(bilateral_srgb),
        "bilateral_weight": float(bilateral_weight),
    }
    labels, conf = _native.crf(
        pixels, h, w, np.ascontiguousarray(p, dtype="<f4").tobytes(), int(p.shape[0]), image_mode,
        float(confidence), json.dumps(params),
    )
    return np.frombuffer(labels, dtype=np.uint8).reshape(h, w), np.frombuffer(conf, dtype="<f4").reshape(h, w)


__version__ = version().splitlines()[0].split()[-1]
