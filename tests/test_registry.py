"""Every registered name resolves to a class defined in fairseq_ext, after a plain import and through a fresh
``--user-dir`` import (fairseq's own mechanism), and none shadows a fairseq core name."""
import json
import subprocess
import sys

from tests.harness import REPO_ROOT, USER_DIR

EXPECTED = {
    "model": ["alibi_lm", "transformer_xl_lm", "adaptive_span_lm", "fast_weight_lm", "sha_rnn_lm", "composed_lm"],
    "arch": ["alibi_lm", "alibi_lm_wiki103", "alibi_lm_gpt2_small", "alibi_lm_tiny",
             "transformer_xl_lm", "transformer_xl_wiki103_base", "transformer_xl_wiki103_large",
             "transformer_xl_enwik8_base", "transformer_xl_enwik8_large", "transformer_xl_text8_base",
             "transformer_xl_text8_large", "transformer_xl_wiki103_nvidia_base", "transformer_xl_wiki103_nvidia_large",
             "transformer_xl_tiny", "adaptive_span_lm", "adaptive_span_enwik8_small", "adaptive_span_enwik8",
             "adaptive_span_enwik8_large", "adaptive_span_text8", "adaptive_span_text8_large",
             "all_attention_enwik8_small", "all_attention_enwik8", "all_attention_wiki103", "adaptive_span_tiny",
             "fast_weight_lm", "fast_weight_wiki103_small_transformer", "fast_weight_wiki103_small_fwm",
             "fast_weight_wiki103_small_fwm_carry_over", "fast_weight_wiki103_medium_transformer",
             "fast_weight_wiki103_medium_fwm", "fast_weight_wiki103_medium_fwm_carry_over", "fast_weight_tiny",
             "sha_rnn_lm", "sha_rnn_enwik8", "sha_rnn_enwik8_full_attn", "sha_rnn_tiny",
             "composed_lm", "composed_alibi_memory_wiki103", "composed_delta_persistent_wiki103",
             "composed_span_xl_enwik8", "composed_hybrid_delta_wiki103", "composed_alibi_memory_tiny",
             "composed_delta_persistent_tiny", "composed_span_xl_tiny", "composed_hybrid_delta_tiny"],
    "task": ["streaming_lm"],
    "criterion": ["lm_loss"],
    "optimizer": ["lamb_torch", "adagrad_clip"],
    "lr_scheduler": ["cosine_warmup_xl"],
}

PROBE = r"""
import argparse, json, sys
from fairseq import utils
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY
from fairseq.optim import OPTIMIZER_REGISTRY
from fairseq.optim.lr_scheduler import LR_SCHEDULER_REGISTRY
from fairseq.tasks import TASK_REGISTRY
registries = {"model": MODEL_REGISTRY, "arch": ARCH_MODEL_REGISTRY, "task": TASK_REGISTRY,
              "criterion": CRITERION_REGISTRY, "optimizer": OPTIMIZER_REGISTRY, "lr_scheduler": LR_SCHEDULER_REGISTRY}
before = {kind: set(reg) for kind, reg in registries.items()}
if sys.argv[1] == "user-dir":
    utils.import_user_module(argparse.Namespace(user_dir=sys.argv[2]))
else:
    import fairseq_ext  # noqa: F401
out = {kind: {name: reg[name].__module__ for name in reg if name not in before[kind]}
       for kind, reg in registries.items()}
out["shadowed"] = {kind: sorted(set(reg) & before[kind] & set(json.loads(sys.argv[3])[kind]))
                   for kind, reg in registries.items()}
print(json.dumps(out))
"""


def probe(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode, USER_DIR, json.dumps(EXPECTED)], cwd="/",
                          env={"PYTHONPATH": REPO_ROOT if mode == "import" else "", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(found: dict) -> None:
    for kind, names in EXPECTED.items():
        for name in names:
            assert name in found[kind], f"{kind} {name!r} is not registered"
            assert found[kind][name].startswith("fairseq_ext."), f"{kind} {name!r} -> {found[kind][name]}"
        assert not found["shadowed"][kind], f"{kind} names already taken by fairseq: {found['shadowed'][kind]}"


def test_registry_after_plain_import():
    check(probe("import"))


def test_registry_through_fresh_user_dir_import():
    check(probe("user-dir"))
