"""The command line of one run: LightningCLI's ``fit`` and ``validate``.

``python -m models.cli fit ...`` is ``python train.py fit ...``; ``train.py`` adds the
commands that drive several runs (``compare``, ``frontier``: the ``experiments`` package) through
``cli_main``'s ``commands``, so this module never imports them.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import pickle
import re
import signal
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from models.callbacks import NonFiniteLossError
from models.data import ByteCorpusDataModule, DataPreparationInterrupted, text_file_problem
from models.lit_module import MoELanguageModel, checkpoint_problem

STEP_PROGRESS_BAR = "models.callbacks.StepProgressBar"
TEXT_PROGRESS = "models.callbacks.TextProgress"
MODEL_SUMMARY = "models.callbacks.MoEModelSummary"
# A command beside fit / validate: (one line for --help, the function of its arguments).
Command = tuple[str, Callable[[list[str]], None]]

# Lightning's log lines that advertise products or restate what the config says.
_NOISE_PREFIXES = (
    "\N{ELECTRIC LIGHT BULB} Tip:",
    "Trainer already configured with model summary callbacks",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(_NOISE_PREFIXES)


def quiet_known_noise() -> None:
    """Silences what a normal run need not show: Lightning's product tips, its note that our
    own model summary replaces the default, and the deprecation of torch's ``LeafSpec`` that
    Lightning's own ``_pytree`` triggers (not our code; the filter matches that module only).
    Idempotent."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


def _shown(path: str | os.PathLike) -> str:
    # Relative to the working directory when below it: shorter, and what the user typed.
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _has_class(callbacks: list, name: str) -> bool:
    return any(name in str(getattr(callback, "class_path", callback)) for callback in callbacks)


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


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping (plain PyYAML keeps the last one silently)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    A merge (``<<: *base``) followed by the mapping's own keys is an override, not a repeat,
    and stays allowed.

    Raises:
        DuplicateKeyError: Naming the key and the lines of both occurrences.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise DuplicateKeyError(
                        problem=f"key {key!r} is given twice in one mapping, at lines "
                        f"{first_line[key]} and {line} (keep one)",
                        problem_mark=key_node.start_mark,
                    )
                first_line[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                break
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str) -> Any:
    """Parses user YAML with :class:`UniqueKeyLoader`.

    Args:
        text: The YAML document.
        source: Where it came from (a file name), for the message.

    Returns:
        The parsed value.

    Raises:
        ValueError: Naming ``source`` and the line, for a repeated key or a syntax error.
    """
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except DuplicateKeyError as error:
        raise ValueError(f"{source}: {error.problem}") from None
    except yaml.reader.ReaderError as error:  # a character YAML text may not hold
        raise ValueError(
            f"{source} is not valid YAML: character {error.character!r} at offset "
            f"{error.position} is not allowed in YAML text"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        raise ValueError(f"{source} is not valid YAML{where}: {problem}") from None


def check_config_file(path: str | os.PathLike) -> None:
    """Rejects a config file that is not a YAML mapping written as UTF-8 text, naming it.

    Args:
        path: The config file (``--config``).

    Raises:
        ValueError: For a binary or non-UTF-8 file, an empty one, a syntax error, a key given
            twice in one mapping, or a document that is not a mapping.
    """
    shown = _shown(path)
    problem = text_file_problem(Path(path))
    if problem is not None:
        raise ValueError(f"--config {shown} is not a YAML text file: it is {problem}")
    config = load_yaml(Path(path).read_text(encoding="utf-8"), f"--config {shown}")
    if config is None:
        raise ValueError(
            f"--config {shown} is empty: a config is a mapping with trainer:, model: and data: "
            "(see configs/quickstart.yaml)"
        )
    if not isinstance(config, dict):
        raise ValueError(
            f"--config {shown} holds a {type(config).__name__}, not a mapping with trainer:, "
            "model: and data: (see configs/quickstart.yaml)"
        )


class _ConciseParser(LightningArgumentParser):
    """LightningCLI's parser with one-line errors instead of a page of usage, and config files
    checked first (:func:`check_config_file`: text, not empty, no key given twice)."""

    def parse_path(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> Namespace:
        """jsonargparse reads every ``--config`` file through this method."""
        if "://" not in str(path):
            check_config_file(path)
        return super().parse_path(path, *args, **kwargs)

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


def check_checkpoint_file(path: str | None, fitting: bool = False) -> None:
    """Rejects a ``--ckpt_path`` that is not an intact checkpoint of this model before
    anything is built or loaded.

    A torch checkpoint is a zip archive whose members carry a CRC-32; ``torch.load`` does not
    check it, so a file changed after it was written would load silently. The archive is read
    once here to check every member, then its contents are read (tensors memory-mapped, not
    copied) for the keys ``fit`` or ``validate`` need (``models.lit_module.checkpoint_problem``).

    Args:
        path: The checkpoint path, or None (or Lightning's ``last`` / ``best`` aliases).
        fitting: Whether the checkpoint is to be resumed (``fit``), not only evaluated.

    Raises:
        ValueError: Naming the file: missing, empty, not a zip archive, a member whose data
            does not match its CRC, not a torch checkpoint, not loadable, or not a Lightning
            checkpoint with every key needed (a bare state_dict, a missing
            ``hyper_parameters``, ...).
    """
    if path is None or path in ("last", "best", "hpc", "registry"):
        return
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"ckpt_path={path!r} is not a file")
    if file.stat().st_size == 0:
        raise ValueError(f"ckpt_path={path!r} is empty: not a checkpoint")
    if not zipfile.is_zipfile(file):
        raise ValueError(f"ckpt_path={path!r} is not a torch checkpoint (no zip archive)")
    try:
        with zipfile.ZipFile(file) as archive:
            names = archive.namelist()
            corrupted = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:  # zlib.error is an OSError subclass
        raise ValueError(f"ckpt_path={path!r} is a damaged zip archive: {err}") from None
    if corrupted is not None:
        raise ValueError(
            f"ckpt_path={path!r} is corrupted: the data of {corrupted!r} does not match its "
            "CRC (the file was changed after it was written)"
        )
    if not any(name.endswith("/data.pkl") for name in names):
        raise ValueError(
            f"ckpt_path={path!r} is a zip archive but not a torch checkpoint (no data.pkl; it "
            f"holds {', '.join(map(repr, names[:3]))}{', ...' if len(names) > 3 else ''})"
        )
    try:
        # As Lightning loads it (weights_only); mmap: the tensors are not read here.
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as err:
        first_line = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise ValueError(
            f"ckpt_path={path!r} cannot be loaded by torch.load: {first_line}"
        ) from None
    problem = checkpoint_problem(checkpoint, fitting)
    if problem is not None:
        raise ValueError(f"ckpt_path={path!r} {problem}")


def check_writable_folder(folder: str, flag: str) -> None:
    """Creates ``folder`` if needed and checks that a file can be written in it.

    Args:
        folder: A local folder (a URL such as ``s3://...`` is not checked).
        flag: The setting it came from, for the message.

    Raises:
        ValueError: Naming the setting when the folder cannot be created or written to.
    """
    if "://" in folder:
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise ValueError(
            f"{flag}={folder!r} is not a writable folder ({reason}): logs and checkpoints go "
            "there; choose another"
        ) from None


def _available_accelerators() -> list[str]:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return sorted(
        name
        for name in AcceleratorRegistry.available_accelerators()
        if AcceleratorRegistry[name]["accelerator"].is_available()
    )


def trainer_settings_error(error: Exception, trainer: Any) -> ValueError:
    """One line for a ``MisconfigurationException`` of the Trainer's constructor, naming the
    setting: ``trainer.accelerator`` when it names a device this machine does not have.

    Args:
        error: What the Trainer raised.
        trainer: The trainer's config (a namespace with ``accelerator``, ``devices``, ...).

    Returns:
        The error to raise instead.
    """
    message = " ".join(str(error).split())
    accelerator = getattr(trainer, "accelerator", None)
    available = _available_accelerators()
    if isinstance(accelerator, str) and accelerator not in ("auto", *available):
        if not (accelerator == "gpu" and {"cuda", "mps"} & set(available)):
            return ValueError(
                f"trainer.accelerator={accelerator!r}: this machine has no such device "
                f"(accelerators available: {', '.join(available)}); use --trainer.accelerator "
                f"{' or '.join(available)}, or auto"
            )
    settings = ", ".join(
        f"trainer.{name}={getattr(trainer, name, None)!r}"
        for name in ("accelerator", "devices", "strategy", "precision")
    )
    return ValueError(f"the trainer settings were refused ({settings}): {message}")


class MoECLI(LightningCLI):
    """LightningCLI for ``MoELanguageModel`` on ``ByteCorpusDataModule``.

    - ``data.seq_len`` sets ``model.model.max_seq_len``; the data's vocabulary sets
      ``model.model.vocab_size``; ``seed_everything`` sets ``data.seed`` (the training order).
    - A Rich progress bar of optimizer steps (``models.callbacks.StepProgressBar``) unless
      ``trainer.enable_progress_bar`` is false (then ``TextProgress`` lines) or the config
      names another progress bar; ``MoEModelSummary`` instead of Lightning's model summary.
    - Without ``trainer.logger`` in the config, logs go to CSV (``<root>/csv``) and TensorBoard
      (``<root>/tb``) under ``trainer.default_root_dir``.
    - ``model.model.moe.anneal_steps`` left unset takes ``trainer.max_steps`` under
      ``tau_schedule: anneal`` (no other schedule reads it, so it stays unset there).
    - ``fit`` needs ``trainer.max_steps`` > 0 (the training stream is endless) and ends with a
      validation pass at the last step, whose table it prints, then where its checkpoints,
      logs and summary went. A non-finite final validation loss exits with an error; a run
      stopped by SIGINT / SIGTERM saves ``last.ckpt`` and exits with 128 + the signal number.
    - ``--ckpt_path`` never changes the config: a checkpoint made with another model or
      optimiser config is refused, naming each differing field. So is one that is not intact
      (a zip member whose CRC does not match: ``torch.load`` does not check it) or lacks a key
      the run needs (``check_checkpoint_file``).
    - Every ``--config`` file is checked before it is parsed: UTF-8 YAML text holding a
      mapping, no key given twice in one mapping (PyYAML would keep the last one silently).
    - ``trainer.default_root_dir`` must be a writable folder; a trainer setting Lightning
      refuses (a device this machine does not have, ...) is one ``ValueError`` naming it.
    - Subcommands ``fit`` and ``validate``; ``listed_commands`` (name -> help) are shown in
      ``--help`` beside them (``cli_main`` runs those before this parser sees the arguments).
    """

    def __init__(
        self, *args: Any, listed_commands: Mapping[str, str] | None = None, **kwargs: Any
    ) -> None:
        quiet_known_noise()
        self.listed_commands = dict(listed_commands or {})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", _ConciseParser)
        super().__init__(MoELanguageModel, ByteCorpusDataModule, *args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate`` (this data module has no test or predict data)."""
        subcommands = LightningCLI.subcommands()
        return {name: subcommands[name] for name in ("fit", "validate")}

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would overwrite the parsed model settings with the checkpoint's
        # hyper-parameters, silently dropping the flags given with --ckpt_path. Here the
        # config stays as given, and MoELanguageModel.on_load_checkpoint refuses a checkpoint
        # made with another one, naming each differing field.
        return

    def _add_subcommands(self, parser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # Dispatched by cli_main before this parser runs; listed for --help only.
        for name, help_text in self.listed_commands.items():
            command = ArgumentParser(description=help_text)
            parser._subcommands_action.add_subcommand(name, command, help=help_text)

    def add_arguments_to_parser(self, parser) -> None:
        """Links the values that the data decides into the model config."""
        parser.link_arguments("data.seq_len", "model.model.max_seq_len")
        parser.link_arguments("seed_everything", "data.seed", compute_fn=_seed_or_zero)
        parser.link_arguments("data.vocab_size", "model.model.vocab_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Default loggers and progress bar; rejects a fit without ``trainer.max_steps``."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_checkpoint_file(getattr(config, "ckpt_path", None), fitting=self.subcommand == "fit")
        trainer = config.trainer
        root = trainer.default_root_dir or "."
        check_writable_folder(root, "trainer.default_root_dir")
        if trainer.logger is None or trainer.logger is True:
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
        if trainer.enable_progress_bar is not False and not _has_class(callbacks, "ProgressBar"):
            callbacks.append(Namespace(class_path=STEP_PROGRESS_BAR, init_args=Namespace()))
        if trainer.enable_progress_bar is False and not _has_class(callbacks, "TextProgress"):
            callbacks.append(Namespace(class_path=TEXT_PROGRESS, init_args=Namespace()))
        if trainer.enable_model_summary is not False and not _has_class(callbacks, "ModelSummary"):
            callbacks.append(Namespace(class_path=MODEL_SUMMARY, init_args=Namespace()))
        if self.subcommand == "validate":
            # validate writes no checkpoint, so the checkpoint callback's saved folder is moot.
            warnings.filterwarnings(
                "ignore",
                message="The dirpath has changed from",
                module=r"lightning\.pytorch\.callbacks\.model_checkpoint",
            )
            # The table of RunSummary replaces Lightning's table of every logged scalar.
            config.verbose = False
        trainer.callbacks = callbacks
        moe = config.model.model.moe
        if (
            getattr(moe, "tau_schedule", None) == "anneal"
            and getattr(moe, "anneal_steps", None) is None
            and trainer.max_steps
            and trainer.max_steps > 0
        ):
            # The annealing spans the run unless the config says otherwise. Only for `anneal`:
            # under another schedule the option is unread, and a value there would tie a
            # checkpoint to its run's max_steps (a resume with more steps would be refused).
            moe.anneal_steps = trainer.max_steps
        if self.subcommand == "fit" and (trainer.max_steps is None or trainer.max_steps <= 0):
            raise ValueError(
                f"trainer.max_steps={trainer.max_steps!r} is not allowed for fit: the training "
                "stream is endless, so set a positive number of optimizer steps"
            )

    def instantiate_trainer(self, **kwargs: Any):
        """LightningCLI's trainer; a setting Lightning refuses (a device this machine does not
        have, ...) is one ``ValueError`` naming it."""
        try:
            return super().instantiate_trainer(**kwargs)
        except MisconfigurationException as error:
            config = self.config[self.subcommand] if self.subcommand else self.config
            raise trainer_settings_error(error, config.trainer) from error

    def after_fit(self) -> None:
        """Validates at the last step unless the schedule already did (the final table), then
        says where the outputs went.

        Raises:
            SystemExit: 128 + the signal number after a SIGINT / SIGTERM (checkpoint saved).
            NonFiniteLossError: If the final validation loss is not finite.
        """
        from models.callbacks import CheckpointOnSignal

        model, trainer = self.model, self.trainer
        stopped = next(
            (
                cb
                for cb in trainer.callbacks
                if isinstance(cb, CheckpointOnSignal) and cb.checkpoint_path is not None
            ),
            None,
        )
        if stopped is not None:
            # Every rank stops here (a rank that got no signal itself exits as for SIGTERM).
            self._print_outputs()
            raise SystemExit(128 + int(stopped.received or signal.SIGTERM))
        last = model.last_val
        if last is None or last["step"] != trainer.global_step:
            # The table reports the trained weights, so validate at the last step if the
            # schedule did not.
            trainer.validate(model, datamodule=self.datamodule, verbose=False)
        self._print_outputs()
        self._check_final_loss("fit")

    def after_validate(self) -> None:
        """Raises ``NonFiniteLossError`` if the validation loss is not finite (after its table
        was printed)."""
        self._check_final_loss("validate")

    def _check_final_loss(self, subcommand: str) -> None:
        last = self.model.last_val
        loss = None if last is None else last["loss"]
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteLossError(
                f"{subcommand}: the validation loss at step {last['step']} is {loss}: the "
                "weights are not usable (see the table above for the per-layer state)"
            )

    def _print_outputs(self) -> None:
        """Prints where the checkpoints, logs and run summary of this fit went (rank 0)."""
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        from models.summary import RunSummary

        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        lines = []
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                last = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}.ckpt"
                note = f" (resume: --ckpt_path {_shown(last)})" if last.exists() else ""
                lines.append(f"  checkpoints: {_shown(callback.dirpath)}{note}")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                root = _shown(Path(logger.log_dir).parent)
                command = f"tensorboard --logdir {root}"
                lines.append(f"  TensorBoard: {_shown(logger.log_dir)} ({command})")
            elif isinstance(logger, CSVLogger):
                lines.append(f"  CSV metrics: {_shown(Path(logger.log_dir) / 'metrics.csv')}")
        for callback in trainer.callbacks:
            if isinstance(callback, RunSummary) and callback.path is not None:
                lines.append(f"  run summary: {_shown(callback.path)}")
                if callback.heatmap_path is not None:
                    lines.append(f"  load heatmap: {_shown(callback.heatmap_path)}")
        if lines:
            print("Outputs:\n" + "\n".join(lines), flush=True)


def cli_main(args: list[str] | None = None, commands: Mapping[str, Command] | None = None) -> None:
    """Entry point: a command of ``commands`` goes to its function, everything else to
    ``MoECLI`` (which lists ``commands`` in ``--help``).

    Args:
        args: Command-line arguments without the program name; None for ``sys.argv[1:]``.
        commands: Commands beside ``fit`` / ``validate``: name -> (help line, function of the
            arguments after the name).
    """
    commands = dict(commands or {})
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in commands:
        _, run = commands[argv[0]]
        run(argv[1:])
        return
    listed = {name: help_text for name, (help_text, _) in commands.items()}
    # args=None lets LightningCLI read sys.argv itself (it warns when given both).
    MoECLI(args=args, listed_commands=listed)


def main(commands: Mapping[str, Command] | None = None) -> None:
    """Console entry point (``train.py``): :func:`cli_main` with a user error reported as one
    ``error:`` line instead of a traceback (``MOE_ROUTER_TRACEBACK=1`` shows the traceback).

    User errors are a bad setting or file (``ValueError``, exit code 2), a run that diverged
    (``NonFiniteLossError``, exit code 2) and Ctrl-C outside the training loop (exit code 130;
    during training ``CheckpointOnSignal`` saves ``last.ckpt`` first). Any other exception is
    a bug and keeps its traceback.

    Args:
        commands: As for :func:`cli_main`.
    """
    show_traceback = os.environ.get("MOE_ROUTER_TRACEBACK") == "1"
    try:
        cli_main(commands=commands)
    except (ValueError, NonFiniteLossError) as err:
        if show_traceback:
            raise
        sys.stderr.write(f"error: {' '.join(str(err).split())}\n")
        raise SystemExit(2) from None
    except (KeyboardInterrupt, DataPreparationInterrupted) as err:
        if show_traceback:
            raise
        what = str(err) if isinstance(err, DataPreparationInterrupted) else "interrupted (Ctrl-C)"
        sys.stderr.write(f"error: {what}\n")
        raise SystemExit(128 + signal.SIGINT) from None


if __name__ == "__main__":
    main()
