"""``opdkit grpo``: GRPO with verifiable math rewards, run by the distillation loop (paper App. A.1, Table 1).

GRPO is the OPD loop with the teacher's token reward switched off and an outcome reward switched on, so this
command is ``opdkit distill`` with different defaults (``GRPO_DEFAULTS``); every ``distill`` key works here too.
Per step: ``rollout.prompts_per_step`` prompts × ``rollout.n`` samples (default 8, as the paper's GRPO teacher);
each response gets reward 1 if its explicit final answer (``\\boxed{}`` or ``Answer:`` line) matches the
reference under math-verify, else 0; the advantage of a response is its reward minus its group's mean, divided
by the group's standard deviation (``losses.group_advantages``: a group whose rewards are all equal has
advantage 0 and teaches nothing); the loss is −A(y)·ρ_t averaged over all response tokens of the step
(token-mean), with ρ_t ≡ 1 because each rollout gets one update (on-policy, as in the paper's scripts).

**KL to a reference model** (``--kl-coef C``, default off like the paper): the reference is the initial policy,
loaded as the distillation "teacher" (``teacher.path = student.path``), and the sampled-token OPD term is added
with weight C (``objective.name=sampled``, ``objective.opd_weight=C``). Its per-token advantage is
log π_ref(ŷ_t) − log π_θ(ŷ_t), i.e. the k1 estimate of the KL put *into the per-token reward* (not a separate
KL loss and not summed over future tokens), so the gradient is
E[Σ_t (C·(log π_θ − log π_ref)(ŷ_t) − A(y)) ∇log π_θ(ŷ_t)] / #tokens. ``opd/reverse_kl`` then logs the k1
KL(π_θ‖π_ref) per token.

**Hybrid OPD + outcome reward** (paper §6 future work; the reference code's ``token_reward_direct_plus_grpo``):
``opdkit distill objective.outcome_weight=W`` keeps the teacher's dense token reward and adds W × this GRPO term.
"""

from __future__ import annotations

from ..config import ConfigError, DistillConfig, dump_yaml, load_config
from ..data import DatasetError
from ..tracking import console

# The paper's GRPO teacher (Table 1) and the reference grpo.sh: n = 8, temperature 1.0, top-p 1.0, lr 1e-6,
# token-mean aggregation, no KL; weight decay 0.01 and clipping at 1.0 are verl's defaults.
GRPO_DEFAULTS: dict = {
    "objective": {"name": "sampled", "opd_weight": 0.0, "outcome_weight": 1.0, "aggregation": "token_mean"},
    "rollout": {"n": 8, "temperature": 1.0, "top_p": 1.0},
    "optim": {"lr": 1.0e-6, "weight_decay": 0.01, "max_grad_norm": 1.0},
    "run": {"out_dir": "runs/grpo"},
}


def grpo_config(path: str | None, overrides: list[str], kl_coef: float = 0.0) -> DistillConfig:
    """The distill config of a GRPO run: GRPO defaults < YAML < overrides, plus the reference-KL settings."""
    cfg = load_config(DistillConfig, path, overrides, base=GRPO_DEFAULTS)
    if kl_coef < 0:
        raise ConfigError(f"--kl-coef must be >= 0, got {kl_coef}")
    if cfg.objective.outcome_weight <= 0:
        raise ConfigError("opdkit grpo trains on the outcome reward: objective.outcome_weight must be > 0")
    if kl_coef == 0:
        if cfg.uses_teacher:
            raise ConfigError("opdkit grpo without --kl-coef uses no teacher; for OPD plus an outcome reward run "
                              "opdkit distill objective.outcome_weight=W instead")
        return cfg
    if cfg.teacher.path and cfg.teacher.path != cfg.student.path:
        raise ConfigError(f"--kl-coef uses the initial student as the reference model, but teacher.path is set to "
                          f"{cfg.teacher.path}; for KL to a different model use opdkit distill with "
                          f"objective.name=sampled objective.opd_weight={kl_coef}")
    reference = [f"teacher.path={cfg.student.path}", "objective.name=sampled", f"objective.opd_weight={kl_coef}",
                 f"teacher.dtype={cfg.student.param_dtype}", f"teacher.device={cfg.student.device}",
                 "teacher.temperature=1.0"]
    return load_config(DistillConfig, path, overrides + reference, base=GRPO_DEFAULTS)


def run_grpo(cfg: DistillConfig) -> dict:
    from ..train import Distiller

    console.print("[bold]resolved config[/]")
    console.print(dump_yaml(cfg), highlight=False)
    distiller = Distiller(cfg)
    if all(ex.answer is None for ex in distiller.train_set):
        raise DatasetError(f"{cfg.data.train}: no row has a reference answer, so there is no reward; add an 'answer' "
                           f"column (or reward_model.ground_truth), or map one with data.columns={{answer: <col>}}")
    return distiller.run()
