"""Compute precision: what `--precision auto` resolves to on this machine (its CPU's instructions, its GPUs'
compute capability), and the Keras dtype policy of each precision."""

from __future__ import annotations

from pathlib import Path

from featcache.errors import BadInputError

PRECISIONS = ("float32", "bfloat16", "float16", "auto")
#: Keras dtype policy of each compute precision: weights stay float32, layers compute in the named type.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def cpu_flags() -> set[str]:
    """The instruction-set flags of this machine's CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """(major, minor) compute capability of each GPU that Keras' backend (TensorFlow, JAX or PyTorch) sees."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [tuple(int(p) for p in str(d.compute_capability).split(".")[:2])
                for d in jax.devices() if getattr(d, "compute_capability", None)]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    import tensorflow as tf

    caps = []
    for gpu in tf.config.list_physical_devices("GPU"):
        cap = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if cap:
            caps.append(tuple(cap))
    return caps


def resolve_precision(precision: str) -> str:
    """The compute precision to use: `precision` itself, or for "auto" what this machine runs fastest.

    auto: bfloat16 on GPUs that have bfloat16 tensor cores (compute capability 8.0 and up) and on
    CPUs with native bfloat16 instructions (AVX512_BF16 or AMX); float16 on older GPUs with float16
    tensor cores (7.x); float32 otherwise.
    """
    if precision not in PRECISIONS:
        raise BadInputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    caps = gpu_compute_capabilities()
    if caps:
        best = min(caps)
        return "bfloat16" if best >= (8, 0) else "float16" if best >= (7, 0) else "float32"
    return "bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "float32"
