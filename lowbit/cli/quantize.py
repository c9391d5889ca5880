"""``lowbit quantize``: a model folder or GGUF file -> a lowbit safetensors checkpoint.

The checkpoint is what ``save_pretrained`` writes for a model loaded with
``quantization_config=LowbitConfig(...)``, so plain ``from_pretrained(out)``
reloads it in any process that has imported ``lowbit``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from lowbit.cli import common as c


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a Transformers model folder or .gguf file into a lowbit checkpoint",
        description="Quantize a causal LM and write a checkpoint that `from_pretrained(OUT)` reloads after `import lowbit`. "
        "The output head stays in full precision.",
    )
    p.add_argument("model", help=f"Transformers model folder, .gguf file, or '{c.SMOLLM2}' (the bundled default model)")
    p.add_argument("out", help="output folder (created; must be empty unless --force)")
    add_scheme_args(p)
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="NAME",
        help="keep this module in full precision (repeatable; name or suffix, e.g. mlp.down_proj)",
    )
    p.add_argument(
        "--dtype",
        choices=list(c.DTYPES),
        default="bfloat16",
        help="dtype of the unquantized parts and the activations (default: bfloat16)",
    )
    p.add_argument("--force", action="store_true", help="write into OUT even if it is not empty")
    p.set_defaults(func=run)


def add_scheme_args(p, default: str = "int4") -> None:
    p.add_argument(
        "--scheme",
        choices=list(c.SCHEMES),
        default=default,
        help="; ".join(f"{k}: {v}" for k, v in c.SCHEME_HELP.items()) + f" (default: {default})",
    )
    p.add_argument(
        "--group-size",
        type=int,
        choices=c.GROUP_SIZES,
        default=128,
        help="int4 group size along the input dimension (default: 128)",
    )


def quantize_to_folder(src: c.ModelSource, out: Path, scheme: str, group_size: int, skip, dtype, log=print):
    """Load ``src`` quantizing on the fly, save it to ``out``; returns (model, seconds to quantize)."""
    qcfg = c.lowbit_hf_config(scheme, group_size, skip)
    tokenizer = c.load_tokenizer(src, required=False)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowbit-fp-") as tmp:
        folder = c.ModelSource(src.folder)
        if src.gguf_file:
            # GGUF: dequantize once into a plain checkpoint, then quantize that on load like any folder
            log(f"reading {src} ...")
            c.load_model(src, dtype).save_pretrained(tmp)
            folder = c.ModelSource(tmp)
        log(
            f"quantizing {src} with {qcfg.scheme}"
            + (f" (group size {group_size})" if scheme == "int4" else "")
            + " ..."
        )
        model = c.load_model(folder, dtype, quantization_config=qcfg)
        seconds = time.perf_counter() - t0
        names = [fqn for fqn, _ in model.named_modules()]
        for n in skip or ():
            if not any(c.names_module(n, f) for f in names):
                raise c.CliError(
                    f"--skip {n!r} matches no module of the model (a name or a suffix such as mlp.down_proj)"
                )
        model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return model, seconds


def run(args) -> int:
    src = c.resolve_model(args.model)
    if c.is_lowbit_checkpoint(src):
        raise c.CliError(f"{src} is already a lowbit checkpoint")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise c.CliError(f"output {str(out)!r} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise c.CliError(f"output folder {str(out)!r} is not empty (use --force to write into it)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise c.CliError(f"cannot create {str(out)!r}: {e.strerror}") from None
    try:
        model, seconds = quantize_to_folder(src, out, args.scheme, args.group_size, args.skip, c.DTYPES[args.dtype])
    except BaseException:
        if not any(out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
        raise
    report = getattr(model, "lowbit_report", None)
    if report is not None:
        print(report)
    n_q, n_lin = c.count_quantized(model)
    if n_q == 0:
        raise c.CliError("no layer was quantized (see the skip reasons above)")
    print(
        f"wrote {out}: {n_q}/{n_lin} linear layers quantized in {seconds:.1f} s; "
        f"weights {c.mib(c.disk_bytes(out))} MiB on disk, {c.mib(c.memory_bytes(model))} MiB in memory"
    )
    print(f"load it with: import lowbit; AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0
