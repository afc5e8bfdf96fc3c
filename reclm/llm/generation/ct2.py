"""Fast backend: CTranslate2 (int8 on CPU) from the base model with the LoRA adapter merged in.

The converted model is cached under ``cache_root()/ct2/<base>-<adapter>-<quantization>`` (about 15 s to build
for SmolLM2). Prompts are sorted by length and batched, because CTranslate2 prefills a batch only up to its
shortest prompt and feeds the rest token by token. The token prefix shared by every prompt (chat template,
system prompt, the instruction's opening) is passed as ``static_prompt``: its state is computed once and reused.

On CPU, greedy batches run side by side, one worker per core (``inter_threads``), instead of one batch at a
time on every core: a 135M model's matrices are too small to keep several cores busy (docs/decisions.md).
Sampling keeps one worker, so that its random stream (seeded per worker) gives the same texts every time.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

from reclm.llm.chat import SYSTEM_PROMPT, Prompt, prompt_ids
from reclm.llm.generation.base import (
    DecodeParams,
    Generator,
    finish,
    local_identity,
    sorted_batches,
    stop_token_ids,
)
from reclm.llm.model import (
    DEFAULT_MODEL,
    adapter_identity,
    load_base,
    load_tokenizer,
    model_identity,
    resolve_model_dir,
)
from reclm.utils import available_cores, cache_root

MIN_STATIC_PREFIX = 8  # shorter shared prefixes are not worth a cached state
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})  # CPUs with int8 dot-product instructions


def ct2_device(device: str | None) -> str:
    import ctranslate2

    if device in (None, "auto"):
        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    return device


def default_quantization(device: str) -> str:
    """int8 on a GPU (with bf16) and on CPUs whose int8 kernels track float32; float32 on the others."""
    if device != "cpu":
        return "int8_bfloat16"
    return "int8" if int8_tracks_float32(*cpu_vendor_and_flags(), os.environ.get("CT2_USE_MKL")) else "float32"


@functools.cache
def cpu_vendor_and_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """``(vendor_id, flags)`` of the first CPU in ``cpuinfo`` (empty where there is no such file); read once
    per process (stage keys ask for the default precision several times a run)."""
    vendor, flags = "", frozenset()
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return vendor, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return vendor, flags


def int8_tracks_float32(vendor: str, flags: AbstractSet[str], use_mkl: str | None = None) -> bool:
    """Whether CTranslate2's int8 CPU kernels give about float32's outputs here.

    CTranslate2 runs int8 with Intel MKL on Intel CPUs (or where ``CT2_USE_MKL=1``) and with oneDNN on the
    others, where int8 tracks float32 only with VNNI (``avx512_vnni``, ``avx_vnni``); why: docs/decisions.md.
    CPUs that are not x86 (no ``flags``) keep int8.
    """
    vnni = bool(VNNI_FLAGS & flags)
    if use_mkl is not None:
        return use_mkl.strip() == "1" or vnni
    return not flags or vendor == "GenuineIntel" or vnni


def convert_to_ct2(
    model: str | os.PathLike = DEFAULT_MODEL, adapter: str | os.PathLike | None = None, quantization: str = "int8"
) -> Path:
    """The CTranslate2 folder of ``model`` + merged ``adapter`` at ``quantization``, converted once and cached."""
    import ctranslate2

    key = f"{model_identity(model)}-{adapter_identity(adapter)}-{quantization}".replace("@", "-").replace("/", "_")
    target = cache_root() / "ct2" / key
    if (target / "model.bin").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        source = resolve_model_dir(model)
        if adapter is not None:
            import torch

            merged, tokenizer = load_base(model, device="cpu", dtype=torch.float32, adapter=adapter, merge=True)
            source = work / "merged"
            merged.save_pretrained(source)
            tokenizer.save_pretrained(source)
            del merged
        converter = ctranslate2.converters.TransformersConverter(str(source), low_cpu_mem_usage=True)
        converter.convert(str(work / "ct2"), quantization=quantization, force=True)
        (work / "ct2").chmod(0o755)
        try:
            (work / "ct2").rename(target)
        except OSError:  # converted concurrently by another process: keep theirs
            if not (target / "model.bin").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    if not sequences:
        return 0
    shortest = min(len(s) for s in sequences)
    first = sequences[0]
    for k in range(shortest):
        token = first[k]
        if any(s[k] != token for s in sequences):
            return k
    return shortest


class CT2Generator(Generator):
    backend = "ct2"

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        adapter: str | os.PathLike | None = None,
        quantization: str | None = None,
        batch_size: int = 16,
        device: str | None = None,
        compute_type: str = "default",
        threads: int | None = None,
        static_prefix: bool = True,
        system: str | None = SYSTEM_PROMPT,
    ):
        super().__init__()
        self.device = ct2_device(device)
        self.quantization = quantization or default_quantization(self.device)
        self.path = convert_to_ct2(model, adapter, self.quantization)
        self.threads = threads or int(os.environ.get("RECLM_THREADS", 0)) or available_cores()
        self.compute_type = compute_type
        self.workers = self.threads if self.device == "cpu" else 1
        self.generator = self.load(self.workers)
        self.tokenizer = load_tokenizer(model)
        self.batch_size = batch_size
        self.static_prefix = static_prefix
        self.system = system
        self._static: list[int] | None = None
        self._identity = local_identity(f"ct2-{self.quantization}", model, adapter)

    def load(self, workers: int = 1) -> Any:
        """A CTranslate2 generator: ``workers`` batches at a time, the cores shared among them."""
        import ctranslate2

        self.loaded_workers = workers
        return ctranslate2.Generator(
            str(self.path),
            device=self.device,
            compute_type=self.compute_type,
            inter_threads=workers,
            intra_threads=max(1, self.threads // workers),
        )

    @property
    def identity(self) -> str:
        return self._identity

    def shared_prefix(self, ids: Sequence[Sequence[int]]) -> list[int]:
        """The static prompt for these prompts: their common token prefix (at least one token left to each).
        Kept stable across calls while it still applies, so CTranslate2's cached state is reused."""
        if not self.static_prefix or len(ids) < 2:
            return []
        if self._static and all(len(x) > len(self._static) and x[: len(self._static)] == self._static for x in ids):
            return self._static
        n = min(common_prefix_length(ids), min(len(x) for x in ids) - 1)
        self._static = list(ids[0][:n]) if n >= MIN_STATIC_PREFIX else None
        return self._static or []

    def generate(self, prompts: Sequence[Prompt], params: DecodeParams) -> list[str]:
        import ctranslate2

        ids = prompt_ids(self.tokenizer, prompts, self.system)
        static = self.shared_prefix(ids)
        stops = stop_token_ids(self.tokenizer, params.single_line)
        options: dict[str, Any] = {
            "max_length": params.max_new_tokens,
            "include_prompt_in_result": False,
            "end_token": stops,
            "return_end_token": True,
        }
        if params.repetition_penalty != 1.0:
            options["repetition_penalty"] = params.repetition_penalty
        if static:
            options["static_prompt"] = self.tokenizer.convert_ids_to_tokens(static)
        if params.greedy:
            options["sampling_topk"] = 1
        else:
            options.update(
                sampling_topk=params.top_k, sampling_topp=params.top_p, sampling_temperature=params.temperature
            )
        if not params.greedy:
            # CTranslate2 seeds each worker thread's generator once, when the thread starts: reload so that
            # sampling restarts from the seed (same prompts and batch size -> same texts)
            ctranslate2.set_random_seed(params.seed)
            self.generator = self.load(1)
        elif self.loaded_workers != self.workers:
            self.generator = self.load(self.workers)
        outputs: list[str] = [""] * len(prompts)
        batches = sorted_batches([len(x) for x in ids], self.batch_size)
        group = self.loaded_workers  # batches handed over together, one per worker
        for start in range(0, len(batches), group):
            positions = [i for batch in batches[start : start + group] for i in batch]
            tokens = [self.tokenizer.convert_ids_to_tokens(ids[i][len(static) :]) for i in positions]
            results = self.generator.generate_batch(tokens, max_batch_size=self.batch_size, **options)
            for i, result in zip(positions, results):
                new = result.sequences_ids[0]
                self.prompt_tokens += len(ids[i])
                self.new_tokens += len(new)
                outputs[i] = finish(self.tokenizer.decode(new, skip_special_tokens=True), params)
        return outputs

    def close(self) -> None:
        self.generator = None
