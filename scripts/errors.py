"""One last line that names the cause when a bundle run fails.

MONAI's config runner wraps an exception raised inside a config expression in its own
(``RuntimeError: Failed to evaluate ConfigExpression ...``), and MONAI transforms wrap theirs again, so
the real cause sits in the middle of a long chained traceback. `install_excepthook` (run from the
configs' ``initialize``) keeps Python's traceback and adds, as the last line, the first exception in the
chain that the bundle's own code raised (else the innermost one).
"""

from __future__ import annotations

import sys
from pathlib import Path

BUNDLE_CODE = Path(__file__).resolve().parent


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (``__cause__``, else an unsuppressed ``__context__``)."""
    seen, chain = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return chain


def _raised_in_bundle(exc: BaseException) -> bool:
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(BUNDLE_CODE)


def cause_line(exc: BaseException) -> str:
    """``"ERROR (cause): <type>: <message>"`` of the exception that explains ``exc``.

    A message of several lines (a heading and a list of problems) is shown by its first two lines, the
    heading and the first problem, with the count of lines left out (the full message is in the traceback).
    """
    chain = exception_chain(exc)
    cause = next((e for e in chain if _raised_in_bundle(e)), chain[-1])
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    shown = " ".join(lines[:2])
    more = f" (+{len(lines) - 2} more lines above)" if len(lines) > 2 else ""
    return f"ERROR (cause): {type(cause).__name__}: {shown}{more}"


def install_excepthook() -> None:
    """Make an uncaught exception end with `cause_line` after the usual traceback (idempotent)."""
    if getattr(sys.excepthook, "_bundle_cause_line", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            print(cause_line(exc), file=sys.stderr, flush=True)

    hook._bundle_cause_line = True
    sys.excepthook = hook
