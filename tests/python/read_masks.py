"""Reads label PNGs the way downstream trainers do, and compares with the ids clipmask wrote.

  read_masks.py DIR EXPECTED_DIR

For every DIR/<id>.png and EXPECTED_DIR/<id>.npy (uint8 H x W class ids), prints one JSON object
{reader: true/false} where true means the reader returned exactly those ids as an H x W array:
  pil            np.array(PIL.Image.open(p))         deeplab-pytorch VOC, mmseg (pillow), CLIP-ES eval
  cv2_grayscale  cv2.imread(p, cv2.IMREAD_GRAYSCALE)  detectron2 sem-seg, mmseg (cv2), COCO-Stuff
  cv2_unchanged  cv2.imread(p, cv2.IMREAD_UNCHANGED)
  imageio_v2     imageio.v2.imread(p)                 ToCo, AFA, WeCLIP, IRN, AMN
  imageio_v3     imageio.v3.imread(p)
  pil_convert_L  np.array(Image.open(p).convert("L"))
"""
import json
import os
import sys

import cv2
import imageio.v2 as iio2
import imageio.v3 as iio3
import numpy as np
from PIL import Image

READERS = {
    "pil": lambda p: np.array(Image.open(p)),
    "cv2_grayscale": lambda p: cv2.imread(p, cv2.IMREAD_GRAYSCALE),
    "cv2_unchanged": lambda p: cv2.imread(p, cv2.IMREAD_UNCHANGED),
    "imageio_v2": lambda p: np.asarray(iio2.imread(p)),
    "imageio_v3": lambda p: np.asarray(iio3.imread(p)),
    "pil_convert_L": lambda p: np.array(Image.open(p).convert("L")),
}


def main(d, expected):
    ok = {name: True for name in READERS}
    for f in sorted(os.listdir(expected)):
        want = np.load(os.path.join(expected, f))
        p = os.path.join(d, f[:-4] + ".png")
        for name, read in READERS.items():
            got = read(p)
            if got is None or got.shape != want.shape or got.dtype != np.uint8 or not np.array_equal(got, want):
                ok[name] = False
    print(json.dumps(ok))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
