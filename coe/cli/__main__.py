"""`python -m coe.cli`: the same as the `coe` console script."""

from coe.cli import main

if __name__ == "__main__":  # importing the module (package walks) must not run the CLI
    main()
