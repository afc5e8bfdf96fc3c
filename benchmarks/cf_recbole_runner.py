"""Run one RecBole 1.2.1 model on benchmark atomic files and print its results as one JSON line.

Runs INSIDE the RecBole virtual environment (it imports recbole only, never reclm); called by
``benchmarks/recbole_ml100k.py``. Usage:

    .venv-recbole/bin/python benchmarks/cf_recbole_runner.py DATA_DIR DATASET MODEL THREADS SETTINGS_JSON

Each training epoch is timed around RecBole's own ``_train_epoch`` (negative sampling included, as
RecBole samples while iterating its train loader), so the figure compares with reclm's train seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # RecBole reloads its pickled checkpoint

import torch  # noqa: E402
from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.utils import get_model, get_trainer, init_logger, init_seed  # noqa: E402


def main() -> None:
    data_dir, dataset, model_name, threads, settings = sys.argv[1:6]
    config_dict = {
        "data_path": data_dir,
        "benchmark_filename": ["train", "valid", "test"],
        "load_col": {"inter": ["user_id", "item_id"]},
        "use_gpu": False,
        "show_progress": False,
        "metrics": ["Recall", "NDCG"],
        "eval_args": {"group_by": "user", "order": "RO", "mode": "full"},
        **json.loads(settings),
    }
    config = Config(model=model_name, dataset=dataset, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    torch.set_num_threads(int(threads))
    data = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, data)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    epoch_seconds: list[float] = []
    train_epoch = trainer._train_epoch

    def timed_train_epoch(*args, **kwargs):
        start = time.perf_counter()
        out = train_epoch(*args, **kwargs)
        epoch_seconds.append(time.perf_counter() - start)
        return out

    trainer._train_epoch = timed_train_epoch
    best_valid_score, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    result = {
        "model": model_name,
        "valid": {k: float(v) for k, v in best_valid.items()},
        "test": {k: float(v) for k, v in test.items()},
        "best_epoch": len(epoch_seconds) - int(trainer.cur_step),  # eval_step 1: epochs since the best
        "epochs_run": len(epoch_seconds),
        "epoch_seconds": sum(epoch_seconds) / max(1, len(epoch_seconds)),
        "epoch_seconds_all": epoch_seconds,
        "threads": torch.get_num_threads(),
        "recbole_users": int(data.user_num - 1),
        "recbole_items": int(data.item_num - 1),
    }
    print("RECBOLE_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
