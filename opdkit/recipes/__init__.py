"""Recipes around OPD (paper §3-§6): teacher rollouts with rejection sampling, SFT cold start, prompt selection,
GRPO, and benchmark evaluation. One module per recipe; ``cli.py`` wires them into ``opdkit``.

    rollout.py    opdkit rollout      teacher samples -> filtered chat data for SFT
    sft.py        opdkit sft          supervised fine-tuning on assistant tokens (the off-policy cold start)
    prompts.py    opdkit prompts      template stripping / rewriting, mixing sources, a synthetic arithmetic set
    dedup.py      opdkit dedup        exact + embedding deduplication against a reference prompt set
    grpo.py       opdkit grpo         GRPO with verifiable rewards on the distill loop
    benchmark.py  opdkit eval         avg@k / pass@k on math benchmarks; opdkit gap-recovery
    common.py     shared prompt loading and row writing
"""
