"""The ``clipmask`` console command and ``python -m clipmask``: the Rust program itself, run
in-process (same flags, outputs, exit codes and signal handling as the binary)."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> None:
    from . import _load_native

    import signal

    native = _load_native()
    # The program handles SIGINT itself (finish the image in flight, exit 130), as the binary
    # does; Python's handler would also raise KeyboardInterrupt afterwards. SIG_IGN inherited
    # from the parent (nohup, background jobs) is kept: the program then ignores it too.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    args = ["clipmask", *(sys.argv[1:] if argv is None else list(argv))]
    sys.stdout.flush()
    sys.stderr.flush()
    code = native.main(args)
    sys.exit(code)
