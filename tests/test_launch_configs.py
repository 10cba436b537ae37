"""Launch set-ups: the shipped accelerate configs parse, and sharded training is refused for curvature methods."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from hf_continual import ContinualConfig
from hf_continual.trainer import refuse_sharded_training

ACCELERATE = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"
CONFIGS = sorted(ACCELERATE.glob("*.yaml"))


def test_every_accelerate_recipe_is_listed():
    assert {p.name for p in CONFIGS} >= {
        "cpu_2proc.yaml",
        "single_gpu.yaml",
        "multi_gpu.yaml",
        "multi_node.yaml",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_recipe_parses_with_accelerates_own_loader(path):
    """``accelerate launch --config_file`` reads these files with this loader; a typo'd key or value fails it."""
    cfg = load_config_from_file(str(path))
    assert cfg.compute_environment.value == "LOCAL_MACHINE"
    assert cfg.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU)  # DDP only: never sharded
    assert cfg.num_processes >= 1 and cfg.num_machines >= 1
    if cfg.distributed_type == DistributedType.NO:
        assert cfg.num_processes == 1
    else:
        assert cfg.num_processes >= 2 and cfg.num_processes % cfg.num_machines == 0
    if cfg.num_machines > 1:
        assert cfg.main_process_ip and cfg.main_process_port
    assert str(cfg.mixed_precision) in ("no", "bf16", "fp16")


CURVATURE_METHODS = ["ewc", "online_ewc", "kfac", "fish"]


@pytest.mark.parametrize("method", CURVATURE_METHODS)
@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_sharded_accelerator_is_refused_for_curvature_methods(method, kind):
    args = ContinualConfig(output_dir="unused", use_cpu=True, continual_method=method)
    with pytest.raises(ValueError, match="does not support sharded training"):
        refuse_sharded_training(method, args, kind)


@pytest.mark.parametrize("method", CURVATURE_METHODS)
def test_fsdp_arguments_are_refused_for_curvature_methods(method):
    """The arguments alone refuse it, before any launch (the Trainer itself would only refuse FSDP off-DDP)."""
    args = ContinualConfig(output_dir="unused", use_cpu=True, continual_method=method, fsdp=True)
    with pytest.raises(ValueError, match="FSDP / DeepSpeed"):
        refuse_sharded_training(method, args, DistributedType.NO)


@pytest.mark.parametrize("method", ["none", "replay", "joint"])
def test_sharding_is_allowed_for_methods_without_curvature(method):
    args = ContinualConfig(output_dir="unused", use_cpu=True, continual_method=method, fsdp=True)
    refuse_sharded_training(method, args, DistributedType.FSDP)


@pytest.mark.parametrize("kind", [DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU])
def test_ddp_and_single_process_are_allowed(kind):
    args = ContinualConfig(output_dir="unused", use_cpu=True, continual_method="kfac")
    refuse_sharded_training("kfac", args, kind)
