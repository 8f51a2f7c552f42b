"""scripts/bench.py, the one benchmark of every family: the quick run (a fresh subprocess per row, the default)
measures every family at every length, writes bench.json and bench.md, and the printed table shows the JSON's
numbers; rows given as fairseq flags; interleaved repeats; bad input fails naming the fix."""
import json
import os
import subprocess
import sys
from types import ModuleType

import pytest

from tests.harness import REPO_ROOT
from tests.scripts.tables import number, parse_tables, script_module

SCRIPT = os.path.join(REPO_ROOT, "scripts", "bench.py")
SPEEDS = ("train tok/s", "stream tok/s", "gen tok/s (short)", "gen tok/s (long)")
JSON_KEYS = {"train tok/s": "train", "stream tok/s": "stream", "sliding tok/s": "sliding",
             "gen tok/s (short)": "gen_short", "gen tok/s (long)": "gen_long", "peak MB": "peak_mb"}


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return script_module("bench")


def _check_table_matches_json(stdout: str, report: dict) -> list:
    (table,) = parse_tables(stdout)
    assert len(table) == len(report["rows"])
    for cells, row in zip(table, report["rows"]):
        assert (cells["model"], int(cells["T"])) == (row["model"], row["T"])
        assert cells["arch"] == row["arch"] and row["status"] == "ok", row
        for header, key in JSON_KEYS.items():
            if key in row:  # the printed cell is the JSON value, rounded as printed
                digits = 1 if key == "peak_mb" else 0
                assert number(cells[header]) == round(row[key], digits), (header, cells, row)
        assert len(row["runs"]) == report["repeats"]
        for run in row["runs"]:
            assert run["load_before"] >= 0 and run["load_after"] >= 0
    return table


@pytest.mark.slow
def test_quick_run_measures_every_family_and_writes_json_and_table(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=900, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert (out / "bench.md").read_text() == proc.stdout
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "python" in report["command"] and "--quick" in report["command"]
    assert report["machine"]["torch"] and report["machine"]["cpus"] >= 1 and "CPU" in report["machine"]["device"]
    table = _check_table_matches_json(proc.stdout, report)
    families = ["alibi", "transformer_xl", "adaptive_span", "fast_weight_delta", "sha_rnn", "composed_hybrid"]
    assert [(c["model"], c["T"]) for c in table] == [(f, t) for f in families for t in ("16", "32")]
    for cells in table:
        for header in SPEEDS:
            assert number(cells[header]) > 0, (header, cells)
        assert number(cells["peak MB"]) > 0
        assert number(cells["params (layers)"].split()[0]) > 0
        # only a model that carries nothing across segments has a sliding-window protocol
        assert (cells["sliding tok/s"] == "n/a") == (cells["model"] != "alibi"), cells


def test_rows_from_flags_interleaved_repeats(bench, tmp_path, capsys):
    flags = "--arch transformer_xl_lm --decoder-layers 1 --decoder-embed-dim 16 --decoder-attention-heads 2 " \
            "--decoder-ffn-embed-dim 32 --mem-len {T} --dropout 0.1"
    stock = "--arch transformer_lm --decoder-layers 1 --decoder-embed-dim 16 --decoder-input-dim 16 " \
            "--decoder-output-dim 16 --decoder-ffn-embed-dim 32 --decoder-attention-heads 2"  # fairseq's own model
    argv = ["--quick", "--models", "none", "--model", f"xl-small={flags}", "--model", "alibi=--arch alibi_lm_tiny",
            "--model", f"sinusoidal={stock}", "--lengths", "8", "--repeats", "2", "--in-process", "--metrics",
            "train,sliding", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    table = _check_table_matches_json(capsys.readouterr().out, report)
    assert [c["model"] for c in table] == ["xl-small", "alibi", "sinusoidal"]
    xl, alibi, sinusoidal = report["rows"]
    assert sinusoidal["arch"] == "transformer_lm" and not sinusoidal["carries_state"] and sinusoidal["sliding"] > 0
    assert xl["flags"].endswith("--mem-len 8 --dropout 0.1") and xl["params"] < 10000  # {T} replaced, own size
    assert xl["carries_state"] and "sliding" not in xl and "stream" not in xl
    assert alibi["sliding"] > 0 and "gen_short" not in alibi
    assert [r["repeat"] for r in xl["runs"]] == [0, 1]
    assert xl["train"] == max(r["train"] for r in xl["runs"])  # best of the interleaved runs
    cells = {c["model"]: c for c in table}
    assert cells["xl-small"]["stream tok/s"] == "—" and cells["xl-small"]["sliding tok/s"] == "n/a"


@pytest.mark.parametrize("argv, message", [
    (["--model", "x=--decoder-layers 2"], "with --arch among the flags"),
    (["--models", "nope"], "unknown 'nope'"),
    (["--metrics", "train,speed"], "unknown ['speed']"),
    (["--dtype", "bf16", "--device", "cpu"], "needs --device cuda"),
    (["--lengths", "0"], "positive integers"),
    (["--original", "nope"], "--original nope: not a row label"),
    (["--original", "fast_weight_delta"], "no reproduction of the original code for --arch fast_weight_tiny"),
    (["--tokens-per-batch", "0"], "--tokens-per-batch must be >= 1"),
])
def test_bad_arguments_name_the_fix(bench, argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        bench.parse_args(["--quick", *argv])
    assert message in str(err.value) + capsys.readouterr().err


def test_original_rows_train_beside_ours_and_print_the_ratio(bench, tmp_path, capsys):
    """--original LABEL adds LABEL-original after LABEL (same flags, the original code's algorithm holding the same
    weights), interleaved; it has no incremental decoding ("n/a"); the ratio lines are the JSON's numbers."""
    argv = ["--quick", "--models", "transformer_xl", "sha_rnn", "--original", "transformer_xl", "--original",
            "sha_rnn", "--lengths", "8", "--repeats", "2", "--in-process", "--metrics", "train,stream,gen_short",
            "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    stdout = capsys.readouterr().out
    report = json.loads((tmp_path / "bench.json").read_text())
    table = _check_table_matches_json(stdout, report)
    assert [c["model"] for c in table] == ["transformer_xl", "transformer_xl-original", "sha_rnn", "sha_rnn-original"]
    rows = {r["model"]: r for r in report["rows"]}
    for label in ("transformer_xl", "sha_rnn"):
        ours, original = rows[label], rows[f"{label}-original"]
        assert original["original"] and not ours["original"] and original["flags"] == ours["flags"]
        assert original["params"] == ours["params"] and original["stream"] > 0 and "gen_short" not in original
        assert [r["repeat"] for r in original["runs"]] == [0, 1]
        pairs = [a["train"] / b["train"] for a, b in zip(ours["runs"], original["runs"])]  # runs in repeat order
        ratio = (f"train {ours['train'] / original['train']:.2f}x (median "
                 f"{ours['train_median'] / original['train_median']:.2f}x; "
                 f"pairs {min(pairs):.2f}-{max(pairs):.2f}x); "
                 f"stream {ours['stream'] / original['stream']:.2f}x")
        assert f"- {label} / {label}-original, T 8, 2 interleaved run(s): {ratio}" in stdout
    cells = {c["model"]: c for c in table}
    assert cells["sha_rnn-original"]["gen tok/s (short)"] == "n/a" and number(cells["sha_rnn"]["gen tok/s (short)"]) > 0


def test_pair_ratios_pair_runs_of_the_same_repeat(bench):
    """The spread on the ratio line divides runs of the same repeat only, skipping a run that has no number (OOM)."""
    ours = {"runs": [{"repeat": 0, "train": 30.0}, {"repeat": 1, "train": 20.0}, {"repeat": 2, "status": "OOM"}]}
    original = {"runs": [{"repeat": 1, "train": 10.0}, {"repeat": 0, "train": 20.0}, {"repeat": 2, "train": 5.0}]}
    assert bench.pair_ratios(ours, original, "train") == [1.5, 2.0]
    assert bench.pair_spread(ours, original, "train") == "; pairs 1.50-2.00x"
    assert bench.pair_spread({"runs": ours["runs"][:1]}, original, "train") == ""


@pytest.mark.parametrize("label, flags", [
    ("alibi", "--arch alibi_lm_tiny --dropout 0.1"),
    ("transformer_xl", "--arch transformer_xl_tiny --mem-len {T} --dropout 0.1"),
    ("sha_rnn", "--arch sha_rnn_tiny --max-memory {W} --attn-layers 0,1"),
])
def test_original_row_computes_our_loss(bench, label, flags):
    """The original's reproduction, built for a row from the same seed, holds our weights: through the same lm_loss
    it gives our loss on consecutive segments with carried state (eval mode), and its own gradients in training."""
    import torch

    opts = bench.parse_args(["--quick", "--in-process"])
    ours, original = (bench.build_row(opts, flags, 8, original=o) for o in (False, True))
    assert type(original.model).__name__ in ("OriginalLM", "TransformerLanguageModel")
    assert original.params == ours.params
    assert sum(p.numel() for p in original.model.parameters()) == ours.params[0]
    criterion = ours.trainer.criterion
    for b in (ours, original):
        b.model.eval()
        b.reset_eval_state()
    with torch.no_grad():
        for sample in ours.samples[:3]:
            (loss, size, log), (their_loss, their_size, _) = (criterion(b.model, sample) for b in (ours, original))
            assert size == their_size == log["ntokens"] > 0
            torch.testing.assert_close(their_loss, loss, rtol=1e-5, atol=1e-4)
    original.model.train()
    loss, size, _ = criterion(original.model, ours.samples[0])
    loss.backward()
    assert all(p.grad is not None for p in original.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("pin", [False, True])
def test_pin_spans_keeps_both_sides_windows_while_the_spans_train(bench, pin):
    """Adagrad moves a span by lr x its maximum in one step, and ours and the original learn different spans; with
    --pin-spans every span of ours and of fairseq's port is back at --adapt-span-init after each training step,
    which still computed its gradient; without it they move."""
    flags = ("--arch adaptive_span_tiny --attn-span 64 --adapt-span-ramp 8 --adapt-span-init 0.5 "
             "--optimizer adagrad_clip --adagrad-clip 0.03 --lr 0.07")
    argv = ["--quick", "--in-process", "--models", "none", "--model", f"span={flags}", "--original", "span"]
    opts = bench.parse_args(argv + (["--pin-spans"] if pin else []))
    for original in (False, True):
        row = bench.build_row(opts, flags, 16, original=original)
        layers = int(row.cfg.model.decoder_layers)
        assert len(row.pinned) == (layers if pin else 0)
        spans = [p for n, p in row.model.named_parameters() if n.endswith(("span.z", "current_val"))]
        assert len(spans) == layers
        for _ in range(3):  # the port's spans get no gradient while their ramps cover the zero-filled first cache
            row.train_step()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in spans)
        moved = max(float((p.detach() - 0.5).abs().max()) for p in spans)
        assert moved == 0.0 if pin else moved > 0.05, (original, moved)


def test_tokens_per_batch_sets_b_per_length(bench, tmp_path, capsys):
    argv = ["--quick", "--models", "alibi", "--lengths", "8,16", "--tokens-per-batch", "40", "--in-process",
            "--metrics", "train", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    table = _check_table_matches_json(capsys.readouterr().out, json.loads((tmp_path / "bench.json").read_text()))
    assert [(c["T"], c["B"]) for c in table] == [("8", "5"), ("16", "2")]  # max(1, 40 // T)


def test_merge_combines_runs_into_one_table_json_and_plot(bench, tmp_path, capsys):
    """A length rerun alone replaces the first run's failed row; rows keep their source command; the plot covers
    every length; runs of another vocabulary are refused."""
    def run(name, models, lengths, *extra):
        argv = ["--quick", "--models", *models, "--lengths", lengths, "--in-process", "--metrics", "train",
                "--out", str(tmp_path / name), *extra]
        assert bench.main(argv) == 0
        capsys.readouterr()
        return tmp_path / name / "bench.json"

    first, rerun = run("first", ["alibi", "sha_rnn"], "8,16"), run("rerun", ["sha_rnn"], "16")
    report = json.loads(first.read_text())
    report["rows"][3] = {**{k: report["rows"][3][k] for k in ("model", "T", "B")}, "status": "TIMEOUT"}
    first.write_text(json.dumps(report))
    assert bench.main(["--merge", str(first), str(rerun), "--out", str(tmp_path / "merged")]) == 0
    stdout = capsys.readouterr().out
    merged = json.loads((tmp_path / "merged" / "bench.json").read_text())
    assert stdout == (tmp_path / "merged" / "bench.md").read_text()
    assert (tmp_path / "merged" / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert [(r["model"], r["T"]) for r in merged["rows"]] == [("alibi", 8), ("alibi", 16), ("sha_rnn", 8),
                                                                ("sha_rnn", 16)]
    replaced = merged["rows"][3]
    assert replaced["status"] == "ok" and replaced["train"] == json.loads(rerun.read_text())["rows"][0]["train"]
    assert "rerun" in replaced["source"] and "first" in merged["rows"][0]["source"]
    assert merged["merged_from"] == [report["command"], json.loads(rerun.read_text())["command"]]
    (table,) = parse_tables(stdout)
    assert [number(c["train tok/s"]) for c in table] == [round(r["train"]) for r in merged["rows"]]
    assert stdout.count("- command: `") == 2 and "rows merged from these runs" in stdout
    again = tmp_path / "again"  # a merged file merges again: its rows and commands keep their sources
    assert bench.main(["--merge", str(tmp_path / "merged" / "bench.json"), "--out", str(again)]) == 0
    capsys.readouterr()
    twice = json.loads((again / "bench.json").read_text())
    assert twice["merged_from"] == merged["merged_from"] and twice["rows"] == merged["rows"]
    other = run("other", ["alibi"], "8", "--vocab", "80")
    with pytest.raises(SystemExit, match="has vocab 80, .* 64: only runs of the same"):
        bench.main(["--merge", str(first), str(other), "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="no file .*nope.json"):
        bench.main(["--merge", str(tmp_path / "nope.json")])


def test_allocation_failures_count_as_oom():
    benchlib = script_module("benchlib")
    assert benchlib.is_oom(MemoryError("std::bad_alloc"))  # the profiler's teardown after a failed 16k step
    assert benchlib.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 16 bytes"))
    assert not benchlib.is_oom(RuntimeError("shape mismatch"))


def test_cpu_peak_replays_allocations_inside_the_window():
    import torch

    benchlib = script_module("benchlib")
    mib = 1 << 20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        before = torch.empty(mib, dtype=torch.uint8)
        with torch.profiler.record_function("window"):
            transient = torch.empty(2 * mib, dtype=torch.uint8)
            del transient
            kept = torch.empty(mib, dtype=torch.uint8)
    assert before.numel() + kept.numel() == 2 * mib
    assert benchlib.cpu_peak_bytes(prof, "window") == 3 * mib


MAPPED_BLOCKS_PROBE = """
import ctypes, os, sys
import torch
sys.path.insert(0, os.path.join(sys.argv[1], "scripts"))
import benchlib

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]

libc = benchlib.glibc()
if libc is None or not hasattr(libc, "mallinfo2"):
    print("SKIP")
    sys.exit(0)
libc.mallinfo2.restype = Mallinfo2

def mapped_growth(size):  # bytes glibc put in blocks of their own mapping (mallinfo2's hblkhd) for one block
    libc.malloc_trim(0)  # no free heap top left to serve it: the block needs new memory, heap or mapping
    before = libc.mallinfo2().hblkhd
    block = torch.empty(size, dtype=torch.uint8)
    grown = libc.mallinfo2().hblkhd - before
    del block
    return grown

torch.empty(24 << 20, dtype=torch.uint8)  # freed at once: glibc's dynamic threshold rises to 24 MiB
size = 12 << 20
print(mapped_growth(size))  # heap: as in any process after its first large free
with benchlib.unfragmented_heap():
    print(mapped_growth(size))  # its own mapping
print(mapped_growth(size))  # heap again: the steady 32 MiB threshold
print(mapped_growth(40 << 20))  # above it: still a mapping
"""


def test_profiled_warm_up_maps_large_blocks_and_leaves_glibc_steady_thresholds():
    """glibc's dynamic threshold puts blocks up to 32 MiB on the heap after a large free, where the profiler's
    small allocations fragment it (ALiBi at 16k: 17.8 GB resident profiled, 2.4 GB not); inside
    ``unfragmented_heap`` a 12 MiB block that needs new memory is its own mapping, after it the heap grows for it
    again. In a fresh process, the heap trimmed before each block: free heap space of the size serves a block
    whatever the threshold (the fix is about where the heap would grow)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    proc = subprocess.run([sys.executable, "-c", MAPPED_BLOCKS_PROBE, str(REPO_ROOT)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if proc.stdout.strip() == "SKIP":
        pytest.skip("needs glibc >= 2.33 (mallopt, mallinfo2)")
    before, inside, after, large = (int(x) for x in proc.stdout.split())
    assert before == 0 and inside >= 12 << 20 and after == 0 and large >= 40 << 20, proc.stdout


def test_zipf_tokens_and_dictionary(tmp_path):
    import torch
    from fairseq.data import Dictionary

    benchrow = script_module("benchrow")
    tokens = benchrow.zipf_tokens(1000, 4, (4, 500), torch.Generator().manual_seed(0))
    assert tokens.shape == (4, 500) and tokens.min() >= 4 and tokens.max() < 1000
    assert (tokens == 4).float().mean() > (tokens >= 500).float().mean() / 10  # rank 1 is the most frequent
    benchrow.write_dictionary(str(tmp_path), 50)
    assert len(Dictionary.load(str(tmp_path / "dict.txt"))) == 50


def test_matmul_params_skip_lookup_tables_and_count_a_tied_table_once():
    from torch import nn

    benchrow = script_module("benchrow")

    def lm(tied: bool) -> nn.Module:
        model = nn.Module()
        model.embed = nn.Embedding(10, 4)  # 40: a lookup, unless the output layer shares it
        model.ffn = nn.Linear(4, 4)  # 16 + a bias (1-D: not a matrix)
        model.out = nn.Linear(4, 10, bias=False)  # 40
        if tied:
            model.out.weight = model.embed.weight
        return model

    assert benchrow.matmul_params(lm(tied=False)) == 16 + 40  # the input table excluded
    assert benchrow.matmul_params(lm(tied=True)) == 16 + 40  # the shared table counted once, as the output layer


def test_peak_tflops_adds_the_mfu_column(bench, tmp_path, capsys):
    argv = ["--quick", "--models", "alibi", "--lengths", "16", "--in-process", "--metrics", "train",
            "--peak-tflops", "0.5", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    (cells,) = parse_tables(capsys.readouterr().out)[0]
    assert row["flops_per_token"] == 6 * script_module("benchrow").matmul_params(
        bench.build_row(bench.parse_args(argv), "--arch alibi_lm_tiny", 16).trainer.model)
    assert cells["MFU (6N)"] == f"{100 * row['train'] * row['flops_per_token'] / 0.5e12:.1f}%"
    with pytest.raises(SystemExit, match="--peak-tflops must be > 0"):
        bench.parse_args(["--quick", "--peak-tflops", "0"])
