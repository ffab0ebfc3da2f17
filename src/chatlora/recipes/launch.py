"""`chatlora train --gpus N`: the same command on N processes of this machine, through torchrun.

Nothing is distributed by hand: torch.distributed.run (torchrun) starts the processes, sets RANK,
WORLD_SIZE and the rendezvous, and restarts nothing; each process runs `python -m chatlora train ...`
exactly as given, and training (accelerate through Trainer) joins them into one job.
"""

from __future__ import annotations

import os

from chatlora.errors import ConfigError


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
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--gpus starts its own processes; under torchrun or accelerate launch leave it out")
    if torch.cuda.is_available():
        if processes > torch.cuda.device_count():
            raise ConfigError(f"--gpus {processes}: this machine has {torch.cuda.device_count()} GPU(s)")
    else:
        print(f"no GPU here: training on {processes} CPU processes (gloo)", flush=True)
    try:
        run(parse_args(torchrun_args(processes, argv)))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        # A worker killed by a signal has a negative exit code; report it as the shell would.
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    return 0
