"""Reference backend: transformers ``generate``, batched with left padding, LoRA adapter merged."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from reclm.llm.chat import SYSTEM_PROMPT, Prompt, prompt_ids
from reclm.llm.generation.base import DecodeParams, Generator, finish, local_identity, sorted_batches, stop_token_ids
from reclm.llm.model import DEFAULT_MODEL, load_base
from reclm.utils import torch_threads


class TransformersGenerator(Generator):
    backend = "transformers"

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        adapter: str | os.PathLike | None = None,
        batch_size: int = 16,
        device: str | None = None,
        dtype: Any = None,
        threads: int | None = None,
        system: str | None = SYSTEM_PROMPT,
    ):
        super().__init__()
        self.threads = torch_threads(threads)
        self.model, self.tokenizer = load_base(model, device=device, dtype=dtype, adapter=adapter, merge=True)
        self.tokenizer.padding_side = "left"
        self.device = str(self.model.device)
        self.batch_size = batch_size
        self.system = system
        dtype_name = str(self.model.dtype).replace("torch.", "")
        self._identity = local_identity(f"transformers-{dtype_name}", model, adapter)

    @property
    def identity(self) -> str:
        return self._identity

    def generate(self, prompts: Sequence[Prompt], params: DecodeParams) -> list[str]:
        import torch

        ids = prompt_ids(self.tokenizer, prompts, self.system)
        stops = stop_token_ids(self.tokenizer, params.single_line)
        outputs: list[str] = [""] * len(prompts)
        for batch in sorted_batches([len(x) for x in ids], self.batch_size):
            encoded = self.tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt")
            options: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "do_sample": not params.greedy}
            if params.repetition_penalty != 1.0:
                options["repetition_penalty"] = params.repetition_penalty
            if not params.greedy:
                torch.manual_seed(params.seed)
                options.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
            else:
                options.update(temperature=None, top_p=None, top_k=None)
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=encoded["input_ids"].to(self.device),
                    attention_mask=encoded["attention_mask"].to(self.device),
                    eos_token_id=stops,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **options,
                )
            new = out[:, encoded["input_ids"].shape[1] :].tolist()
            for row, i in enumerate(batch):
                tokens = trim_at_stop(new[row], set(stops))
                self.prompt_tokens += len(ids[i])
                self.new_tokens += len(tokens)
                outputs[i] = finish(self.tokenizer.decode(tokens, skip_special_tokens=True), params)
        return outputs


def trim_at_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """Tokens up to and including the first stop token (the rest is padding after the sequence ended)."""
    for k, token in enumerate(tokens):
        if token in stops:
            return tokens[: k + 1]
    return tokens
