"""`python -m vtprune ...` runs the Hydra app (same as the `vtprune` command)."""

from .app import main

if __name__ == "__main__":
    main()
