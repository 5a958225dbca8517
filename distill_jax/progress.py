"""Progress of the long loops: a bar on a terminal, log lines everywhere else.

Process 0 of a terminal session draws a tqdm bar (steps done, rate, ETA, and
the latest loss as its postfix); in a notebook, a log file, CI or any other
process the same loop writes plain log lines instead, at the pace the caller
asks for. `DISTILL_JAX_PROGRESS=bar|log` overrides the choice (e.g. `bar`
under a terminal multiplexer that hides the tty, `log` to keep a terminal's
scrollback as plain lines).
"""

import logging
import os
import sys
import time

import jax

ENV = "DISTILL_JAX_PROGRESS"


def bars_enabled() -> bool:
    """Whether this process draws bars (process 0, on a terminal, unless overridden)."""
    if jax.process_index() != 0:
        return False
    mode = os.environ.get(ENV, "auto")
    if mode not in ("auto", "bar", "log"):
        raise ValueError(f"{ENV}={mode!r}: expected 'auto', 'bar' or 'log'.")
    if mode != "auto":
        return mode == "bar"
    return sys.stdout.isatty() and sys.stderr.isatty()


class Progress:
    """One loop's progress: `update()` per step, `note()` for a line of news.

    Args:
      desc: what the loop is, e.g. '[teacher] train'.
      total: the number of steps it will run.
      initial: steps already done (a resumed stage).
      unit: what one step is ('step', 'batch', 'phase').
      logger: where the log lines go when no bar is drawn.
      bar: force a bar (True) or log lines (False); None decides by `bars_enabled`.
    """

    def __init__(
        self,
        desc: str,
        total: int,
        *,
        initial: int = 0,
        unit: str = "step",
        logger: logging.Logger | None = None,
        bar: bool | None = None,
    ):
        self.desc, self.total, self.n, self.unit = desc, total, initial, unit
        self.log = logger or logging.getLogger("distill_jax")
        self._bar = None
        if bar if bar is not None else bars_enabled():
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=True
            )
        self._t_window, self._n_window = time.time(), initial

    @property
    def is_bar(self) -> bool:
        return self._bar is not None

    def update(self, n: int = 1, **postfix: float) -> None:
        """Advances by `n`; `postfix` values show on the bar (and nothing is logged)."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def rate(self) -> tuple[float, float]:
        """(steps per second since the last call, seconds left at that rate)."""
        now = time.time()
        rate = (self.n - self._n_window) / max(now - self._t_window, 1e-9)
        self._t_window, self._n_window = now, self.n
        return rate, (self.total - self.n) / max(rate, 1e-9)

    def note(self, msg: str, *args) -> None:
        """A line of news (an evaluation, a stop): above the bar, or a log line."""
        if self._bar is not None:
            self._bar.write(msg % args if args else msg)
        else:
            self.log.info(msg, *args)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
