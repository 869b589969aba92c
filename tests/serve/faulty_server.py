"""``python -m fbjax.serve`` with faults a test can inject into the engine thread.

Run as ``python -m tests.serve.faulty_server <serve flags>`` with ``$FBJAX_TEST_FAULT_FILE``
naming a file; whenever that file holds one of these words, the engine thread meets the
fault (the one-shot ones empty the file when they fire):

* ``step``: the next engine step raises before it runs (one-shot);
* ``after_step``: the next engine step runs (finishing requests in the scheduler) and
  then raises (one-shot);
* ``die``: the engine thread's loop raises outside the guarded step (the thread dies);
* ``hang``: the next engine step never returns (the thread stalls).

Everything else is the real server: the same process, flags and engine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from absl import app

from fbjax.engine.engine import LLMEngine
from fbjax.serve.__main__ import main
from fbjax.serve.engine_loop import EngineLoop

FAULT_FILE = Path(os.environ["FBJAX_TEST_FAULT_FILE"])


def _take(word: str, once: bool) -> bool:
    try:
        if FAULT_FILE.read_text().strip() != word:
            return False
    except FileNotFoundError:
        return False
    if once:
        FAULT_FILE.write_text("")
    return True


_step = LLMEngine.step


def faulty_step(self):
    if _take("step", once=True):
        raise RuntimeError("injected fault before the step")
    if _take("hang", once=True):
        time.sleep(3600)
    outputs = _step(self)
    if _take("after_step", once=True):
        raise RuntimeError("injected fault after on_step_done")
    return outputs


_observe = EngineLoop._observe_state


def faulty_observe(self):
    if _take("die", once=False):
        raise RuntimeError("injected fault in the engine loop")
    _observe(self)


LLMEngine.step = faulty_step
EngineLoop._observe_state = faulty_observe

if __name__ == "__main__":
    app.run(main)
