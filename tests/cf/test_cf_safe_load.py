"""Issue 21, item 11: files of a run directory are read with ``weights_only=True``. A planted checkpoint
(a pickle that calls a function when loaded) is refused with a clear error and runs nothing; the states
the project writes itself (CF resume state, LoRA trainer state) still load and resume exactly."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from reclm.cf import CFConfig, train_cf


class Planted:
    """Unpickling this calls ``open(path, "w")``: a stand-in for any code a planted file could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def plant(path: Path, ran: Path, **plain) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**plain, "payload": Planted(ran)}, path)


def test_a_planted_cf_checkpoint_is_refused_and_runs_nothing(tmp_path, tiny_split):
    ran = tmp_path / "code-ran"
    plant(tmp_path / "run" / "checkpoint.pt", ran, fingerprint=None)
    cfg = CFConfig(backbone="bias-mf", dim=8, batch_size=64, epochs=2, topks=[1, 5])
    with pytest.raises(ValueError, match=r"checkpoint\.pt: refused to load: .*\(io\.open\).*could run code"):
        train_cf(tiny_split, cfg, out_dir=tmp_path / "run", show_progress=False)
    assert not ran.exists(), "loading the checkpoint ran the planted call"

    from reclm.cf import load_model

    plant(tmp_path / "model.pt", ran, format="reclm-cf/2")
    with pytest.raises(ValueError, match=r"model\.pt: refused to load"):
        load_model(tmp_path / "model.pt")
    assert not ran.exists()


def test_a_torn_cf_checkpoint_still_starts_afresh(tmp_path, tiny_split):
    cfg = CFConfig(backbone="bias-mf", dim=8, batch_size=64, epochs=2, topks=[1, 5])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"PK\x03\x04 torn")
    result = train_cf(tiny_split, cfg, out_dir=tmp_path / "run", show_progress=False)
    assert result.epochs_run == 2 and not (tmp_path / "run" / "checkpoint.pt").exists()


def lora_trainer_state(path: Path) -> dict:
    """``trainer_state.pt`` with what ``reclm.llm.loop.save_checkpoint`` puts in it: AdamW and scheduler state
    dicts, the loop state, and the torch / numpy / python random states."""
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    saved = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": {"step": 7, "fingerprint": "abc", "losses": [1.5, 1.25]},
        "rng": rng,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, path)
    return saved


def test_the_lora_trainer_state_loads_weights_only_and_restores_the_random_states(tmp_path):
    from reclm.llm.loop import load_trainer_state

    saved = lora_trainer_state(tmp_path / "trainer_state.pt")
    expected = np.random.random(3), random.random()  # what follows the saved states
    np.random.seed(1)
    random.seed(1)
    loaded = load_trainer_state(tmp_path / "trainer_state.pt")
    assert loaded["state"] == saved["state"] and loaded["scheduler"] == saved["scheduler"]
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], saved["optimizer"]["state"][0]["exp_avg"])
    np.random.set_state(loaded["rng"]["numpy"])
    random.setstate(loaded["rng"]["python"])
    assert np.array_equal(np.random.random(3), expected[0]) and random.random() == expected[1]


def test_a_planted_lora_trainer_state_is_refused_and_a_dry_run_runs_nothing(tmp_path):
    from reclm.pipeline import estimate

    ran = tmp_path / "code-ran"
    checkpoint = tmp_path / ".work" / "sft" / "checkpoint"
    plant(checkpoint / "trainer_state.pt", ran, state={"step": 10})
    (tmp_path / ".work" / "sft.key").write_text("abc")
    assert estimate.saved_step(tmp_path, "sft", "abc") is None, "the dry run took the planted file's step"
    assert not ran.exists(), "the dry run ran the planted call"
    from reclm.llm.loop import load_trainer_state

    with pytest.raises(ValueError, match=r"trainer_state\.pt: refused to load: .*\(io\.open\)"):
        load_trainer_state(checkpoint / "trainer_state.pt")
    assert not ran.exists()

    arrays = {"state": {"step": 3}, "other": np.zeros(2, dtype=object)}  # numpy arrays beyond the RNG's: refused
    torch.save(arrays, checkpoint / "trainer_state.pt")
    with pytest.raises(ValueError, match="refused to load"):
        load_trainer_state(checkpoint / "trainer_state.pt")
