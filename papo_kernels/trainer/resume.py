"""What ``--resume`` may change: a resumed run continues the checkpointed run, it does not become another.

The checkpoint's config is the run's config. A resume may change only the fields of
``RESUMABLE_FIELDS``, which change neither what is trained nor on what: where the run
lives, its length (``steps``), threads, micro-batch size, how often it evaluates and
saves, and two settings that compute the same function with other memory and speed:
``attn_implementation`` (eager, SDPA and FlashAttention are the same attention up to
rounding, so a run started with FlashAttention resumes where flash-attn is missing) and
``gradient_checkpointing`` (recomputing activations gives the same gradients). Every
other difference (a learning rate, a preset, a task, a model) is refused, naming the
fields: the optimizer and schedule state would silently keep the old values, or the
steps done and the steps to come would belong to different experiments. ``torch_dtype``
and ``mixed_precision`` are refused too: they change the arithmetic of every update (an
update below half a bfloat16 step of a weight is lost in bfloat16 weights, kept in
float32 ones), and the saved weights and AdamW state are in the checkpoint's dtype. Start
a new run in a new output directory for those.

``steps`` has two more rules:

- it cannot go below the checkpoint's next step (the steps already done would be undone
  in name only: the weights keep them, and a later resume would run them again);
- it cannot change at all while a schedule is laid out over ``steps`` (``lr_schedule``
  'cosine'; ``gamma_schedule`` 'linear' with a non-zero gamma): the steps done followed
  the schedule of the old length, the rest would follow another. A run meant to be
  extended uses ``lr_schedule`` 'constant' and ``gamma_schedule`` 'fixed'.

The tokenizer's vocabulary is stored in the checkpoint and must be the same on resume,
so token ids keep their meaning even when a JSONL file or model folder changed on disk.
"""

from typing import Any, Dict

from .config import TrainerConfig
from .errors import TrainerInputError

RESUMABLE_FIELDS = ("output_dir", "steps", "num_threads", "micro_batch_size", "eval_every", "eval_prompts",
                    "save_every", "attn_implementation", "gradient_checkpointing")
SHOWN_TOKENS = 5  # differing tokens named in an error


def check_resume(checkpoint: Dict[str, Any], config: TrainerConfig, num_processes: int) -> None:
    """Refuse, with ``TrainerInputError``, a resume of ``checkpoint`` (``load_checkpoint``'s payload) under
    ``config`` by ``num_processes`` processes that would not continue the checkpointed run."""
    try:
        saved = TrainerConfig.from_dict(checkpoint["config"]).to_dict()
    except TrainerInputError as error:
        raise TrainerInputError(f"--resume: the checkpoint's config: {error}") from None
    changed = [name for name, value in config.to_dict().items()
               if name not in RESUMABLE_FIELDS and saved[name] != value]
    if changed:
        differences = ", ".join(f"{name} {saved[name]!r} -> {getattr(config, name)!r}" for name in changed)
        raise TrainerInputError(f"--resume: cannot change {differences}: a resumed run keeps its checkpoint's config "
                                f"except {list(RESUMABLE_FIELDS)}; start a new run in another output_dir to change "
                                "the rest")
    saved_processes = len(checkpoint["rng_states"])
    if saved_processes != num_processes:
        raise TrainerInputError(f"--resume: the checkpoint was written by {saved_processes} process(es), this run "
                                f"has {num_processes}; resume with the same number")
    next_step = checkpoint["next_step"]
    if config.steps < next_step:
        raise TrainerInputError(f"--resume: steps {config.steps} is below the checkpoint's next step {next_step} "
                                f"(steps 0-{next_step - 1} are done); give steps >= {next_step}")
    if config.steps != saved["steps"]:
        laid_out = []
        if config.lr_schedule == "cosine":
            laid_out.append("lr_schedule 'cosine'")
        if config.gamma_schedule == "linear" and config.loss_kwargs()["gamma"] != 0:
            laid_out.append("gamma_schedule 'linear'")
        if laid_out:
            raise TrainerInputError(
                f"--resume: steps {config.steps} differs from the checkpoint's {saved['steps']}, but "
                f"{' and '.join(laid_out)} is laid out over steps: steps 0-{next_step - 1} followed the schedule of "
                f"{saved['steps']} steps and the rest would follow another; resume with steps {saved['steps']}, and "
                "give runs you mean to extend lr_schedule 'constant' and gamma_schedule 'fixed'")


def check_vocabulary(saved: Dict[str, int], current: Dict[str, int]) -> None:
    """Refuse a tokenizer whose token -> id map differs from the checkpoint's, naming some differences."""
    if saved == current:
        return
    changed = sorted((token for token in current if saved.get(token) != current[token]), key=str)
    missing = sorted((token for token in saved if token not in current), key=str)
    parts = []
    if changed:
        parts.append(f"{len(changed)} token(s) new or with another id (e.g. {changed[:SHOWN_TOKENS]})")
    if missing:
        parts.append(f"{len(missing)} token(s) of the checkpoint missing (e.g. {missing[:SHOWN_TOKENS]})")
    raise TrainerInputError(f"--resume: the tokenizer's vocabulary differs from the checkpoint's: {'; '.join(parts)}; "
                            "resume with the model, data and tasks the run was trained with")
