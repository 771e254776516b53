"""Live progress from inside a study to the batch that runs it.

A notebook runs in its own kernel, so the batch's bar (`make reproduce`) cannot see the bars the study draws. Every
long loop draws its bar through `bar` (a tqdm, notebook widget where one renders), and each study names what it is
on with `stage` (technique n of N); both also publish a one-line state to the file named by $EFFLLM_PROGRESS_FILE
when the batch runner sets it, at most once a second, written atomically. The runner polls it (`relay`) and shows it
beside the study's name: `reproduce[tiny]: 3/11 [attention: mqa at tiny, seed 0 (3 of 5) | attention tiny mqa ...]`.
Without the variable (a notebook opened in JupyterLab) nothing is written. Publishing happens in tqdm's refresh,
which the training loop triggers between steps, so it stays outside every timed step; the hardware study's
telemetry-overhead A/B runs this same bar. Publishing never raises: progress is a courtesy.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from tqdm.auto import tqdm as _auto_tqdm
from tqdm.std import tqdm as _std_tqdm

ENV = "EFFLLM_PROGRESS_FILE"
PUBLISH_EVERY_S = 1.0
_FORMAT = "{desc} {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"

_state: dict[str, str] = {}
_last = 0.0


def _publish(force: bool = False) -> None:
    global _last
    path = os.environ.get(ENV)
    now = time.monotonic()
    if not path or (not force and now - _last < PUBLISH_EVERY_S):
        return
    _last = now
    # tqdm's monitor thread may redraw beside the main thread: each writer has its own temporary file
    tmp = Path(f"{path}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(_state))
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError):  # a full disk, a vanished folder: never stops a run
        pass


def stage(label: str, n: int, total: int) -> None:
    """What the study is on: `label` (a technique, a precision, a phase), the n-th of `total`."""
    _state.clear()
    _state["stage"] = f"{label} ({n} of {total})"
    _publish(force=True)


class Stages:
    """n of N for a study's nested loops: call it with a label at the top of the innermost body."""

    def __init__(self, total: int):
        self.total, self.n = total, 0

    def __call__(self, label: str) -> None:
        self.n += 1
        stage(label, self.n, self.total)


class _Publishing:
    """Mixed into a tqdm class: each redraw also publishes the bar's line (desc, n/total, elapsed<remaining,
    postfix) for the batch runner."""

    def display(self, *args, **kwargs):
        out = super().display(*args, **kwargs)
        try:
            _state["bar"] = self.format_meter(**{**self.format_dict, "bar_format": _FORMAT}).strip()
        except Exception:  # noqa: BLE001 - a bar tqdm cannot format never stops a run
            return out
        _publish()
        return out


class Bar(_Publishing, _auto_tqdm):
    """tqdm.auto's bar (a notebook widget where ipywidgets renders one, text elsewhere) that publishes its state."""


class TextBar(_Publishing, _std_tqdm):
    """The plain text bar that publishes its state: writes where `file` says even inside a notebook kernel."""


def bar(text: bool = False, **kwargs) -> Bar | TextBar:
    """A tqdm bar (`tqdm(**kwargs)`) that publishes its state (a disabled bar publishes nothing); `text`: always the
    plain text bar (a measurement that renders into a buffer)."""
    return (TextBar if text else Bar)(**kwargs)


def read(path: str | os.PathLike) -> str:
    """The published state as one line ('' when nothing was published or the file is unreadable)."""
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return ""
    return " | ".join(v for v in (state.get("stage"), state.get("bar")) if v)


@contextlib.contextmanager
def relay(show: Callable[[str], None], period_s: float = PUBLISH_EVERY_S) -> Iterator[str]:
    """For the batch runner: while open, kernels started from this process publish to a fresh file (its path is
    yielded), and `show(line)` is called from a polling thread with each new line, at most every `period_s`. The
    variable and the files are removed on exit."""
    fd, path = tempfile.mkstemp(prefix="effllm-progress-", suffix=".json")
    os.close(fd)
    old = os.environ.get(ENV)
    os.environ[ENV] = path
    stop = threading.Event()

    def poll():
        last = None
        while not stop.wait(period_s):
            line = read(path)
            if line and line != last:
                show(line)
                last = line

    thread = threading.Thread(target=poll, name="effllm-progress", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join()
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old
        for leftover in [path, *glob.glob(f"{glob.escape(path)}.*.tmp")]:  # a killed kernel's temporary file
            with contextlib.suppress(OSError):
                os.unlink(leftover)
