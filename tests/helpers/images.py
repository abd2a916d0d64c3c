"""Test images: smooth random content at any size and PIL mode (RGBA with a varied alpha, L grayscale)."""
import numpy as np
from PIL import Image


def random_image(w, h, mode="RGB", seed=0):
    rs = np.random.RandomState(seed)
    im = Image.fromarray(rs.randint(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
    if mode == "RGBA":
        im.putalpha(Image.fromarray(rs.randint(0, 256, (h, w), dtype=np.uint8)))
    elif mode == "L":
        im = im.convert("L")
    return im
