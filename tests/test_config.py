import pytest
from transformers import HfArgumentParser

from hf_continual import ContinualConfig


def _cfg(tmp_path, **kw):
    return ContinualConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"continual_method": "sgd"}, "continual_method='sgd'"),
        ({"continual_lambda": -1.0}, "continual_lambda must be >= 0"),
        ({"fish_keep_ratio": 0.0}, r"fish_keep_ratio must be in \(0, 1\]"),
        ({"fish_keep_ratio": 1.5}, r"fish_keep_ratio must be in \(0, 1\]"),
        ({"fisher_type": "exact"}, "fisher_type"),
        ({"online_ewc_gamma": 0.0}, "online_ewc_gamma"),
        ({"fisher_num_samples": 0}, "fisher_num_samples"),
        ({"kfac_mode": "both"}, "kfac_mode"),
        ({"replay_per_task": 0}, "replay_per_task"),
        ({"kfac_compute_dtype": "float16"}, "kfac_compute_dtype"),
    ],
)
def test_validation_errors_name_the_argument(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path, **kwargs)


def test_yaml_round_trip(tmp_path):
    cfg = _cfg(
        tmp_path,
        continual_method="kfac",
        continual_lambda=123.0,
        kfac_rank=16,
        fish_trainable_modules=["classifier"],
        learning_rate=3e-5,
        eval_strategy="no",
    )
    cfg.to_yaml(tmp_path / "c.yaml")
    back = ContinualConfig.from_yaml(tmp_path / "c.yaml")
    assert back.to_yaml_dict() == cfg.to_yaml_dict()
    assert back.continual_dict()["kfac_rank"] == 16


def test_yaml_unknown_key_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("output_dir: x\ncontinual_lamda: 3\n")
    with pytest.raises(ValueError, match="continual_lamda"):
        ContinualConfig.from_yaml(tmp_path / "c.yaml")


def test_hf_argument_parser_round_trip(tmp_path):
    cfg = _cfg(
        tmp_path,
        continual_method="ewc",
        continual_lambda=10.0,
        ewc_mode="per_task",
        fish_trainable_modules=["classifier", "pooler"],
        kfac_rank=8,
    )
    argv = []
    for key, value in cfg.to_yaml_dict().items():
        if value is None or value == [] or value == {} or isinstance(value, dict):
            continue
        if isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value)]
    (parsed,) = HfArgumentParser(ContinualConfig).parse_args_into_dataclasses(argv)
    assert parsed.continual_dict() == cfg.continual_dict()
    assert parsed.learning_rate == cfg.learning_rate


def test_scientific_notation_is_a_float_in_yaml_and_overrides(tmp_path):
    """YAML 1.1 reads ``1e-4`` as a string; recipes and --set must read it as a number."""
    from hf_continual.recipe import apply_overrides

    (tmp_path / "c.yaml").write_text(f"output_dir: {tmp_path}\nlearning_rate: 1e-4\ncontinual_lambda: 5E+3\n")
    cfg = ContinualConfig.from_yaml(tmp_path / "c.yaml")
    assert cfg.learning_rate == pytest.approx(1e-4) and cfg.continual_lambda == 5000.0
    values = apply_overrides({}, ["learning_rate=2e-5", "task_options.max_train_mentions=1_000", "seed=abc"])
    assert values["training"]["learning_rate"] == pytest.approx(2e-5)
    assert values["task_options"]["max_train_mentions"] == 1000
    assert values["training"]["seed"] == "abc"
