"""One line for user mistakes (``fairseq_ext.compat.errors``, ``fairseq_ext.errors``)."""
import subprocess
import sys

import pytest

from fairseq_ext.compat.errors import find_user_error
from fairseq_ext.errors import ConfigError, DataError, MissingFileError, UserError


def test_a_user_error_wrapped_by_fairseq_is_still_found():
    """fairseq's Trainer.load_checkpoint re-raises any failure as a generic Exception ("Cannot load model
    parameters ..."): the hook follows the context chain to the user's error."""
    try:
        try:
            raise DataError("dictionary mismatch: ...")
        except Exception:
            raise Exception("Cannot load model parameters from checkpoint x")
    except Exception as error:
        assert isinstance(find_user_error(error), DataError)
    assert find_user_error(RuntimeError("a bug")) is None


@pytest.mark.parametrize("cls, base", [(ConfigError, ValueError), (DataError, ValueError),
                                       (MissingFileError, FileNotFoundError)])
def test_user_errors_are_the_builtin_errors_callers_catch(cls, base):
    assert issubclass(cls, UserError) and issubclass(cls, base)


def test_an_error_rebuilt_from_a_data_loader_worker_keeps_only_its_message():
    text = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            "  File \"x.py\", line 1, in f\nfairseq_ext.errors.DataError: valid.bin is truncated: re-run it")
    assert str(DataError(text)) == "valid.bin is truncated: re-run it"


def test_a_command_prints_a_user_error_as_one_line_and_a_bug_with_its_traceback():
    program = ("import fairseq_ext, sys\n"
               "from fairseq_ext.errors import ConfigError\n"
               "raise (ConfigError('--x 0 is impossible: use --x 1') if sys.argv[1] == 'user' else "
               "RuntimeError('a bug'))\n")
    user = subprocess.run([sys.executable, "-c", program, "user"], capture_output=True, text=True, timeout=120)
    assert user.returncode == 1 and user.stderr.strip().splitlines()[-1] == "error: --x 0 is impossible: use --x 1"
    assert "Traceback" not in user.stderr
    bug = subprocess.run([sys.executable, "-c", program, "bug"], capture_output=True, text=True, timeout=120)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "RuntimeError: a bug" in bug.stderr
