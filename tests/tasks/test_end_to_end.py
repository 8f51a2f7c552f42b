"""In process, as a user would run it: fairseq-preprocess -> fairseq-train --task streaming_lm -> fairseq-eval-lm."""
import math
import os

import pytest
from fairseq import checkpoint_utils

from fairseq_ext.criterions.lm_loss import LMLossCriterion
from tests.harness import USER_DIR, fairseq_eval_lm, fairseq_train, split_token_count
from tests.models.base.toy_lm import TOY_ARCH

pytestmark = pytest.mark.slow
B, T = 4, 8


@pytest.fixture(scope="module")
def checkpoint(data_dir, tmp_path_factory) -> str:
    save_dir = str(tmp_path_factory.mktemp("checkpoints"))
    fairseq_train([
        data_dir, "--user-dir", USER_DIR, "--task", "streaming_lm", "--arch", TOY_ARCH, "--toy-aux-coef", "0.01",
        "--criterion", "lm_loss", "--optimizer", "adam", "--lr", "0.01", "--batch-size", str(B),
        "--tokens-per-sample", str(T), "--max-epoch", "2", "--valid-subset", "valid,test", "--save-dir", save_dir,
        "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--seed", "1", "--no-progress-bar",
        "--log-format", "simple", "--log-interval", "5",
    ])
    return os.path.join(save_dir, "checkpoint_last.pt")


def eval_args(data: str, path: str, *extra: str):
    return [data, "--user-dir", USER_DIR, "--task", "streaming_lm", "--path", path, "--gen-subset", "test",
            "--batch-size", "2", "--tokens-per-sample", str(T), "--cpu", "--num-workers", "0", "--no-progress-bar",
            *extra]


def test_training_ran_two_epochs_of_segments(checkpoint, data_dir):
    state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint)
    segments = math.ceil(math.ceil(split_token_count(data_dir, "train") / B) / T)
    assert state["optimizer_history"][-1]["num_updates"] == 2 * segments
    assert state["task_state"]["dictionary_fingerprint"]["size"] == len(open(os.path.join(data_dir, "dict.txt"))
                                                                          .readlines()) + 4


def test_eval_lm_streams_the_split_with_carried_state(checkpoint, data_dir):
    result = fairseq_eval_lm(eval_args(data_dir, checkpoint))
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint])
    model, criterion = models[0], LMLossCriterion(task, sentence_avg=False)
    task.load_dataset("test")
    nll, ntokens = 0.0, 0
    task.begin_valid_epoch(1, model)
    for sample in task.get_batch_iterator(task.dataset("test"), max_sentences=2).next_epoch_itr(shuffle=False):
        _, _, log = task.valid_step(sample, model, criterion)
        nll, ntokens = nll + float(log["nll_loss"]), ntokens + log["ntokens"]
    assert ntokens == split_token_count(data_dir, "test")
    assert float(result["loss"]) == pytest.approx(nll / ntokens / math.log(2), rel=1e-5)
    assert float(result["perplexity"]) == pytest.approx(2 ** float(result["loss"]), rel=1e-5)


def test_eval_lm_rejects_context_window_for_a_stateful_model(checkpoint, data_dir):
    with pytest.raises(ValueError, match="--task streaming_lm without --context-window"):
        fairseq_eval_lm(eval_args(data_dir, checkpoint, "--context-window", "4"))


def test_eval_lm_refuses_data_with_another_dictionary(checkpoint, other_data_dir):
    with pytest.raises(ValueError, match="dictionary mismatch"):
        fairseq_eval_lm(eval_args(other_data_dir, checkpoint))
