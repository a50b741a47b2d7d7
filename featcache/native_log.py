"""Native libraries' log lines kept off the user's terminal, unless what they guard fails.

TensorFlow's C++ core writes straight to file descriptor 2 (start-up notes about CUDA stubs and CPU
instructions, a oneDNN note the first time a float16 op is optimised); Python's sys.stderr cannot
filter it. `quiet_stderr()` points descriptor 2 at a temporary file for the duration and prints what
was captured only if the block raises.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile


@contextlib.contextmanager
def quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
