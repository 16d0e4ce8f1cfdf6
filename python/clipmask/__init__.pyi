"""Type stubs of the clipmask Python API (see clipmask/__init__.py for the docs)."""
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, overload

import numpy as np
import numpy.typing as npt

_Path = Union[str, os.PathLike[str]]
ImageLike = Union[_Path, npt.NDArray[np.uint8], Any]  # a path, a PIL image, or H x W x 3 uint8
Labels = Sequence[Union[str, int]]

__version__: str

def version() -> str: ...

class Model:
    def __init__(self, name_or_path: _Path, device: str = "auto", precision: str = "auto") -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def precision(self) -> str: ...

class Config:
    def __init__(self, spec: Union[_Path, Dict[str, Any], "Config"] = "voc12") -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def class_names(self) -> List[str]: ...
    @property
    def palette(self) -> npt.NDArray[np.uint8]: ...
    def to_dict(self) -> Dict[str, Any]: ...

class Maps:
    keys: npt.NDArray[np.int64]
    cams: npt.NDArray[np.float32]
    raw_cams: npt.NDArray[np.float32]
    probs: npt.NDArray[np.float32]
    class_names: List[str]
    @property
    def shape(self) -> Tuple[int, int]: ...
    def labels(self, alpha: float = 1.0) -> npt.NDArray[np.uint8]: ...
    def crf_labels(
        self, alpha: float = 1.0, confidence: float = 0.95, image_mode: str = "faithful", image: Optional[ImageLike] = None
    ) -> Tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]: ...

class Generator:
    model: Model
    config: Config
    cam: str
    scales: Tuple[float, ...]
    flip: bool
    box_threshold: Optional[float]
    max_side: int
    def __init__(
        self,
        model: Model,
        config: Union[Config, str, Dict[str, Any]] = "voc12",
        cam: str = "gradcam",
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        box_threshold: Optional[float] = None,
        max_side: int = 1024,
    ) -> None: ...
    @overload
    def __call__(self, image: ImageLike, labels: Labels, batch_size: int = 1) -> Maps: ...
    @overload
    def __call__(self, image: List[ImageLike], labels: List[Labels], batch_size: int = 1) -> List[Maps]: ...
    def run(
        self,
        images: _Path,
        labels: Union[_Path, Dict[str, Sequence[str]]],
        out: _Path,
        *,
        crf: bool = False,
        save_cams: bool = False,
        overlays: bool = False,
        overwrite: bool = False,
        split: Optional[_Path] = None,
        alpha: float = 1.0,
        batch_size: int = 0,
        mask_format: str = "gray",
        allow_failures: bool = True,
        extra_args: Sequence[str] = (),
    ) -> Dict[str, Any]: ...

def classify(model: Model, config: Union[Config, str, Dict[str, Any]], images: Sequence[ImageLike]) -> npt.NDArray[np.float32]: ...
def tag(
    model: Model, config: Union[Config, str, Dict[str, Any]], images: Sequence[ImageLike], threshold: Optional[float] = None
) -> List[Dict[str, Any]]: ...
def evaluate(
    pred: Optional[_Path],
    gt: _Path,
    config: _Path = "voc12",
    *,
    split: Optional[_Path] = None,
    cams: Optional[Union[_Path, Sequence[str]]] = None,
    alpha: Optional[Sequence[float]] = None,
    strict: bool = False,
    allow_missing: bool = False,
    extra_args: Sequence[str] = (),
) -> Dict[str, Any]: ...
def crf(
    image: ImageLike,
    probs: npt.NDArray[np.float32],
    *,
    confidence: float = 0.95,
    image_mode: str = "faithful",
    iterations: int = 10,
    gaussian_sxy: float = 1.0,
    gaussian_weight: float = 3.0,
    bilateral_sxy: float = 67.0,
    bilateral_srgb: float = 3.0,
    bilateral_weight: float = 4.0,
) -> Tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]: ...
