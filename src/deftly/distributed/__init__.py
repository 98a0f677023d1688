"""Data-parallel training of structured models under ``torchrun``: DDP and FSDP2, CPU (gloo) or GPU (NCCL).

One small API, the same code path on every backend::

    info = deftly.distributed.setup()                 # reads torchrun's env vars; gloo on CPU, nccl on GPU
    model = deftly.distributed.wrap_model(model, "fsdp2")   # or "ddp", or "none"
    ...  # train: each rank feeds its slice of the global batch (local_slice)
    state = deftly.distributed.full_state_dict(model)  # collective; full CPU tensors on rank 0, {} elsewhere
    deftly.distributed.teardown()

Launch: ``torchrun --standalone --nproc_per_node=2 train.py`` (see ``docs/distributed.md``). Without
torchrun's variables :func:`setup` returns a one-process :class:`DistInfo` and ``wrap_model(m, "none")``
is the identity, so a script runs unchanged on one process.

What structured layers need, and what :func:`wrap_model` does about it
----------------------------------------------------------------------
FSDP2 (``torch.distributed.fsdp.fully_shard``) is applied to every :class:`~deftly.StructuredLinear`
(one all-gather group per layer), then to the root. It

* shards every parameter on dim 0. Structured factors often have a tiny dim 0 (a butterfly's
  ``(depth, log n, n/2, 2, 2)`` twiddles, a rank-1 Kronecker ``(1, m, n)`` factor): sharding them on dim 0
  leaves every rank but rank 0 empty. ``wrap_model`` shards such a parameter on its first other dimension
  that ``world_size`` divides (FSDP2 shards dims other than 0 only evenly), else on dim 0;
* replaces each parameter by a new ``DTensor`` parameter, dropping attributes set on the ``Parameter``
  object: ``wrap_model`` copies them over;
* requires one dtype per group and rejects 0-d parameters; and with torch 2.13, a *complex* parameter
  whose dim 0 does not divide evenly across ranks silently diverges under Adam/AdamW (measured: 4e-2
  after 3 steps; SGD and even shards are fine). ``wrap_model`` therefore stores each complex parameter
  as two real parameters (real and imaginary part, a ``torch.nn.utils.parametrize`` parametrization, so
  the layer code still sees one complex tensor) and each 0-d parameter as a 1-element one. Adam on
  (real, imag) is exactly torch's Adam on a complex tensor (which works on ``view_as_real``). The state-dict
  helpers below translate the keys back, so checkpoints are the same as a single process's. Remaining
  mixed dtypes inside one layer raise a ``ValueError`` naming the layer.
* keeps parameters sharded outside ``forward``: use :func:`gathered` around ``layer.to_dense()``;
  ``reference_forward`` is registered as a forward method so it all-gathers like ``forward``.

DDP requires every parameter to receive a gradient each step unless ``find_unused_parameters=True``:
``wrap_model(..., example_input=x)`` probes one forward/backward in the current process and turns it on
only if some parameter is unused. Non-contiguous parameters (which make DDP's gradient buckets disagree
with the gradient strides) are made contiguous in place before wrapping, for both strategies.

Checkpoints: :func:`full_state_dict` / :func:`full_optimizer_state_dict` return, on rank 0, exactly what a
single process would have (same keys, shapes and dtypes; the optimizer state keyed by parameter name), so
``deftly.io.checkpoint.save_checkpoint`` files move freely between one process and N;
:func:`load_full_state_dict` / :func:`load_full_optimizer_state_dict` check the file against the model on
rank 0 (key, shape, dtype), raise the same ``ValueError`` on every rank before anything is changed, then
broadcast and shard.
"""

from .process import (
    STRATEGIES,
    DistInfo,
    all_reduce_mean,
    barrier,
    info,
    is_main,
    local_slice,
    setup,
    teardown,
)
from .state import (
    check_optimizer_state,
    check_state_dict,
    converted_params,
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
)
from .wrap import gathered, unused_parameters, unwrap, wrap_model

__all__ = ["STRATEGIES", "DistInfo", "all_reduce_mean", "barrier", "check_optimizer_state",
           "check_state_dict", "converted_params", "full_optimizer_state_dict", "full_state_dict", "gathered",
           "info", "is_main", "load_full_optimizer_state_dict", "load_full_state_dict", "local_slice",
           "setup", "teardown", "unused_parameters", "unwrap", "wrap_model"]
