"""The DeepSpeed config dict, derived from the typed TrainConfig (never written by hand)."""
from __future__ import annotations

from typing import Any, Dict

from dino_platform.train.config import TrainConfig

def build_deepspeed_config(cfg: TrainConfig) -> Dict[str, Any]:
    """ZeRO stage, precision, batch sizes and clipping for ``deepspeed.initialize(config=...)``.

    The optimizer is not described here: the loop passes a ``torch.optim.AdamW`` built from the
    official parameter groups, which DeepSpeed accepts with ``zero_allow_untested_optimizer`` (its
    own FusedAdam would compile a CUDA/C++ extension and is not needed for correctness).

    Precision: ``bf16``/``fp16`` use DeepSpeed's ``torch_autocast``, not its ``bf16``/``fp16``
    sections. Those cast the parameters and nothing else (buffers, images and tensors made inside
    forward stay fp32, and the first convolution fails); autocast keeps fp32 parameters, optimizer
    state and gradient reduction, runs matmuls and convolutions in the low dtype inside
    ``engine(...)`` only, and for fp16 adds DeepSpeed's dynamic loss scaling (a GradScaler).
    """
    s, ds = cfg.scaling, cfg.deepspeed
    config: Dict[str, Any] = {
        "train_batch_size": cfg.total_batch_size,
        "train_micro_batch_size_per_gpu": s.batch_size_per_worker,
        "gradient_accumulation_steps": s.accumulation_steps,
        "gradient_clipping": cfg.optim.clip_max_norm,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": ds.zero_stage},
        # progress is reported through Ray Train; DeepSpeed's own per-step prints would duplicate it
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.precision != "fp32":
        config["torch_autocast"] = {
            "enabled": True,
            "dtype": {"bf16": "bfloat16", "fp16": "float16"}[ds.precision],
            # no module's gradients are reduced in the low dtype: ZeRO buckets stay fp32
            "lower_precision_safe_modules": [],
        }
    if ds.zero_stage >= 1:
        # overlapping communication with the backward pass only pays on GPUs (separate streams)
        config["zero_optimization"].update(overlap_comm=bool(s.use_gpu), reduce_bucket_size=ds.bucket_size,
                                           allgather_bucket_size=ds.bucket_size)
    return config
