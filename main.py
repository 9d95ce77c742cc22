"""earsleep: ``python main.py fit|validate|test|predict --config config/<experiment>.yaml``.

The CLI itself is :mod:`util.cli`; ``main(args)`` runs it in-process, ``cli(args)`` with
one-line errors. ``python main.py fit --help`` documents every option.
"""

from util.cli import cli, exit_quickly, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    exit_quickly(cli())
