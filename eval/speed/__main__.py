"""``python -m vtprune.eval.speed`` (or ``python eval/speed`` from the repository root): see the package docstring."""

from vtprune.eval.speed.cli import main

if __name__ == "__main__":
    main()
