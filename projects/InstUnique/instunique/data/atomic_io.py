"""Writing dataset files so that a reader never sees a half-written one."""
import os
import threading
from typing import Optional, Sequence

import cv2
import numpy as np

__all__ = ["NOISE_PNG_PARAMS", "atomic_write", "write_png"]

# Huffman-only: the sensor noise of synthetic images defeats LZ matching; this is both
# faster and smaller there. Label maps (large flat regions) use cv2's defaults instead.
NOISE_PNG_PARAMS = (
    cv2.IMWRITE_PNG_COMPRESSION, 1,
    cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
)  # fmt: skip


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, then move it into place."""
    # Unique per writer, so racing writers never share a temporary file.
    tmp = f"{path}.tmp{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_png(path: str, image: np.ndarray, params: Optional[Sequence[int]] = None) -> None:
    """Encode ``image`` ((H, W) or (H, W, 3) BGR uint8) as PNG and write it atomically."""
    ok, png = cv2.imencode(".png", image, list(params or ()))
    if not ok:  # pragma: no cover - cv2 failure
        raise RuntimeError(f"could not encode {path}")
    atomic_write(path, png.tobytes())
