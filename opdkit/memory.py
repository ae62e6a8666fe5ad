"""Per-rank memory of a distillation run, computed from the model configs and the run config before step 1.

Counts the persistent tensors, which dominate at scale: student weights, gradients and AdamW moments (each
divided by the number of ranks under ``distributed.strategy=fsdp2``), the transient full weights of the FSDP
units being gathered, the sampler's copy of the student, the frozen teacher and the rollout KV cache.
Activations are left out: with chunked heads and (optionally) activation checkpointing they scale with the
micro-batch, not the model, and are best measured (``opdkit bench``).
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama / Qwen-style decoder (GQA attention, gated MLP, RMSNorm)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qk_norm: bool = False  # Qwen3: an RMSNorm over head_dim on q and k in every layer
    attention_bias: bool = False

    @classmethod
    def from_hf_config(cls, cfg) -> "ModelShape":
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        heads = get("num_attention_heads")
        model_type = get("model_type", "")
        return cls(vocab=get("vocab_size"), hidden=get("hidden_size"), layers=get("num_hidden_layers"),
                   heads=heads, kv_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or get("hidden_size") // heads, intermediate=get("intermediate_size"),
                   tied=bool(get("tie_word_embeddings", False)), qk_norm=model_type.startswith("qwen3"),
                   attention_bias=bool(get("attention_bias", False)))

    def layer_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = self.hidden * q + 2 * self.hidden * kv + q * self.hidden
        if self.attention_bias:
            attn += q + 2 * kv + self.hidden
        norms = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return attn + 3 * self.hidden * self.intermediate + norms

    def root_params(self) -> int:
        """Embedding, final norm and (untied) head: the parameters of FSDP's root unit."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def param_count(self) -> int:
        return self.layers * self.layer_params() + self.root_params()

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def memory_table(*, student: ModelShape, world_size: int = 1, strategy: str = "ddp", param_dtype: str = "float32",
                 compute_dtype: str = "float32", sampling_dtype: str = "float32", cpu_offload: bool = False,
                 teacher: ModelShape | None = None, teacher_dtype: str = "bfloat16",
                 teacher_head_dtype: str = "float32", rollout_rows: int = 1, max_len: int = 1024,
                 trainable: int | None = None) -> list[tuple[str, int, str]]:
    """Rows ``(what, bytes per rank, where)`` of one rank's memory.

    Args:
        teacher: the teacher's shape when it runs in this process (HF engine); None when it runs on its own
            engine (vLLM / served), whose memory is the server's.
        rollout_rows: sequences this rank samples at once (prompts_per_step / world_size * n).
        max_len: longest prompt + response of a rollout row (data.max_prompt_length + rollout.max_new_tokens).
        trainable: trainable parameters (LoRA); default all of the student's.
    """
    n = student.param_count()
    trainable = n if trainable is None else trainable
    shard = world_size if strategy == "fsdp2" else 1
    pb = DTYPE_BYTES[param_dtype]
    where = "cpu" if cpu_offload and strategy == "fsdp2" else "device"
    rows = [("student weights", -(-n * pb // shard), where),
            ("student grads", -(-trainable * pb // shard), where),
            # fused AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype
            ("optimizer (AdamW moments)", -(-2 * trainable * pb // shard), where)]
    if strategy == "fsdp2":
        gathered = DTYPE_BYTES[compute_dtype] if compute_dtype != param_dtype else pb
        # the root unit (embedding + head, gathered in the head's dtype = the master dtype by default) stays
        # gathered from forward to backward; of the layers, the running one and the one prefetched
        unit = student.root_params() * pb + 2 * student.layer_params() * gathered
        rows.append(("fsdp2 gathered units (transient)", unit, "device"))
    sb = DTYPE_BYTES[sampling_dtype]
    copies = strategy == "fsdp2" or sampling_dtype != param_dtype  # else the sampler uses the trained module
    rows.append(("sampler copy of the student", n * sb if copies else 0, "device"))
    if teacher is not None:
        # HeadProjection casts the head to its dtype: a second copy only when the dtypes differ
        head = teacher.vocab * teacher.hidden * DTYPE_BYTES[teacher_head_dtype] \
            if teacher_head_dtype != teacher_dtype else 0
        rows.append(("teacher (frozen) + head copy", teacher.param_count() * DTYPE_BYTES[teacher_dtype] + head,
                     "device"))
    else:
        rows.append(("teacher (own engine)", 0, "server"))
    rows.append(("rollout KV cache", rollout_rows * max_len * student.kv_bytes_per_token(sb), "device"))
    return rows


def table_for_run(cfg, student_config, teacher_config=None, world_size: int = 1,
                  trainable: int | None = None) -> list[tuple[str, int, str]]:
    """``memory_table`` for a DistillConfig and the students'/teacher's HF configs."""
    teacher = None
    if teacher_config is not None and cfg.teacher.engine == "hf" and not cfg.teacher.route:
        teacher = ModelShape.from_hf_config(teacher_config)
    return memory_table(
        student=ModelShape.from_hf_config(student_config), world_size=world_size,
        strategy=cfg.distributed.strategy, param_dtype=cfg.student.param_dtype,
        compute_dtype=cfg.student.compute_dtype, sampling_dtype=cfg.student.sampling_dtype,
        cpu_offload=cfg.distributed.cpu_offload, teacher=teacher, teacher_dtype=cfg.teacher.dtype,
        teacher_head_dtype=cfg.teacher.head_dtype,
        rollout_rows=cfg.rollout.prompts_per_step // max(world_size, 1) * cfg.rollout.n,
        max_len=cfg.data.max_prompt_length + cfg.rollout.max_new_tokens, trainable=trainable)


def format_table(rows: list[tuple[str, int, str]], world_size: int = 1) -> str:
    def human(b: int) -> str:
        for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if b >= size:
                return f"{b / size:.2f} {unit}"
        return f"{b} B"

    width = max(len(r[0]) for r in rows)
    lines = [f"memory per rank ({world_size} rank{'s' if world_size > 1 else ''}, persistent tensors; "
             f"activations not included)"]
    lines += [f"  {what:<{width}}  {human(b):>11}  {where}" for what, b, where in rows]
    for place in ("device", "cpu"):
        total = sum(b for _, b, w in rows if w == place)
        if total:
            lines.append(f"  {'total on ' + place:<{width}}  {human(total):>11}")
    return "\n".join(lines)
