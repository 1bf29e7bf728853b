"""What the multi-process tests share: running checks on `world` gloo processes forked from the test."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, world, init_file, checks):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for check, options in checks:
            try:
                check(rank, world, **options)
            except Exception as error:
                raise AssertionError(f"rank {rank} of {world}, {check.__name__} {options}: {error}") from error
    finally:
        dist.destroy_process_group()


def spawn(world, checks, tmp_path):
    """Each check(rank, world, **options) on `world` processes; a failing one fails the test, naming its rank."""
    # fork: the children share the parent's imports (spawn would import torch again in each of them)
    mp.start_processes(worker, args=(world, str(tmp_path / "init"), checks), nprocs=world, join=True,
                       start_method="fork")
