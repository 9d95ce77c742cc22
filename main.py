"""earsleep: ``python main.py fit|validate|test|predict --config config/<experiment>.yaml``.

The CLI itself is :mod:`util.cli`; ``main(args)`` runs it in-process, ``cli(args)`` with
one-line errors. ``python main.py fit --help`` documents every option.
"""

from util.memory import page_out_gpu_libraries

# On a CPU, torch's GPU libraries are paged out before Lightning's imports add to the
# peak resident set (util/memory.py); util.cli.main does it again for what those map.
page_out_gpu_libraries()

from util.cli import cli, exit_quickly, main  # noqa: E402

__all__ = ["cli", "main"]

if __name__ == "__main__":
    exit_quickly(cli())
