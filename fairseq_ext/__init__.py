"""fairseq_ext: long-context language models as a fairseq plugin (``--user-dir fairseq_ext``).

fairseq auto-imports only ``models/`` and ``tasks/`` under ``--user-dir`` (and nothing at all when the package was
already imported), so every registry-populating subpackage is imported here explicitly.
"""
from . import compat

compat.apply()  # fairseq shims (fairseq_ext/compat): before anything is built

from . import criterions, models, optim, tasks  # noqa: E402,F401  (registers everything with fairseq)

__version__ = "0.1.0"
