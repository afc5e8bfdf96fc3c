import pytest

from reclm.cf.config import CFConfig


def test_defaults_follow_the_recbole_protocol():
    cfg = CFConfig()
    assert (cfg.dim, cfg.lr, cfg.batch_size, cfg.layers, cfg.patience, cfg.epochs) == (64, 1e-3, 2048, 2, 10, 300)
    assert (cfg.valid_metric, cfg.topks, cfg.seed, cfg.reg_weight) == ("ndcg@20", [10, 20, 40], 2020, 1e-4)
    assert (cfg.sgl_drop_ratio, cfg.sgl_ssl_weight, cfg.sgl_ssl_tau) == (0.1, 0.05, 0.5)
    assert (cfg.simgcl_eps, cfg.simgcl_ssl_tau) == (0.1, 0.2)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "cf.yaml"
    path.write_text("cf:\n  backbone: sgl\n  dim: 32\n  batch-size: 512\n  topks: [5, 50]\n")
    cfg = CFConfig.from_yaml(path, dim=16, lr=None)
    assert (cfg.backbone, cfg.dim, cfg.batch_size, cfg.lr) == ("sgl", 16, 512, 1e-3)
    assert cfg.topks == [5, 20, 50]  # the validation metric's K is always computed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("backbon: sgl\n", "backbon"),
        ("dim: -3\n", "dim"),
        ("valid_metric: mrr@10\n", "recall@K or ndcg@K"),
        ("- just\n- a list\n", "mapping"),
        ("dim: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_yaml_is_one_readable_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        CFConfig.from_yaml(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(path) in str(info.value)
