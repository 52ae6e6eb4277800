"""dlzo: Dominant-Layer zeroth-order fine-tuning of LLMs.

One module per pipeline stage, each runnable as ``python -m dlzo.<stage>``: download (model), data (task
splits), probe (outlier layers), profiles (ZO sensitivity, gradient norms), train (ZO-SGD and the first-order
baselines), select (a grid's dev pick), evaluate (lm-eval), tables (paper tables), figures (every plot), bench.
Below them: tuning (a run's model), models, zo (the optimizer), objectives (losses); and the torch-free base:
methods (the method grammar), layout (result paths), tasks (the task table), io, runtime, render.
"""

__version__ = "0.1.0"


class DLZOError(RuntimeError):
    """An error caused by the user's input (config, model, data), with a message that says what to fix."""


def run_cli(main, stage: str) -> None:
    """Run a stage's ``main()``: a DLZOError becomes one line on stderr (no traceback) and exit status 1."""
    import sys

    try:
        code = main()
    except DLZOError as err:
        print(f"{stage}: error: {err}", file=sys.stderr)
        code = 1
    sys.exit(code)
