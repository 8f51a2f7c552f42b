"""One bench row, trained and run the way ``fairseq-train`` runs it: the one training loop of every bench script.

A row is a list of fairseq-train flags (everything after the data directory: ``--task``, ``--arch`` and the model's
flags, ``--criterion``, the optimizer, ``--tokens-per-sample`` T, ``--batch-size`` B). ``FairseqRow`` parses them
with fairseq's training parser over a temporary ``dict.txt`` of V entries, builds the task, model and criterion
through the registries, and hands them to ``fairseq.trainer.Trainer``; one training step is
``Trainer.train_step`` -- forward over the carried streams, the criterion, backward, ``--clip-norm``, the row's
fairseq optimizer step, ``--fp16`` / ``--bf16`` as fairseq runs them. Inputs are B streams of T tokens drawn from a
Zipf(1) law over the dictionary (fairseq dictionaries are sorted by frequency, so adaptive-softmax clusters see a
text-like share). With ``original=True`` the model is replaced by the reproduction of its original code holding the
same weights, trained with the original's loss computation (``scripts/originals``).

Used by ``scripts/bench.py`` (every family) and the per-family entries (``bench_alibi.py``,
``bench_transformer_xl.py``, ``bench_adaptive_span.py``, ``bench_sha_rnn.py``), which only choose the rows.
"""
from __future__ import annotations

import tempfile
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from benchlib import Result, dtype_flags, fairseq_config, lm_sample, timed, write_dictionary

STREAM_TASK = ["--task", "streaming_lm", "--criterion", "lm_loss"]  # every row's task unless a bench says otherwise
# Adaptive-span parameters by name: ours (``AdaptiveSpanMask.z``, every family and composed layer that has a span)
# and fairseq's example (``AdaptiveMask.current_val``, the adaptive-span original's reproduction).
SPAN_PARAMETERS = (".span.z", "._mask.current_val")


def zipf_tokens(vocab: int, nspecial: int, shape: Tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Token ids nspecial..V-1 with probability proportional to 1 / rank."""
    weights = 1.0 / torch.arange(1, vocab - nspecial + 1, dtype=torch.float64)
    draws = torch.multinomial(weights, shape[0] * shape[1], replacement=True, generator=gen)
    return (draws + nspecial).view(shape)


def matmul_params(model: nn.Module) -> int:
    """Parameters the step multiplies by: every matrix (2-D or more) except tables that are only looked up (an
    embedding whose weight no other module shares; a tied output layer shares it, so it counts). 6 x this per token
    is the model FLOPs of a training step without the attention score and value products; it overstates adaptive
    softmax tails, which only their cluster's tokens reach."""
    owners: Dict[int, List[nn.Module]] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(module)
    return sum(p.numel() for p in model.parameters()  # parameters() lists a shared tensor once
               if p.dim() >= 2 and not all(isinstance(m, nn.Embedding) for m in owners[id(p)]))


class FairseqRow:
    """Task, model, criterion and fairseq ``Trainer`` of one row of flags, and its stream of samples."""

    def __init__(self, flags: Sequence[str], vocab: int, device: str, dtype: str = "fp32", seed: int = 1,
                 original: bool = False, samples: int = 4) -> None:
        import fairseq_ext  # noqa: F401  (registers the models, streaming_lm, lm_loss, the optimizers)
        from fairseq import tasks, utils
        from fairseq.trainer import Trainer

        self.device, self.vocab = torch.device(device), vocab
        own = [*flags, "--seed", str(seed), *(["--cpu"] if self.device.type == "cpu" else []),
               *dtype_flags(self.device.type, dtype)]
        with tempfile.TemporaryDirectory(prefix="bench_dict_") as data_dir:
            write_dictionary(data_dir, vocab)
            self.cfg = fairseq_config([data_dir, *own])
            utils.set_torch_seed(seed)
            self.task = tasks.setup_task(self.cfg.task)
            model = self.task.build_model(self.cfg.model)
            named = list(model.named_parameters())  # an original reproduction holds these same weights
            self.params = (sum(p.numel() for _, p in named),
                           sum(p.numel() for n, p in named if n.startswith("decoder.layers.")))
            self.matmul_params = matmul_params(model)
            criterion = self.task.build_criterion(self.cfg.criterion)
            if original:
                from originals import original_criterion, original_of

                model = original_of(model, self.cfg, self.task)
                criterion = original_criterion(self.cfg, self.task, model)
            self.trainer = Trainer(self.cfg, self.task, model, criterion)
        self.model = self.trainer.model  # moved to the device (and cast by fairseq's --bf16 / --fp16)
        self.decoder = self.model.decoder
        if hasattr(self.decoder, "attach_streams"):  # ours; a stock fairseq decoder carries nothing
            self.decoder.attach_streams("bench")  # consecutive samples continue the same B streams
        self.batch, self.length = int(self.cfg.dataset.batch_size), int(self.cfg.task.tokens_per_sample)
        self.nspecial = self.task.dictionary.nspecial
        self.gen = torch.Generator().manual_seed(seed)
        self.samples = [self.sample(self.batch, self.length) for _ in range(samples)]
        self.count = 0
        self.pinned: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, value it is reset to)

    @property
    def tokens(self) -> int:
        """Tokens of one step: B x T."""
        return self.batch * self.length

    def sample(self, batch: int, length: int) -> Result:
        return lm_sample(zipf_tokens(self.vocab, self.nspecial, (batch, length + 1), self.gen), self.device)

    def next_sample(self) -> Result:
        self.count += 1
        return self.samples[self.count % len(self.samples)]

    def train_step(self) -> None:
        self.trainer.train_step([self.next_sample()])
        with torch.no_grad():
            for param, value in self.pinned:
                param.copy_(value)

    def pin(self, suffixes: Sequence[str] = SPAN_PARAMETERS) -> int:
        """Reset the parameters whose names end with one of ``suffixes`` to their present values after every
        training step, which still computes their gradients and optimizer update: with the adaptive spans pinned,
        the windows, and so the work per step, stay fixed, while an optimizer like Adagrad would move a span by
        lr x its maximum in one step. Returns the number of pinned parameters."""
        ends = tuple(suffixes)
        self.pinned = [(p, p.detach().clone()) for n, p in self.model.named_parameters() if n.endswith(ends)]
        return len(self.pinned)

    def fill(self, count: int) -> None:
        """``count`` no-grad training-mode forwards: the carried state (memories, caches) grows without a step."""
        self.model.train()
        with torch.no_grad():
            for _ in range(count):
                self.model(self.next_sample()["net_input"]["src_tokens"])

    @property
    def carries_state(self) -> bool:
        return bool(getattr(self.decoder, "carries_state", False))

    def reset_eval_state(self) -> None:
        from fairseq_ext.models.base.stateful_decoder import reset_stream_state

        if hasattr(self.model, "reset"):  # an original reproduction carries its own state
            self.model.reset()
        else:
            reset_stream_state(self.model, "eval")

    def eval_forward(self) -> None:
        self.model(self.next_sample()["net_input"]["src_tokens"])

    def generate(self, prompt: int, new: int) -> List[float]:
        """Seconds of each of ``new`` greedy incremental decoding steps of one stream after a ``prompt``."""
        tokens = zipf_tokens(self.vocab, self.nspecial, (1, prompt), self.gen).to(self.device)
        incremental_state: Dict[str, Any] = {}

        def step() -> None:
            nonlocal tokens
            net_output = self.model(tokens, incremental_state=incremental_state)
            log_probs = self.model.get_normalized_probs((net_output[0][:, -1:], net_output[1]), log_probs=True)
            tokens = torch.cat([tokens, log_probs[:, -1].argmax(-1, keepdim=True)], dim=1)  # (1, n + 1)

        step()  # the prompt
        return timed(step, new, self.device)

