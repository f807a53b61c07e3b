"""minivr1: a small, readable reimplementation of Vision-R1 (arXiv 2503.06749).

Modules, one concern each (the scripts train_sft.py, train_grpo.py, bridge.py and evaluate.py
are the stages; these are what they call):

  the GRPO algorithm
    grpo           the GRPO math as pure tensor functions: advantages, k3 KL, chunked token log-probs, the loss
    grpo_variants  options beside the paper (off by default): DAPO's overlong shaping, Dr.GRPO, GSPO, batch std
    dynamic_sampling  DAPO's dynamic sampling, a rollout engine around another
    stages         PTST stages as data: "LENxG:STEPS,..."
    rollout        sampling completions; the rollout-engine seam and its reference engine (model.generate)
    shared_prompt  speed-ups: a group's shared prompt encoded once (rollout engine and log-prob forward)
    static_engine  speed-up: the rollout's decode step at a fixed shape over preallocated KV buffers (the default)
    policy         the policy as a module returning token log-probs; completion log-probs; the KL reference
    grader         the <think>/<answer> format, answer extraction and equivalence, rewards
  models and data
    models         loading a policy (full / LoRA / QLoRA / adapter) and its processor; standard saving
    tiny           tiny randomly initialised checkpoints built with no model hub
    data           readers for the Vision-R1-cold, Vision-R1-rl and MathVista-style formats
    chat           chat messages, the SFT collator (loss on assistant tokens) and prompt batches
    toy            the built-in synthetic visual-math task
  training runs
    training       the optimizer and schedule, data order, the optimizer step, stop signals, resume, final save
    distributed    what differs between one process, DDP, FSDP2 and DeepSpeed ZeRO, in one place
    checkpoint     atomic, exactly-resumable training checkpoints, verified before use
    rundir         the run folder: one run at a time (a lock); a rerun continues only with the same settings
    tracking       metrics file, tensorboard/wandb, rank-0 printing, progress bars
    plots          training_curves.png of a run (python -m minivr1.plots RUN_DIR)
    config         dataclass arguments through transformers' HfArgumentParser, YAML presets
    cli            running a script: a user's error ends in one line
    threads        how many CPU threads torch uses (one, unless OMP_NUM_THREADS says otherwise)
  bridging and evaluation
    backends       local models and OpenAI-compatible servers behind one `complete` method
    bridging       modality bridging's prompts, filter rules and report
    benchmarks     MathVista, MathVerse, MM-Math, DynaMath: readers, prompts, answer rules, metrics
    evaluation     scoring responses and summarising a run
"""
