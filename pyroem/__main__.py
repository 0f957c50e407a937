"""``python -m pyroem``: the ``pyroem`` command."""

from pyroem.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
