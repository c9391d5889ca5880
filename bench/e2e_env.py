"""Where ``bench/e2e.py`` runs: the device's name for result files, and torchao from a wheel."""

from __future__ import annotations

import glob
import os
import tempfile
import zipfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_name(args) -> str:
    if args.tiny or not torch.cuda.is_available():
        return "cpu-tiny" if args.tiny else "cpu"
    return "".join(ch if ch.isalnum() else "-" for ch in torch.cuda.get_device_name().lower()).strip("-")


def torchao_pythonpath(args) -> str | None:
    """A folder to put on PYTHONPATH holding torchao unpacked from a wheel, if torchao is not installed."""
    try:
        import torchao  # noqa: F401

        return None
    except Exception:
        pass
    dirs = (
        [args.wheels]
        if args.wheels
        else [os.path.join(ROOT, "shared", "wheels"), os.path.join(ROOT, "..", "shared", "wheels")]
    )
    for d in dirs:
        wheels = sorted(glob.glob(os.path.join(d, "torchao-*.whl")))
        if wheels:
            target = tempfile.mkdtemp(prefix="lowbit-e2e-torchao-")
            with zipfile.ZipFile(wheels[-1]) as z:
                z.extractall(target)
            print(f"torchao: using {os.path.basename(wheels[-1])} unpacked into {target}", flush=True)
            return target
    return None
