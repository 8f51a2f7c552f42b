"""Models whose span penalty and span logs only lm_loss reads refuse another criterion under streaming_lm."""
import pytest
from fairseq import tasks

from fairseq_ext.errors import ConfigError
from fairseq_ext.tasks.criterion_check import lm_loss_terms
from tests.harness import training_cfg


def build(data_dir, arch, criterion, *extra):
    cfg = training_cfg(arch, ["--tokens-per-sample", "8", "--batch-size", "2", "--criterion", criterion, *extra],
                       task="streaming_lm", data=data_dir)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return task, cfg, model


@pytest.mark.parametrize("arch,extra", [("adaptive_span_tiny", []), ("composed_span_xl_tiny", []),
                                        ("adaptive_span_tiny", ["--adapt-span-loss", "0"])])
def test_span_models_need_lm_loss(data_dir, arch, extra):
    task, cfg, model = build(data_dir, arch, "cross_entropy", *extra)
    assert lm_loss_terms(model)
    with pytest.raises(ConfigError, match="--criterion lm_loss"):
        task.build_criterion(cfg.criterion)
    task, cfg, _ = build(data_dir, arch, "lm_loss", *extra)
    assert type(task.build_criterion(cfg.criterion)).__name__ == "LMLossCriterion"


@pytest.mark.parametrize("arch", ["transformer_xl_tiny", "composed_alibi_memory_tiny", "fast_weight_tiny"])
def test_other_models_take_any_criterion(data_dir, arch):
    task, cfg, model = build(data_dir, arch, "cross_entropy")
    assert lm_loss_terms(model) == []
    assert type(task.build_criterion(cfg.criterion)).__name__ == "CrossEntropyCriterion"
