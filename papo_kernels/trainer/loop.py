"""The GRPO/PAPO training loop.

One step, in order:

1. sample B prompts (image, question, verifiable answer); under data parallelism each
   process takes its slice of the same global batch;
2. make one masked image per prompt (random patch blackening);
3. roll out G responses per prompt with ``model.generate``;
4. score them (accuracy + format);
5. group-relative advantages, optionally DAPO's filter of groups without signal;
6. old log-probs (only when the policy moves between optimizer steps of the batch:
   several PPO epochs or minibatches; otherwise the ratio is 1 by definition) and
   reference log-probs (when beta > 0), without gradient;
7. per PPO epoch and minibatch: forward clean and masked inputs through the model's own
   forward (final hidden states; the LM head gets an empty slice, so no logits),
   ``papo_loss`` on the head's own weight (no copy) with the sampling bias (``policy.sampling_bias``),
   accumulate the gradients of the micro-batches with the ``dapo`` normaliser of the whole minibatch,
   clip the gradient norm, AdamW step (under fp16's loss scaler an overflow, a non-finite norm, skips the step and
   lowers the scale, as accelerate's scaler does; without a scaler it stops the run);
8. log the step's metrics.
"""

import copy
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor
from tqdm.auto import tqdm

from .. import papo_loss
from .advantages import group_advantages, informative_groups, keep_responses
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainerConfig
from .data import JsonlDataset, SyntheticShapes, synthetic_words
from .errors import TrainerInputError
from .files import prepare_output_dir, remove_orphans
from .local_model import load_local_model
from .lock import OutputDirectoryLock
from .metrics_log import METRICS_NAME, MetricsLog, read_metrics
from .model_options import (TORCH_DTYPES, check_mixed_precision, enable_gradient_checkpointing,
                            resolve_attn_implementation)
from .plotting import PLOT_NAME, plot_metrics
from .policy import (CompletionHiddenStates, clean_and_masked_inputs, head_tokens, response_logprobs, sampling_bias,
                     sequence_inputs)
from .resume import check_resume, check_vocabulary
from .rewards import extract_answer, is_correct, score_response
from .rollout import Rollout, encode_prompts, generate, masked_pixel_values, roll_out
from .sharding import (check_strategy, full_state, gathered_root, initialise_root, load_full_model_state,
                       load_full_optimizer_state)
from .tiny_model import build_model, build_processor

LOSS_METRICS = ("policy_loss", "clip_fraction_low", "clip_fraction_high", "perception_kl", "ref_kl", "entropy",
                "entropy_masked", "ratio_mean")
EVAL_STEP = -1  # the evaluation prompts are the data's draw for a step that training never reaches


def derived_seed(*parts) -> int:
    """A 63-bit seed that depends on every part (seed, step, process, purpose)."""
    return random.Random("-".join(map(str, parts))).getrandbits(63)


class Trainer:
    """Builds the model, data, optimizer and (when resuming) their saved state; ``train()`` runs the steps.

    Everything the user gives (config, output directory, checkpoint and resume request, data)
    is checked before the model is built; a problem is a ``TrainerInputError`` naming it. A new
    run (no ``resume``) is refused where an earlier run left a checkpoint, unless
    ``overwrite_output_dir`` deletes it. The output directory is this run's alone from the
    constructor to the end of ``train()``, or to ``close()`` (``lock.py``): another run there is refused.
    """

    def __init__(self, config: TrainerConfig, resume: bool = False, accelerator: Optional[Accelerator] = None,
                 overwrite_output_dir: bool = False):
        self.config = config.validate()
        # The config decides; `accelerate launch --mixed_precision` asking for another one is refused, not ignored.
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if accelerator is None and launched not in ("no", config.mixed_precision):
            raise TrainerInputError(f"config field 'mixed_precision': got {config.mixed_precision!r}, but accelerate "
                                    f"launch asks for {launched!r}; give the same value to both")
        # cpu=True when there is no GPU lets `accelerate launch` run several CPU processes (gloo).
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available(),
                                                      mixed_precision=config.mixed_precision)
        world = self.accelerator.num_processes
        check_strategy(self.accelerator, config)
        check_mixed_precision(self.accelerator.mixed_precision, self.accelerator.device)
        self.attn_implementation = resolve_attn_implementation(config.attn_implementation, self.accelerator.device)
        torch.set_num_threads(config.num_threads)
        if config.prompts_per_step % world:
            raise TrainerInputError(f"config field 'prompts_per_step': got {config.prompts_per_step}, expected a "
                                    f"multiple of the number of processes ({world})")
        self.local_prompts = config.prompts_per_step // world
        if config.minibatches > self.local_prompts * config.group_size:
            raise TrainerInputError(f"config field 'minibatches': got {config.minibatches}, expected at most the "
                                    f"responses per process ({self.local_prompts * config.group_size})")
        self.loss_kwargs = config.loss_kwargs()
        prepare_output_dir(config.output_dir, (CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME))
        # One writer per output directory, from here to the end of train() (or of a failed set-up).
        self.output_lock = OutputDirectoryLock(config.output_dir)
        if self.accelerator.is_main_process:
            self.output_lock.acquire()
        try:
            self._set_up(resume, overwrite_output_dir)
        except BaseException:
            self.output_lock.release()
            raise

    def _set_up(self, resume: bool, overwrite_output_dir: bool) -> None:
        """The rest of ``__init__``, in an output directory this run holds: its files, the data, the model, the
        optimizer and the checkpoint's state."""
        config, world = self.config, self.accelerator.num_processes
        if self.accelerator.is_main_process:
            remove_orphans(config.output_dir, (CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME))
        checkpoint = None
        self.start_step = 0
        checkpoint_path = Path(config.output_dir) / CHECKPOINT_NAME
        if resume and overwrite_output_dir:
            raise TrainerInputError("--overwrite-output-dir starts a new run; it cannot be given with --resume")
        if resume:
            checkpoint = load_checkpoint(config.output_dir)
            check_resume(checkpoint, config, world)
            self.start_step = checkpoint["next_step"]
        elif checkpoint_path.exists() and not overwrite_output_dir:
            # A new run would rewrite metrics.jsonl at once but the old checkpoint only at its first save.
            raise TrainerInputError(f"output_dir: {config.output_dir} holds the checkpoint of an earlier run; pass "
                                    "--resume to continue it, or --overwrite-output-dir to start a new run there (or "
                                    "choose another --output-dir)")
        elif checkpoint_path.exists() and self.accelerator.is_main_process:
            # Deleted before metrics.jsonl is rewritten: a kill in between leaves no checkpoint to resume wrongly.
            checkpoint_path.unlink()
        # Read (and check) the metrics of the steps kept; the file is rewritten when train() starts.
        self.metrics_log = MetricsLog(config.output_dir, self.start_step) if self.accelerator.is_main_process \
            else None

        if config.data is not None:
            self.dataset = JsonlDataset(config.data, config.seed)
        else:
            self.dataset = SyntheticShapes(config.tasks, config.image_size, config.seed)
        dtype = TORCH_DTYPES[config.torch_dtype]
        if config.model is not None:
            model, self.processor = load_local_model(config.model, dtype, self.attn_implementation, config.model_type)
        else:
            words = synthetic_words(config.tasks) if config.data is None else self.dataset.words()
            self.processor = build_processor(words, config.image_size)
            model = build_model(self.processor.tokenizer, config.seed, config.model_type or "qwen2_vl", dtype,
                                self.attn_implementation)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)

        if config.data is not None:
            self.dataset.check_special_tokens(self.processor.tokenizer.all_special_tokens)
        self.tokenizer_vocabulary = self.processor.tokenizer.get_vocab()
        if checkpoint is not None:
            check_vocabulary(checkpoint["vocabulary"], self.tokenizer_vocabulary)
        self._setup_tokens(model)
        self.reference = None
        if self.loss_kwargs["beta"] > 0:
            self.reference = CompletionHiddenStates(self._frozen_copy(model).to(self.accelerator.device),
                                                    self.sampling_bias)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        # The Hugging Face model itself is what accelerate wraps (DDP) or shards (FSDP2), as TRL's trainers do.
        self.policy, self.optimizer = self.accelerator.prepare(model, optimizer)
        initialise_root(self.policy, self.pad_id)
        self.hidden_states = CompletionHiddenStates(self.policy, self.sampling_bias)

        seed = derived_seed(config.seed, "process", self.accelerator.process_index)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if checkpoint is not None:
            self._restore(checkpoint)

    # Setup.

    def _setup_tokens(self, model) -> None:
        """End-of-turn, padding and suppressed ids, and the loss's bias that suppresses them
        (``policy.sampling_bias``)."""
        tokenizer = self.processor.tokenizer
        eos = model.generation_config.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        head = model.get_output_embeddings().weight
        vocab_size = head.shape[0]
        vision_ids = [model.config.image_token_id, model.config.video_token_id, model.config.vision_start_token_id,
                      model.config.vision_end_token_id]
        # Special tokens (other than end-of-turn) and head rows past the tokenizer are never sampled.
        suppressed = set(tokenizer.all_special_ids) | set(vision_ids) | set(range(len(tokenizer), vocab_size))
        suppressed -= set(self.eos_ids)
        self.suppress_ids = sorted(suppressed)
        self.sampling_bias = sampling_bias(vocab_size, self.suppress_ids, head.dtype, self.accelerator.device)

    @staticmethod
    def _frozen_copy(model):
        """The reference policy: a gradient-free copy in the model's dtype and attention kernel."""
        reference = copy.deepcopy(model)
        reference.requires_grad_(False)
        return reference.eval()

    def _lr_factor(self, step: int) -> float:
        if self.config.lr_schedule == "constant":
            return 1.0
        # Cosine decay to a tenth of the peak over the run.
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(step, self.config.steps) / self.config.steps))

    @property
    def model(self):
        """The Hugging Face model being trained (unwrapped from DDP; FSDP2 shards it in place)."""
        return self.accelerator.unwrap_model(self.policy)

    @contextmanager
    def sampling(self):
        """The context of every ``generate`` on the trained model: the training forward's autocast (mixed_precision),
        and under FSDP the root unit gathered (``sharding.gathered_root``)."""
        with gathered_root(self.policy), self.accelerator.autocast():
            yield

    # Checkpoints.

    def save(self, next_step: int) -> None:
        rng_states = gather_object([rng_state(self.accelerator.device)])
        model_state, optimizer_state = full_state(self.model, self.optimizer)
        if self.accelerator.is_main_process:
            scaler = self.accelerator.scaler
            save_checkpoint(self.config.output_dir, model_state=model_state, optimizer_state=optimizer_state,
                            scheduler_state=self.scheduler.state_dict(), next_step=next_step, rng_states=rng_states,
                            config=self.config.to_dict(), vocabulary=self.tokenizer_vocabulary,
                            scaler_state=None if scaler is None else scaler.state_dict())
        self.accelerator.wait_for_everyone()

    def _restore(self, checkpoint: Dict) -> None:
        """Load the state of a checkpoint that ``check_resume`` and ``check_vocabulary`` accepted."""
        where = self.config.model or "the tiny default"
        try:
            load_full_model_state(self.model, checkpoint["model"])
        except RuntimeError as error:  # missing or unexpected keys, or shapes that differ
            raise TrainerInputError(f"--resume: the checkpoint's weights do not fit the model of {where} "
                                    f"({' '.join(str(error).split())[:300]})") from None
        try:
            # The torch optimizer inside accelerate's wrapper: torch fills empty state with a step of zero gradients,
            # which the wrapper would hand to fp16's loss scaler before any loss was scaled.
            load_full_optimizer_state(self.model, self.optimizer.optimizer, checkpoint["optimizer"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise TrainerInputError(f"--resume: the checkpoint's optimizer state does not fit the parameters of "
                                    f"{where} ({type(error).__name__}: {' '.join(str(error).split())[:300]}); "
                                    "checkpoints written before the state was keyed by parameter name cannot be "
                                    "resumed") from None
        try:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        except (KeyError, TypeError, ValueError) as error:
            raise TrainerInputError(f"--resume: the checkpoint's learning-rate schedule cannot be loaded "
                                    f"({type(error).__name__}: {' '.join(str(error).split())[:300]})") from None
        if self.accelerator.scaler is not None and checkpoint.get("scaler") is not None:
            self.accelerator.scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng_states"][self.accelerator.process_index], self.accelerator.device)

    # One step.

    def make_rollout(self, step: int):
        """Steps 1-4: this process's prompts, their masked images, G responses each, and their scores."""
        config, rank = self.config, self.accelerator.process_index
        examples = self.dataset.batch(step, config.prompts_per_step)
        examples = examples[rank * self.local_prompts:(rank + 1) * self.local_prompts]
        mask_generator = torch.Generator().manual_seed(derived_seed(config.seed, step, rank, "mask"))
        prompt = encode_prompts(self.processor, examples)
        masked = masked_pixel_values(self.processor, examples, prompt, config.mask_target, config.mask_cell,
                                     config.mask_probability, mask_generator)
        device = self.accelerator.device
        prompt = {key: value.to(device) for key, value in prompt.items()}
        self.model.eval()
        with self.sampling():
            rollout = roll_out(self.model, self.processor, examples, config.group_size, masked.to(device), prompt,
                               max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                               top_p=config.top_p, suppress_ids=self.suppress_ids, eos_ids=self.eos_ids,
                               pad_id=self.pad_id)
        scores = torch.tensor([score_response(text, answer, config.answer_format, config.accuracy_weight,
                                              config.format_weight) for text, answer in zip(rollout.texts,
                                                                                            rollout.answers)])
        return rollout, scores.to(device)

    def micro_batch_loss(self, rollout: Rollout, index: Tensor, advantages: Tensor, num_items_in_batch,
                         loss_kwargs: Dict, old_logprobs: Optional[Tensor], ref_logprobs: Optional[Tensor],
                         masked_logprobs: Optional[Tensor], with_masked_pass: bool):
        """``papo_loss`` of the responses ``index``: one forward of their clean (and masked) inputs."""
        mask = rollout.completion_mask[index]
        tokens = head_tokens(rollout.completion_ids[index], mask, self.sampling_bias)
        hidden_masked = None
        if with_masked_pass:
            hidden, weight, bias = self.hidden_states(clean_and_masked_inputs(rollout, index), mask.shape[1])
            hidden, hidden_masked = hidden.chunk(2)
        else:
            hidden, weight, bias = self.hidden_states(sequence_inputs(rollout, index, masked=False), mask.shape[1])

        def rows(value: Optional[Tensor]) -> Optional[Tensor]:
            return None if value is None else value[index]

        return papo_loss(hidden, weight, tokens, mask, advantages[index], hidden_masked=hidden_masked,
                         masked_logprobs=rows(masked_logprobs), old_logprobs=rows(old_logprobs),
                         ref_logprobs=rows(ref_logprobs), bias=bias, num_items_in_batch=num_items_in_batch,
                         **loss_kwargs)

    def step_loss_kwargs(self, step: int) -> Dict:
        """The loss settings at ``step``: gamma and the entropy coefficients scaled by the gamma schedule."""
        scale = self.config.coefficient_scale(step)
        kwargs = dict(self.loss_kwargs)
        for name in ("gamma", "eta_clean", "eta_masked"):
            kwargs[name] = kwargs[name] * scale
        return kwargs

    def update(self, rollout: Rollout, advantages: Tensor, step: int) -> Dict[str, float]:
        """Steps 6-7; returns the token-weighted means of the loss metrics, the loss, the last grad norm and how many
        optimizer steps the loss scaler skipped (``scaler_skipped_updates``, fp16 overflows)."""
        config, accelerator = self.config, self.accelerator
        world = accelerator.num_processes
        loss_kwargs = self.step_loss_kwargs(step)
        papo_terms = any(loss_kwargs[name] != 0 for name in ("gamma", "eta_clean", "eta_masked"))
        with_masked_pass = papo_terms and config.masked_gradient
        old_logprobs = ref_logprobs = masked_logprobs = None
        if config.ppo_epochs > 1 or config.minibatches > 1:
            old_logprobs = response_logprobs(self.hidden_states, rollout, config.temperature, config.micro_batch_size)
        if self.reference is not None:
            # The reference is not prepared by accelerate: its forward gets the policy's autocast here.
            with accelerator.autocast():
                ref_logprobs = response_logprobs(self.reference, rollout, config.temperature, config.micro_batch_size)
        if papo_terms and not config.masked_gradient:
            masked_logprobs = response_logprobs(self.hidden_states, rollout, config.temperature,
                                                config.micro_batch_size, masked=True)

        # tensor_split, not chunk: exactly `minibatches` parts whose sizes differ by at most one (chunk gives 6 of 16
        # responses in 7 parts); __init__ refuses more minibatches than responses.
        minibatches = torch.arange(len(rollout), device=advantages.device).tensor_split(config.minibatches)
        # Response tokens of each minibatch over all processes; DDP averages gradients, so divide by the processes.
        local_tokens = torch.stack([rollout.completion_mask[index].sum() for index in minibatches]).float()
        normalisers = accelerator.reduce(local_tokens, "sum") / world

        self.policy.train()
        sums = {name: 0.0 for name in LOSS_METRICS}
        weight_total, loss_total, grad_norm, optimizer_steps, scaler_skipped_updates = 0.0, 0.0, 0.0, 0, 0
        for _ in range(config.ppo_epochs):
            for index, normaliser in zip(minibatches, normalisers):
                if normaliser == 0:  # every group of this minibatch was dropped (dapo_filter): nothing to learn
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                micro_batches = index.split(config.micro_batch_size)
                for number, micro in enumerate(micro_batches):
                    # Synchronise gradients across processes only once, after the last micro-batch.
                    sync = number == len(micro_batches) - 1
                    with nullcontext() if sync else accelerator.no_sync(self.policy):
                        loss, metrics = self.micro_batch_loss(rollout, micro, advantages, normaliser, loss_kwargs,
                                                              old_logprobs, ref_logprobs, masked_logprobs,
                                                              with_masked_pass)
                        accelerator.backward(loss)
                    tokens = float(rollout.completion_mask[micro].sum())
                    for name in LOSS_METRICS:
                        sums[name] += float(metrics[name]) * tokens
                    loss_total += float(loss.detach())
                    weight_total += tokens
                grad_norm = float(accelerator.clip_grad_norm_(self.policy.parameters(), config.max_grad_norm))
                # Under fp16's loss scaler a non-finite norm is an overflow of the scaled gradients: the scaler's
                # step skips the update and lowers the scale. Without one the gradients themselves are not finite.
                if not math.isfinite(grad_norm) and accelerator.scaler is None:
                    raise FloatingPointError(f"step {step}: the gradient norm is {grad_norm}; stopping before the "
                                             "optimizer writes non-finite weights")
                self.optimizer.step()
                scaler_skipped_updates += int(self.optimizer.step_was_skipped)
                optimizer_steps += 1
        means = {name: value / max(weight_total, 1.0) for name, value in sums.items()}
        # The minibatch objective (its micro-batch losses summed), averaged over the optimizer steps.
        means["loss"] = loss_total / optimizer_steps
        means["grad_norm"] = grad_norm
        means["scaler_skipped_updates"] = scaler_skipped_updates
        return means

    def train_step(self, step: int) -> Dict[str, float]:
        config, accelerator = self.config, self.accelerator
        start = time.perf_counter()
        rollout, scores = self.make_rollout(step)
        generation_time = time.perf_counter() - start
        rewards, accuracy, well_formed = scores.unbind(dim=1)
        response_length = rollout.completion_mask.sum(dim=1).float()

        advantages = group_advantages(rewards, config.group_size, config.scale_advantages_by_std)
        kept = torch.ones(len(rollout) // config.group_size, dtype=torch.bool, device=rewards.device)
        if config.dapo_filter:
            kept = informative_groups(rewards, config.group_size)
            # A dropped group's tokens become padding: no loss and no share of the normaliser.
            rollout.completion_mask = rollout.completion_mask & keep_responses(kept, config.group_size)[:, None]
        signal = (advantages.abs() * keep_responses(kept, config.group_size)).sum()
        global_signal, global_tokens = accelerator.reduce(
            torch.stack([signal, rollout.completion_mask.sum().float()]), "sum").tolist()
        skipped = global_tokens == 0 or (config.skip_uninformative_steps and global_signal == 0)

        update_start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]  # the rate of this step's updates, before the schedule moves on
        update_metrics = {} if skipped else self.update(rollout, advantages, step)
        self.scheduler.step()
        update_time = time.perf_counter() - update_start

        local = torch.stack([rewards.mean(), accuracy.mean(), well_formed.mean(), response_length.mean(),
                             kept.float().mean()])
        reward, acc, fmt, length, kept_fraction = accelerator.reduce(local, "mean").tolist()
        generated_tokens = float(accelerator.reduce(response_length.sum(), "sum"))
        step_time = time.perf_counter() - start
        record = {"step": step, "reward": reward, "accuracy": acc, "format": fmt, "response_length": length,
                  "kept_groups": kept_fraction, "skipped": int(skipped), "lr": lr,
                  "gamma": self.step_loss_kwargs(step)["gamma"]}
        if update_metrics:
            names = list(update_metrics)
            averaged = accelerator.reduce(torch.tensor([update_metrics[n] for n in names],
                                                       device=accelerator.device), "mean").tolist()
            record.update(dict(zip(names, averaged)))
        record.update(generation_time=generation_time, update_time=update_time, step_time=step_time,
                      tokens_per_s=generated_tokens / step_time)
        return record

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Greedy answers to ``eval_prompts`` fixed prompts (images no training step draws, for the synthetic tasks;
        a fixed sample of the file, for JSONL data), on their clean images and on masked copies (the training mask
        settings, one fixed mask per prompt).

        ``eval_accuracy`` and ``eval_accuracy_masked``: the fraction answered right (their difference is the
        policy's vision dependence); ``eval_junk`` and ``eval_junk_masked``: the fraction of responses whose answer
        matches no answer that an evaluation prompt with the same question has (a question word, an unreadable or
        empty response).
        """
        config = self.config
        examples = self.dataset.batch(EVAL_STEP, config.eval_prompts)
        prompt = encode_prompts(self.processor, examples)
        mask_generator = torch.Generator().manual_seed(derived_seed(config.seed, "eval", "mask"))
        masked = masked_pixel_values(self.processor, examples, prompt, config.mask_target, config.mask_cell,
                                     config.mask_probability, mask_generator)
        answers = {}  # question -> the answers the evaluation prompts with that question have
        for example in examples:
            answers.setdefault(example.question, set()).add(example.answer)
        self.model.eval()
        metrics = {}
        for suffix, pixel_values in (("", prompt["pixel_values"]), ("_masked", masked)):
            inputs = {key: value.to(self.accelerator.device) for key, value in
                      {**prompt, "pixel_values": pixel_values}.items()}
            completion_ids = generate(self.model, inputs, max_new_tokens=config.max_new_tokens, do_sample=False,
                                      temperature=config.temperature, top_p=config.top_p,
                                      suppress_ids=self.suppress_ids, eos_ids=self.eos_ids, pad_id=self.pad_id)
            texts = self.processor.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            predicted = [extract_answer(text, config.answer_format) for text in texts]
            correct = [is_correct(answer, example.answer) for answer, example in zip(predicted, examples)]
            junk = [not any(is_correct(answer, known) for known in answers[example.question])
                    for answer, example in zip(predicted, examples)]
            metrics["eval_accuracy" + suffix] = sum(correct) / len(correct)
            metrics["eval_junk" + suffix] = sum(junk) / len(junk)
        return metrics

    # The run.

    def train(self) -> List[Dict[str, float]]:
        """Run the remaining steps; write metrics, checkpoints and the plot; return this run's step records. The
        output directory's lock is released at the end, however the run ends."""
        try:
            return self._train()
        finally:
            self.close()

    def close(self) -> None:
        """Give the output directory back (``train()`` does at its end): another run may write there after it."""
        self.output_lock.release()

    def _train(self) -> List[Dict[str, float]]:
        config, accelerator = self.config, self.accelerator
        is_main = accelerator.is_main_process
        if is_main:
            self.metrics_log.start()
        records = []
        # The context closes the progress bar also when a step raises, so an error starts on a line of its own.
        with tqdm(range(self.start_step, config.steps), initial=self.start_step, total=config.steps,
                  disable=not is_main, desc=f"{config.preset}", dynamic_ncols=True) as progress:
            for step in progress:
                record = self.train_step(step)
                if is_main and config.eval_every and (step % config.eval_every == 0 or step == config.steps - 1):
                    record.update(self.evaluate())
                if is_main:
                    self.metrics_log.write(record)
                    progress.set_postfix(reward=f"{record['reward']:.2f}", acc=f"{record['accuracy']:.2f}",
                                         kl=f"{record.get('perception_kl', 0.0):.3f}")
                records.append(record)
                if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
                    self.save(step + 1)
        self.save(config.steps)
        if is_main:
            tiny = {"qwen2_vl": "tiny Qwen2-VL", "qwen2_5_vl": "tiny Qwen2.5-VL"}[config.model_type or "qwen2_vl"]
            plot_metrics(read_metrics(config.output_dir), config.output_dir,
                         f"{config.preset} ({tiny if config.model is None else config.model})")
        return records
