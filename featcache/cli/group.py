"""The `featcache` group: its options, one-line errors and exit codes, and Keras' backend started only by commands
that run a model.

The `featcache` command is the composition root, the one place that imports both featcache and heads.

Every command is a thin click layer over plain functions (`featcache.extract`, `featcache.cache`,
`heads.train`, `heads.curve`, `heads.reports`). Results meant for scripts (a cache path, a run
folder, JSON) go to stdout; messages and progress go to stderr. Errors a user can fix print one line
and exit with code 2. Keras' backend (TensorFlow by default) is started by the commands that run a model, never
for `--help`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys

import click

from featcache import system
from featcache.errors import FeatcacheError, WorkerError, first_line

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # keep TensorFlow's start-up chatter off stderr

FORCED = "featcache.force"   # ctx.meta key: `extract --force` restarts from zero, so nothing resumes
VERBOSE = "featcache.verbose"


def start_backend(verbose: bool = False) -> None:
    """Start Keras' backend (KERAS_BACKEND: tensorflow by default, jax or torch) for a command that runs a model.
    TensorFlow is imported with its C++ start-up chatter kept off stderr (printed after all if the import fails)
    and its devices found; on the other backends nothing imports TensorFlow. A backend that cannot start is one
    line naming the fix (a FeatcacheError)."""
    from featcache.errors import BadInputError
    from featcache.system import quiet_stderr

    backend = os.environ.get("KERAS_BACKEND", "").strip()
    wanted = backend or "the one in ~/.keras/keras.json (tensorflow by default)"
    try:
        with contextlib.nullcontext() if verbose else quiet_stderr():
            import keras

            if keras.backend.backend() == "tensorflow":   # its devices found here, their chatter with the rest
                import tensorflow as tf

                tf.config.list_physical_devices()
            else:
                system.keras_without_tensorflow()
    except (ImportError, ValueError) as e:   # a backend package missing, or an unknown name
        raise BadInputError(f"Keras cannot start its backend {wanted} ({first_line(e)}); fix: install it (pip install "
                            "jax, torch or tensorflow) or set KERAS_BACKEND to tensorflow, jax or torch") from e


def needs_backend(command):
    """Start Keras' backend quietly when `command` runs (not while its options are parsed or --help is printed)."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        start_backend(click.get_current_context().meta.get(VERBOSE, False))
        return command(*args, **kwargs)
    return run


class _Group(click.Group):
    def invoke(self, ctx):
        interrupted = None
        try:
            with system.interrupts_kept() as interrupted:
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            _exit_interrupted(ctx)
        except Exception as e:
            # an error after a Ctrl-C is the interrupt's: a clean-up it broke (a file write, a pool's shutdown, an
            # Optuna session closed mid-commit) or a library that turned it into an error of its own
            if _after_interrupt(e) or (interrupted is not None and interrupted.is_set()):
                _exit_interrupted(ctx)
            if isinstance(e, FeatcacheError):
                click.echo(f"error: {e}", err=True)
                ctx.exit(2)
            if not isinstance(e, (OSError, WorkerError)):
                raise
            resumes = ctx.invoked_subcommand == "extract" and not ctx.meta.get(FORCED)
            click.echo(f"error: {e}" + ("; rerun the same command to resume the extraction" if resumes else ""),
                       err=True)
            ctx.exit(1)


def _after_interrupt(error: BaseException) -> bool:
    """Whether `error` was raised while a Ctrl-C (KeyboardInterrupt) was being handled."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _exit_interrupted(ctx) -> None:
    """Ctrl-C: exit 130 with what a rerun does."""
    if ctx.invoked_subcommand == "search":
        hint = "; rerun the same command to continue the search from its finished trials"
    elif ctx.invoked_subcommand != "extract":
        hint = "; no run folder was written"
    elif ctx.meta.get(FORCED):
        hint = "; a rerun with --force starts again from the first batch"
    else:
        hint = "; rerun the same command to resume where it stopped"
    click.echo("interrupted" + hint, err=True)
    ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="featcache", prog_name="featcache")
@click.option("-q", "--quiet", is_flag=True, help="Only print results and errors.")
@click.option("-v", "--verbose", is_flag=True, help="Also show the backend's own start-up messages (TensorFlow's).")
@click.pass_context
def main(ctx, quiet: bool, verbose: bool) -> None:
    """Cache a frozen Keras backbone's features (VGG16 by default) once in HDF5, then train heads on them
    in seconds.

    \b
    featcache extract --data ROOT --weights FILE     build (or reuse) a feature cache
    featcache info cache/NAME.h5                     what produced a cache
    featcache train-head --cache cache/NAME.h5       train the default head on it
    featcache backbones [NAME]                       the backbones, their layers and shapes
    featcache consolidate cache/NAME.h5              a cache joined from Ray shards, as one file
    featcache predict runs/RUN IMAGES...             classify new images with a trained head
    featcache export runs/RUN -o DIR                 backbone + head as one Keras model
    """
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr, force=True)
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    else:   # JAX's start-up lines ("Unable to initialize backend 'tpu'") are not featcache's
        logging.getLogger("jax").setLevel(logging.WARNING)
    ctx.meta[VERBOSE] = verbose

