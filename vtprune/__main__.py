"""`python -m vtprune ...` runs the Hydra app (the `vtprune` command, `vtprune.apps.experiment`).

A program, not part of the library: nothing imports this module.
"""

from vtprune.apps.experiment import main

if __name__ == "__main__":
    main()
