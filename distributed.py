"""The processes of one training run: joining them, agreeing between them, and one run per folder.

Under torchrun each process (rank) trains on a shard of every batch with DistributedDataParallel,
whose gradients travel on the device's process group (NCCL, or gloo on CPUs). Besides it,
every run of several processes has a control group on the CPU (gloo) through which the ranks
agree, once or twice per step, on what they all do next: skip a batch that one of them cannot
read, stop at a signal, save on the wall clock, stop at an error one of them met. Agreeing
there costs no wait for the device, and a rank that fails tells the others instead of leaving
them in a collective until the process group's timeout.
"""
import datetime
import json
import os
import socket
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from utils import pick_device

# How long the processes of an attempt wait for each other to start (imports, reading the lists).
JOIN_TIMEOUT = datetime.timedelta(minutes=10)


class Processes:
    """This process's place in the run: rank, world (number of processes), device, and the
    control group (None for a single process)."""

    def __init__(self, rank, world, device, control=None):
        self.rank, self.world, self.device, self.control = rank, world, device, control

    @property
    def main(self):
        """Whether this is rank 0, which writes the run's files."""
        return self.rank == 0

    def agree(self, values):
        """Each of a list of numbers, the largest any rank gave (a flag raised anywhere is
        raised everywhere), through the control group on the CPU; as given on one process."""
        if self.control is None:
            return list(values)
        flags = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control)
        return flags.tolist()

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()


def launched_rank():
    """This process's rank as torchrun gives it (RANK; 0 for a process on its own), known
    before the process group exists."""
    return int(os.environ.get("RANK", 0))


def join(device_name):
    """This process's Processes, from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK):
    its device (the LOCAL_RANK-th GPU with CUDA), and with several processes the device's
    process group (the default group) and the control group."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = launched_rank()
    device = pick_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world == 1:
        return Processes(rank, world, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":           # torchrun's agent's store
        dist.init_process_group(backend, store=attempt_store(rank, world), rank=rank, world_size=world)
    else:
        dist.init_process_group(backend)                                     # env://
    return Processes(rank, world, device, dist.new_group(backend="gloo"))


def attempt_store(rank, world, timeout=JOIN_TIMEOUT):
    """torchrun's agent's store, under a prefix that only this attempt's processes use.

    The agent keeps one store for all the restarts of its worker group (--max-restarts), and
    what the processes of a failed attempt wrote there (each one's gloo address, NCCL's id) is
    still there when the next attempt starts: a process that reads a peer's key before the
    peer wrote it again connects to a dead address, and waits out the timeout ("Gloo
    connectFullMesh failed ... Connection refused"). So the attempt's processes first agree,
    through the store, on a token that no earlier attempt used: rank 0 draws it; every other
    rank writes a nonce of its own, which rank 0 answers with the token (an answer to an
    earlier nonce is ignored), and acknowledges the token (an earlier attempt's
    acknowledgement cannot carry it). Everything else goes under the token.
    """
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=timeout)
    deadline = time.monotonic() + timeout.total_seconds()

    def value(key):
        return store.get(key).decode() if store.check([key]) else None

    def wait():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: the run's other processes did not start within "
                               f"{timeout} (torchrun's store at {os.environ['MASTER_ADDR']})")
        time.sleep(0.02)

    if rank == 0:
        token = uuid.uuid4().hex
        waiting = set(range(1, world))
        while waiting:
            for r in sorted(waiting):
                nonce = value(f"ssd/nonce/{r}")
                if value(f"ssd/ack/{r}") == token:
                    waiting.discard(r)
                elif nonce is not None:
                    store.set(f"ssd/answer/{r}", f"{nonce}:{token}")
            if waiting:
                wait()
    else:
        nonce = uuid.uuid4().hex
        store.set(f"ssd/nonce/{rank}", nonce)
        while not (value(f"ssd/answer/{rank}") or "").startswith(nonce + ":"):
            wait()
        token = value(f"ssd/answer/{rank}").split(":", 1)[1]
        store.set(f"ssd/ack/{rank}", token)
    return dist.PrefixStore(f"ssd/{token}/", store)


def record_error(message, consequence=False):
    """Give torchrun the one line that says why this process stopped: its failure report
    then ends with it ("traceback : ...") rather than with a pointer to its documentation.

    torchrun names as the root cause the failure with the smallest timestamp, in whole
    seconds, a tie going to the lowest rank; a process without an error file counts from
    when torchrun saw it end. A `consequence` (this process stops because another one did)
    is recorded one second later, so that the process that met the problem is the one named."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {
                "py_callstack": message, "timestamp": str(int(time.time()) + consequence)}}}, f)


class RunLock:
    """One run per folder: an exclusive lock on <folder>/.train.lock, held while a run lives.

    A POSIX record lock (fcntl.lockf): the kernel releases it when its process ends, however it
    ends (kill -9 included), so a dead run's lock is never in the way; on NFS it is the
    server's lock, released when the client's lease ends (about 90 s after a node is lost).
    The file keeps the holder's host, process and start time, to say who holds it. Where
    fcntl is missing (Windows) there is no lock.
    """

    NAME = ".train.lock"

    def __init__(self, folder):
        self.path = Path(folder) / self.NAME
        self.file = None

    def acquire(self):
        """Take the lock, or raise FileExistsError saying who holds it."""
        try:
            import fcntl
        except ImportError:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise FileExistsError(f"{self.path.parent} is in use by another train.py ({holder}): one "
                                  "run per folder; wait for it, stop it, or choose another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()
        return self

    def release(self):
        if self.file is not None:
            self.file.close()                     # closing drops the lock
            self.file = None
