"""deftly's benchmark suite: every registered structure against ``nn.Linear``, measured in one process.

For each structure (walked from the registry), size ``in x out``, batch, dtype and mode (``fwd``: forward
under ``torch.no_grad()``; ``fwdbwd``: forward + backward to the input and every parameter through
``torch.autograd.grad``) the suite reports

* the median time per call after warm-up (``torch.utils.benchmark.Timer`` with
  ``num_threads=torch.get_num_threads()``; the warm-up also runs the kernel dispatcher's one-off tuning),
* FLOPs from ``layer.flops`` (forward; forward+backward counts 3x forward) and achieved GFLOP/s,
* the speed-up over ``nn.Linear`` of the same size, dtype and mode, timed in the same process and
  interleaved with the structure (blocks of calls alternate), so both see the same load,
* the ideal speed-up ``dense FLOPs / structured FLOPs`` and the fraction of it achieved (which equals
  the ratio of the two GFLOP/s figures),
* the peak memory of one forward+backward: the high-water mark of bytes live in torch's CPU allocator
  during the call, from the ``[memory]`` allocation/free events of ``torch.profiler`` (the kernels'
  workspace pool is emptied first, so buffers it keeps count as allocations),
* the backend the dispatcher chose (:mod:`deftly.kernels.dispatch`).

Peers from PyPI, when importable: ``cola-ml`` Kronecker / block-diagonal / low-rank operators and PEFT's
LoRA and BOFT layers. The default run is a quick subset (n = 4096, fp32); ``--full`` runs the whole grid
(``n`` in {1024, 4096} and 1024x4096, batch {1, 64, 2048}, fp32 and bf16 when the CPU runs bf16 matmul
faster than fp32, forced backends side by side). Results go to ``<out>.json``, ``<out>.txt`` (the table)
and ``<out>.png`` (speed-up vs batch per structure, with each structure's ideal as a dashed line).
"""

from .cli import main
from .config import BenchConfig, bench_hparams, full_config, quick_config
from .measure import allocator_name, bf16_check, measure, measure_pair, peak_memory
from .output import format_table, plot, report, write
from .suite import run

__all__ = [
    "BenchConfig",
    "allocator_name",
    "bench_hparams",
    "bf16_check",
    "format_table",
    "full_config",
    "main",
    "measure",
    "measure_pair",
    "peak_memory",
    "plot",
    "quick_config",
    "report",
    "run",
    "write",
]
