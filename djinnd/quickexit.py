"""End a command's process without tearing its modules down.

With torch and transformers imported, Python's own teardown (module dicts, then a full collection)
took 2.2 s of CPU a process here, on top of whatever the command did: every `djinn` run and every
daemon's stop paid it. The exit handlers still run (log handlers flushed, temporary folders
removed), and threads that are not daemons are waited for, as a normal exit does (in its order:
threading's own exit hooks first, which end concurrent.futures' workers).
"""

import atexit
import os
import sys
import threading
from typing import Callable, NoReturn


def run(main: Callable[[], object]) -> NoReturn:
    """main(), then the process ends with its exit status (an uncaught exception is printed, status 1)."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback, status 1
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # as the interpreter's exit: threading's exit hooks (executors' workers end), then
    atexit._run_exitfuncs()  # the threads that are not daemons joined; then the exit handlers
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
