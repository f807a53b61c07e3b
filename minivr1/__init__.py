"""minivr1: a small, readable reimplementation of Vision-R1 (arXiv 2503.06749).

Modules, one concern each:
    tiny        builds tiny randomly initialised Qwen2.5-VL checkpoints (no model hub)
    models      loads a policy (full / LoRA / QLoRA / adapter) and its processor
    data        readers for the Vision-R1-cold, Vision-R1-rl and MathVista-style formats
    chat        chat messages, the SFT collator (loss on assistant tokens) and prompt batches
    grader      the <think>/<answer> format, answer extraction and equivalence, rewards
    toy         the built-in synthetic visual-math task
    grpo        the GRPO math: advantages, token logprobs, KL, the clipped loss
    config      dataclass arguments -> argparse/--help, YAML presets
    checkpoint  atomic, exactly-resumable training checkpoints
    tracking    metrics file, tensorboard/wandb, rank-0 printing
"""
