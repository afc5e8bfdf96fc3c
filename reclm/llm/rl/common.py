"""What PPO and DPO share: the trainable policy, the frozen reference, and token log-probabilities."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def load_policy(
    base_model: str | os.PathLike, adapter: str | os.PathLike | None = None, lora: dict | None = None, device=None
) -> tuple[Any, Any]:
    """(policy, tokenizer): the base LM with a TRAINABLE LoRA adapter, initialised from ``adapter`` (the SFT
    or collaborative adapter) when given, else fresh (``lora`` settings)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from reclm.llm.model import adapter_identity, default_dtype, load_tokenizer, resolve_device, resolve_model_dir

    folder = resolve_model_dir(base_model)
    device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=default_dtype(device))
    if adapter is not None:
        adapter_identity(adapter)
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    else:
        settings = {**DEFAULT_LORA, **(lora or {})}
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=int(settings["r"]),
            lora_alpha=int(settings["alpha"]),
            lora_dropout=float(settings["dropout"]),
            target_modules=list(settings["target_modules"]),
        )
        model = get_peft_model(model, config)
    model.to(device)
    model.eval()  # no dropout during RL: rollouts and updates see the same function
    return model, load_tokenizer(folder, padding_side="left")


def load_reference(base_model: str | os.PathLike, adapter: str | os.PathLike | None = None, device=None) -> Any:
    """The frozen reference: the base LM with ``adapter`` merged in (the SFT-tuned writer)."""
    from reclm.llm.model import load_base

    model, _ = load_base(base_model, device=device, adapter=adapter, merge=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def position_ids(attention_mask):
    """Positions that skip left padding (what ``generate`` uses), so a plain forward matches sampling."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward(model, input_ids, attention_mask, hidden: bool = False):
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        output_hidden_states=hidden,
        use_cache=False,
    )


def last_hidden(model, input_ids, attention_mask):
    """The decoder's final hidden states (B, T, H), without the vocabulary projection: callers project only
    the positions they need (most of a profile prompt is not response, and the 49k-word head is costly)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = base.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False
    )
    return out.last_hidden_state


def output_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings()


def gather_logprobs(logits, tokens):
    """log p(token) under ``logits`` (float32 for a stable softmax)."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def trainable_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def weights_snapshot(model) -> dict[str, Any]:
    """A copy of the trainable weights (to measure how much training moved them)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def weight_change(model, snapshot: dict[str, Any]) -> float:
    """L2 norm of (current - snapshot) over the trainable weights."""
    import torch

    total = torch.zeros(())
    for n, p in model.named_parameters():
        if n in snapshot:
            total = total + (p.detach().float() - snapshot[n].float()).pow(2).sum()
    return float(total.sqrt())


# ---------------------------------------------------------------- the starting point of a resumable run


def tensors_digest(tensors: dict[str, Any]) -> str:
    """A hash of named tensors' values (the starting weights a checkpoint must have started from)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_adapter(model, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


def encode_prompts(tokenizer, prompts: Sequence[str], device) -> dict:
    """Left-padded chat-template ids of generation prompts."""
    import torch

    from reclm.llm.chat import prompt_ids

    rows = prompt_ids(tokenizer, list(prompts))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, width - len(r) :] = torch.tensor(r)
        mask[k, width - len(r) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
