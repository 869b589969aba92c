"""``python -m fbjax.replay``: see :mod:`fbjax.replay.cli`."""

from absl import app

from fbjax.replay.cli import main

if __name__ == "__main__":
    app.run(main)
