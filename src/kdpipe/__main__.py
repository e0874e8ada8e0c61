"""``python -m kdpipe`` (and ``torchrun -m kdpipe ...``): the ``kdpipe`` command."""

from kdpipe.stages.cli import main

if __name__ == "__main__":
    main(prog_name="kdpipe")
