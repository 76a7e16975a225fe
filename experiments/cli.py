"""What every `python -m experiments.X` command shares.

`run(main)` is absl's app.run, except that --help (and --helpfull) exit 0: absl exits 1
after printing the usage, which reads as a failure to scripts and CI. `one_line_errors`
builds the usual main(argv): stray arguments and bad input end in one `error: ...` line.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, logging

HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")


def run(main: Callable, **kwargs) -> None:
  """app.run(main, **kwargs); a help request exits 0."""
  try:
    app.run(main, **kwargs)
  except SystemExit as e:
    if e.code == 1 and any(a in HELP_FLAGS for a in sys.argv[1:]):  # absl's exit after usage
      sys.exit(0)
    raise


def one_line_errors(body: Callable[[], object],
                    errors: tuple[type[Exception], ...] = (ValueError, FileNotFoundError)
                    ) -> Callable[[list[str]], None]:
  """A main(argv) running body(): absl logging at WARNING, `errors` as one line, exit 1."""

  def main(argv):
    if len(argv) > 1:
      sys.exit(f"error: unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
      body()
    except errors as e:
      sys.exit(f"error: {e}")

  return main
