"""`python -m dskd ...` is the same as the `dskd` command (and what `accelerate launch -m dskd` runs)."""

from dskd.run.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
