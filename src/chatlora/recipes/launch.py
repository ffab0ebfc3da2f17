"""`chatlora train --gpus N`: the same command on N processes of this machine, through torchrun.

Nothing is distributed by hand: torch.distributed.run (torchrun) starts the processes, sets RANK,
WORLD_SIZE and the rendezvous, and restarts nothing; each process runs `python -m chatlora train ...`
exactly as given, and training (accelerate through Trainer) joins them into one job.
"""

from __future__ import annotations

import os
import signal
import sys

from chatlora.errors import EXIT_PREEMPTED, ConfigError


LAUNCHER = "CHATLORA_LAUNCHER_PID"


def die_with_launcher() -> None:
    """In a process started by `--gpus`: be told when the launcher dies, even by SIGKILL, so the process
    saves a checkpoint and stops instead of training on with no parent (torchrun starts its workers in
    a session of their own, out of reach of the launcher's terminal). Linux only."""
    from chatlora.trainer.lifecycle.stop import LAUNCHER_GONE

    launcher = os.environ.get(LAUNCHER)
    if not launcher or LAUNCHER_GONE is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, LAUNCHER_GONE)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # it died before the line above: nobody would send the signal
        os.kill(os.getpid(), signal.SIGTERM)


def torchrun_args(processes: int, argv: list[str]) -> list[str]:
    """torchrun's command line: one node (a free port on localhost), `processes` workers, each
    running the chatlora module with `argv`."""
    return ["--standalone", "--nnodes", "1", "--nproc-per-node", str(processes), "-m", "chatlora", *argv]


def launch(processes: int, argv: list[str]) -> int:
    """Run `chatlora ARGV` on `processes` processes; returns the exit code of the first that failed
    (2 for a bad config or data, as with one process), or 0.

    Raises ConfigError when already inside a launched job, or when asked for more GPUs than present.
    """
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--gpus starts its own processes; under torchrun or accelerate launch leave it out")
    if torch.cuda.is_available():
        if processes > torch.cuda.device_count():
            raise ConfigError(f"--gpus {processes}: this machine has {torch.cuda.device_count()} GPU(s)")
    else:
        print(f"no GPU here: training on {processes} CPU processes (gloo)", flush=True)
    os.environ[LAUNCHER] = str(os.getpid())  # the processes inherit it: see die_with_launcher
    try:
        run(parse_args(torchrun_args(processes, argv)))
    except SignalException as e:
        # SIGTERM or Ctrl-C reached this launcher: torchrun has passed it on to the processes, which
        # save a checkpoint at the end of their step (rank 0 said so) and stop. Not a crash: 75, as
        # one process gives, so a scheduler reads it as "try again later".
        print(f"stopped: {signal.Signals(e.sigval).name} passed on to the {processes} processes; continue with the "
              "same command and resume=auto", file=sys.stderr)
        return EXIT_PREEMPTED
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        # A worker killed by a signal has a negative exit code; report it as the shell would.
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    return 0


def refuse_before_launch(cfg) -> None:
    """What every process would refuse before loading weights (a bad row, a missing `model.adapter`, an
    output_dir or resume target that cannot be used), refused here, once, before N processes start.
    The data is tokenized into the cache as rank 0 would do first; rank 0 then reads it from there
    and prints the report."""
    from chatlora.model.tokenized import check_data
    from chatlora.run import RunDir, adapter_folder
    from chatlora.trainer.lifecycle.folder import RunLifecycle

    quiet = lambda _line: None  # noqa: E731
    if cfg.model.adapter:
        adapter_folder(cfg.model.adapter)
    RunLifecycle(cfg, quiet).refuse_early(RunDir.for_config(cfg))
    check_data(cfg, quiet, samples=0)


def launched(gpus: int | None, argv: list[str], cfg=None) -> int | None:
    """`--gpus N`, N > 1: run `chatlora ARGV` on N processes and return the first failure's exit code
    (or 0); `cfg`, ARGV's config, is checked first (refuse_before_launch). Otherwise None: this process
    trains itself, stopping when a launcher it came from dies."""
    if (gpus or 1) > 1:
        if cfg is not None:
            refuse_before_launch(cfg)
        return launch(gpus, argv)
    die_with_launcher()  # a process of `--gpus N`: stop (with a checkpoint) when the launcher dies
    return None
