"""Which process this is among how many, and the few collectives training needs; the one-process default does nothing.

torchrun starts one process per rank with RANK, WORLD_SIZE and LOCAL_RANK in the environment; from_environment()
joins its process group (gloo on CPU, nccl on CUDA, where each rank's device is cuda:LOCAL_RANK). A plain
`python train.py` gets SINGLE, as nanoGPT's master_process and EGG's distributed_context give one process.

A global batch is split across ranks in order, rank 0 first (split_rows); what the model computes over the batch
(normalised logits, in-batch negatives, Gumbel noise) reads the whole batch through rows / gather_rows / sum_rows.
"""
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_gather_single_autograd
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel

# with several processes: replicate the model (ddp) or shard parameters, gradients and Adam's moments (fsdp)
STRATEGIES = ("auto", "ddp", "fsdp")
CHECKPOINT_SLOTS = 2  # checkpoint saves in flight at once (a best and a periodic save at one validation)


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    checkpoint_groups: tuple = ()  # gloo groups of every rank for checkpoint I/O, apart from training's: a save each

    @property
    def is_primary(self):
        """Rank 0: it alone decides saves and stops, writes checkpoints and publishes events."""
        return self.rank == 0

    def split_rows(self, n):
        """This rank's slice of a global batch of n rows: contiguous, in rank order, sizes differing by one at most."""
        per, extra = divmod(n, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return slice(start, start + per + (self.rank < extra))

    def shard(self, batch):
        """A global batch (dict of tensors with the examples along dim 0) -> this rank's rows."""
        if self.world_size == 1:
            return batch
        rows = self.split_rows(len(next(iter(batch.values()))))
        return {k: v[rows] for k, v in batch.items()}

    def rows(self, n):
        """(offset, total): where this rank's n rows start in the global batch, and how many rows it has in all."""
        if self.world_size == 1:
            return 0, n
        counts = self._gather(torch.tensor([n], device=self.device))
        return int(counts[:self.rank].sum()), int(counts.sum())

    def gather_rows(self, tensor):
        """(n, ...) rows of each rank -> (total, ...) all of them in rank order; the gradient of each row flows back
        to the rank it came from (summed over every rank's loss)."""
        if self.world_size == 1:
            return tensor
        counts = self._gather(torch.tensor([len(tensor)], device=self.device)).tolist()
        padded = torch.cat([tensor, tensor.new_zeros(max(counts) - len(tensor), *tensor.shape[1:])])
        gathered = all_gather_single_autograd(padded, 0, _world())
        parts = gathered.split(max(counts))
        return torch.cat([part[:count] for part, count in zip(parts, counts)])

    def sum_rows(self, tensor):
        """A tensor summed over the ranks, with its gradient: the batch statistics of the whole batch."""
        if self.world_size == 1:
            return tensor
        return all_gather_single_autograd(tensor[None], 0, _world()).sum(0)

    def total(self, count):
        """A number summed over the ranks."""
        if self.world_size == 1:
            return count
        return self._gather(torch.tensor([count], dtype=torch.float64, device=self.device)).sum().item()

    def all_reduce_sums(self, sums):
        """{metric: (numerator, denominator)} of this rank -> the same summed over every rank."""
        if self.world_size == 1:
            return sums
        keys = sorted(sums)
        flat = torch.tensor([float(x) for k in keys for x in sums[k]], dtype=torch.float64, device=self.device)
        dist.all_reduce(flat)
        pairs = flat.view(-1, 2).tolist()
        return {k: (num, int(den) if isinstance(sums[k][1], int) else den) for k, (num, den) in zip(keys, pairs)}

    def everywhere(self, flag):
        """True where flag is true on every rank: a decision every rank takes alike (a NaN loss on any stops all)."""
        if self.world_size == 1:
            return flag
        return bool(self._gather(torch.tensor([int(bool(flag))], device=self.device)).min())

    def broadcast(self, obj):
        """Rank 0's obj on every rank (a decision: save, stop, the commands to serve)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather_objects(self, obj):
        """[rank 0's obj, rank 1's, ...] on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def wrap(self, model, strategy):
        """The module that runs the forward pass: model itself in one process, DDP or FSDP2 over it in several."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if self.world_size == 1:
            return model
        if strategy == "fsdp":
            # A group per part the model names (gathered around its forward, and the other methods it is called
            # through, such as encode), then the root for the rest: a process holds one part's weights whole at a
            # time, not the whole model's.
            for part, methods in model.shard_parts() if hasattr(model, "shard_parts") else ():
                fully_shard(part)
                for method in methods:
                    register_fsdp_forward_method(part, method)
            return fully_shard(model)
        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)

    def strategy(self, asked):
        """What wrap() runs for strategy `asked`: none in one process; fsdp, or ddp (auto's choice) in several."""
        return None if self.world_size == 1 else "fsdp" if asked == "fsdp" else "ddp"

    def close(self):
        if self.world_size > 1:
            dist.destroy_process_group()

    def _gather(self, tensor):
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor)
        return torch.cat(out)


SINGLE = DistributedContext()


def _world():
    return dist.group.WORLD


def from_environment(device="auto"):
    """Under torchrun (WORLD_SIZE above 1): join the process group and give this rank's context; else SINGLE."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but no CUDA GPU is available; use --device cpu or auto")
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", **_attempt_store())
    # DCP's background saves run collectives while training runs its own: on groups of their own, in host memory,
    # one for each save that may be in flight at once (dcp_checkpoint.ShardWriter's slots)
    checkpoint_groups = tuple(dist.new_group(backend="gloo") for _ in range(CHECKPOINT_SLOTS))
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank,
                              torch.device("cuda", local_rank) if cuda else torch.device("cpu"), checkpoint_groups)


def _attempt_store():
    """Under torchrun, the rendezvous store seen through a prefix of this attempt's own: when torchrun restarts the
    group (--max-restarts), its store still holds the failed attempt's addresses, and the new ranks would try to
    connect to those (measured: most restarts failed so, none with the prefix). Empty outside torchrun (env://)."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return {}
    from datetime import timedelta
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not hosted_by_agent and rank == 0, timeout=timedelta(minutes=30),
                          multi_tenant=True)
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    return {"store": dist.PrefixStore(f"/attempt_{attempt}", store), "rank": rank, "world_size": world_size}


def leave(code):
    """The exit status for a script's last line: under torchrun with several processes, exit now, skipping the
    interpreter's teardown. A process group's C++ threads may still be joinable when static objects are destroyed
    at exit, which aborts the process (measured: about 1 launch in 10 of 2 processes here ended so, with its work
    done: "terminate called without an active exception", SIGABRT), and torchrun reports the run as failed."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return code
    import logging
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else 1)


def unwrap(model):
    """The module whose state is saved (raw_model): DDP's inner module; FSDP2 shards the module itself."""
    return getattr(model, "module", model)


def full_state(model, optimizer):
    """Every rank's part of the whole (unsharded) state; on rank 0, (model state, optimizer state in torch.optim's
    own form, keyed by position) as one process saves them; elsewhere empty dicts. Every rank must call it."""
    # Imported here: it takes 0.8 s, which a one-process run need not pay.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model_state, by_position(optim_state) if optim_state else optim_state


def load_full_state(model, optimizer, model_state, optim_state):
    """A one-process record's state into a wrapped model and its optimizer (every rank passes the whole record)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    names = [name for name, p in unwrap(model).named_parameters() if p.requires_grad]
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=by_name(optim_state, names),
                   options=StateDictOptions(full_state_dict=True))


def sharded_state(model, optimizer):
    """{"model", "optimizer"}: this rank's part of the state as DCP saves it (FSDP2's shards as DTensors, DDP's
    replicas whole; optimizer state keyed by parameter name). Buffers are copied now: the forward pass that a
    background save overlaps changes batch norm's running figures in place."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    buffers = {name for name, _ in unwrap(model).named_buffers()}
    model_state = {k: v.detach().clone() if k in buffers else v for k, v in model_state.items()}
    return {"model": model_state, "optimizer": optim_state}


def load_sharded_state(model, optimizer, folder):
    """A DCP folder's model and optimizer into this rank's (wrapped) model, resharded to this world size and
    strategy by DCP itself. Every rank must call it."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict
    state = sharded_state(model, optimizer)
    try:
        load(state, storage_reader=FileSystemReader(folder))
    except (Exception, CheckpointException) as e:  # DCP's own is a BaseException, for shards that do not fit
        raise RuntimeError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def by_position(optim_state):
    """Optimizer state keyed by parameter name (DCP's form) -> torch.optim's own, keyed by position in the groups."""
    names = [name for group in optim_state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    groups = [{**group, "params": [index[n] for n in group["params"]]} for group in optim_state["param_groups"]]
    return {"state": {index[n]: s for n, s in optim_state["state"].items()}, "param_groups": groups}


def by_name(optim_state, names):
    """torch.optim's state, keyed by position -> keyed by the parameter names (names: the trainable ones, in
    the optimizer's order)."""
    return {"state": {names[i]: s for i, s in optim_state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]]}
