"""``python -m tests.compat.interrupting_train FAIRSEQ-TRAIN-ARGS``: fairseq-train that sends itself SIGINT while a
checkpoint file is being written, as a Ctrl-C at that moment would.

INTERRUPT_SAVE=k: the k-th ``torch.save`` of the run (1-based) is interrupted once its first MiB has been written;
INTERRUPTS=n: how many SIGINTs, one per MiB written (1: finish the save, then stop; 2: abort the save).
"""
import os
import signal
import sys

import torch

import fairseq_ext  # noqa: F401  (the shims under test)

CHUNK = 1 << 20


class InterruptingFile:
    """A file object that delivers one interrupt per CHUNK bytes gone through it, ``interrupts`` in all."""

    def __init__(self, file, interrupts: int) -> None:
        self.file, self.interrupts, self.written, self.sent = file, interrupts, 0, 0

    def write(self, data) -> int:
        self.written += len(data)
        if self.sent < self.interrupts and self.written >= (self.sent + 1) * CHUNK:
            self.sent += 1
            os.kill(os.getpid(), signal.SIGINT)  # its handler runs before the next write
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def main() -> None:
    target, interrupts = int(os.environ["INTERRUPT_SAVE"]), int(os.environ.get("INTERRUPTS", "1"))
    original_save, saves = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        saves[0] += 1
        if saves[0] == target and hasattr(f, "write"):
            f = InterruptingFile(f, interrupts)
        return original_save(obj, f, *args, **kwargs)

    torch.save = save
    from fairseq_cli import train

    sys.argv = ["fairseq-train", *sys.argv[1:]]
    train.cli_main()


if __name__ == "__main__":
    main()
