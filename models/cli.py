"""The command line of ``train.py``: LightningCLI for one run, ``compare`` for several.

``python -m models.cli ...`` is the same as ``python train.py ...``.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Any, NoReturn

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from models.data import ByteCorpusDataModule
from models.lit_module import MoELanguageModel

RICH_PROGRESS_BAR = "lightning.pytorch.callbacks.RichProgressBar"


def _seed_or_zero(seed: Any) -> int:
    # seed_everything may be True (random) or False/None; the data order then uses seed 0.
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0


_LITERAL_ERROR = re.compile(
    r'Parser key "(?P<key>[^"]+)":\s*Expected a (?:typing\.)?Literal\[(?P<allowed>.*)\]\. '
    r"Got value: (?P<value>.*)",
    re.DOTALL,
)
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (?P<args>.*)")


def concise_error(message: str, option_strings: list[str]) -> str:
    """One line for a command-line error: the key, the value and what is allowed.

    Rewrites jsonargparse's ``Literal`` errors as ``key='value' is invalid: one of (...)`` and
    adds the closest known option to an unrecognised one (a typo).

    Args:
        message: The parser's error message.
        option_strings: Every option the parser knows (for suggestions).

    Returns:
        The rewritten message, on one line.
    """
    literal = _LITERAL_ERROR.search(message)
    if literal:
        value = literal["value"].strip()
        return f"{literal['key']}={value!r} is invalid: one of ({literal['allowed'].strip()})"
    unrecognized = _UNRECOGNIZED.search(message)
    if unrecognized:
        parts = []
        for arg in unrecognized["args"].split():
            if not arg.startswith("--"):
                continue
            key = arg.split("=", 1)[0]
            close = difflib.get_close_matches(key, option_strings, n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]}?)" if close else ""
            parts.append(f"{key} is not an option{hint}")
        if parts:
            return "; ".join(parts)
    return " ".join(message.split())


class _ConciseParser(LightningArgumentParser):
    """LightningCLI's parser with one-line errors instead of a page of usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        options = [opt for action in parser._actions for opt in action.option_strings]
        sys.stderr.write(f"error: {concise_error(message, options)}\n")
        sys.stderr.write(
            f"(run `{parser.prog.replace(' [options]', '')} --help` for every option)\n"
        )
        self.exit(2)


class MoECLI(LightningCLI):
    """LightningCLI for ``MoELanguageModel`` on ``ByteCorpusDataModule``.

    - ``data.seq_len`` sets ``model.model.max_seq_len``; the data's vocabulary sets
      ``model.model.vocab_size``; ``seed_everything`` sets ``data.seed`` (the training order).
    - A Rich progress bar unless ``trainer.enable_progress_bar`` is false or the config names
      another progress bar.
    - Without ``trainer.logger`` in the config, logs go to CSV (``<root>/csv``) and TensorBoard
      (``<root>/tb``) under ``trainer.default_root_dir``.
    - ``model.model.moe.anneal_steps`` left unset takes ``trainer.max_steps``.
    - ``fit`` needs ``trainer.max_steps`` > 0 (the training stream is endless) and ends with a
      validation pass at the last step, whose table it prints.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", _ConciseParser)
        super().__init__(MoELanguageModel, ByteCorpusDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        """Links the values that the data decides into the model config."""
        parser.link_arguments("data.seq_len", "model.model.max_seq_len")
        parser.link_arguments("seed_everything", "data.seed", compute_fn=_seed_or_zero)
        parser.link_arguments("data.vocab_size", "model.model.vocab_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Default loggers and progress bar; rejects a fit without ``trainer.max_steps``."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if trainer.logger is None or trainer.logger is True:
            root = trainer.default_root_dir or "."
            trainer.logger = [
                {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": root, "name": "csv"},
                },
                {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": root, "name": "tb"},
                },
            ]
        callbacks = list(trainer.callbacks or [])
        has_bar = any("ProgressBar" in str(getattr(cb, "class_path", cb)) for cb in callbacks)
        if trainer.enable_progress_bar is not False and not has_bar:
            callbacks.append(Namespace(class_path=RICH_PROGRESS_BAR, init_args=Namespace()))
            trainer.callbacks = callbacks
        moe = config.model.model.moe
        if (
            getattr(moe, "anneal_steps", None) is None
            and trainer.max_steps
            and trainer.max_steps > 0
        ):
            # The temperature schedule spans the run unless the config says otherwise.
            moe.anneal_steps = trainer.max_steps
        if self.subcommand == "fit" and (trainer.max_steps is None or trainer.max_steps <= 0):
            raise ValueError(
                f"trainer.max_steps={trainer.max_steps!r} is not allowed for fit: the training "
                "stream is endless, so set a positive number of optimizer steps"
            )

    def after_fit(self) -> None:
        """Validates at the last step unless the schedule already did (the final table)."""
        model = self.model
        last = model.last_val
        if last is None or last["step"] != self.trainer.global_step:
            # The table reports the trained weights, so validate at the last step if the
            # schedule did not.
            self.trainer.validate(model, datamodule=self.datamodule, verbose=False)


def cli_main(args: list[str] | None = None) -> None:
    """Entry point: ``compare`` goes to ``models.compare``, everything else to ``MoECLI``.

    Args:
        args: Command-line arguments without the program name; None for ``sys.argv[1:]``.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "compare":
        from models.compare import compare_main

        compare_main(argv[1:])
        return
    # args=None lets LightningCLI read sys.argv itself (it warns when given both).
    MoECLI(args=args)


def main() -> None:
    """Console entry point (``train.py``, ``moe-router``): :func:`cli_main` with a bad setting
    reported as one ``error:`` line and exit code 2 instead of a traceback
    (``MOE_ROUTER_TRACEBACK=1`` shows the traceback)."""
    try:
        cli_main()
    except ValueError as err:
        if os.environ.get("MOE_ROUTER_TRACEBACK") == "1":
            raise
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
