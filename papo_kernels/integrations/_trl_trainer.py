"""``PAPOTrainer``: TRL's ``GRPOTrainer`` with ``papo_loss`` on the final hidden states of a clean and a masked pass.

What changes against GRPOTrainer, and why:

- rollouts (``_generate_and_score_completions``): after TRL's generation and scoring, each
  prompt's image is masked once, with a mask drawn from ``(seed, step, rollout, group)``, so
  the G responses of a prompt share it on whichever process they land, and every rollout
  masks the clean image afresh (masks never compound). The masked ``pixel_values`` travel
  as one tensor per sample, so TRL's shuffling and splitting keep them aligned.
- log-probs (``_get_per_token_logps_and_entropies``, used by TRL for the old and reference
  policies): final hidden states through the model's forward, then
  ``papo_kernels.linear_logprobs``, so they are the float32 numbers the loss computes.
- the LM head (``_head``): read after the model's forward with ``hidden_states.gathered_head``,
  which under DeepSpeed ZeRO-3 gathers the partitioned head; for the loss the gather is held
  until ``training_step``'s backward (and DeepSpeed's step inside it) has run, for the
  gradient-free log-probs it ends with them. TRL's generation gathers every parameter and
  releases them before any of these passes, so the gathers never overlap.
- loss (``_compute_loss``): one forward of the wrapped model over the clean and the masked
  sequences (DDP and FSDP see it), or with ``masked_forward="sequential"`` one pass after
  the other, each with its own backward (``_sequential_loss``); then ``papo_loss`` on the
  hidden states and the head's weight, with TRL's normalisation over processes, gradient
  accumulation and generation steps. TRL's per-token weights (vLLM importance sampling,
  top-entropy and off-policy masks) multiply the policy-gradient term, as in TRL.
- metrics: TRL's names (``kl``, ``entropy``, ``clip_ratio/*_mean``) plus ``papo/*``, token
  means over all processes.
- checkpoints: TRL's, plus the mask counter (``papo_state.json``), so a resumed run draws the
  uninterrupted run's masks; weights saved under legacy names load on resume.
"""

import json
import warnings
from contextlib import ExitStack, contextmanager
from itertools import accumulate
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from PIL import Image
from safetensors import safe_open
from torch import Tensor
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, _is_peft_model
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from trl import GRPOTrainer, prepare_multimodal_messages

from .. import linear_logprobs, papo_loss
from ..hidden_states import completion_hidden_states, gathered_head, output_head
from ..masking import group_generator, mask_images_by_group, mask_pixel_values_by_group
from ._trl_config import PAPOConfig

UNSUPPORTED_TRAINER_ARGUMENTS = ("tools", "rollout_func", "environment_factory")
# Text-config fields that make TRL scale or cap the logits; papo_loss computes plain (W h + b) / temperature.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")
QWEN_VL_IMAGE_PROCESSOR = ("merge_size", "patch_size", "image_mean", "image_std")
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
TRAIN, EVAL = 0, 1  # mask-seed keys of the two modes
MASK_STATE_FILE = "papo_state.json"  # in each checkpoint, next to TRL's own trainer_state.json


class PAPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with the PAPO objective (arXiv 2507.06448) computed by ``papo_kernels.papo_loss``.

    Takes the arguments of ``GRPOTrainer`` with a ``PAPOConfig`` as ``args``. Supports Qwen-VL-family
    models (``pixel_values`` with ``image_grid_thw``: Qwen2-VL, Qwen2.5-VL) with at least one image per
    prompt, and the loss types ``grpo``, ``bnpo``, ``dapo``, ``dr_grpo``. Options it cannot honour
    (tools, environments, custom rollouts, other loss types, TRL's entropy bonus, MoE auxiliary loss,
    scaled or capped logits) raise a ``ValueError`` naming them.
    """

    _tag_names = ["trl", "papo"]
    _name = "PAPO"
    _paper = {
        "title": "Perception-Aware Policy Optimization for Multimodal Reasoning",
        "id": "2507.06448",
        "citation": "@article{wang2025perception,\n"
                    "    title   = {{Perception-Aware Policy Optimization for Multimodal Reasoning}},\n"
                    "    author  = {Zhenhailong Wang and Xuehang Guo and Sofia Stoica and Haiyang Xu and Hongru Wang "
                    "and Hyeonjeong Ha and Xiusi Chen and Yangyi Chen and Ming Yan and Fei Huang and Heng Ji},\n"
                    "    year    = 2025,\n"
                    "    eprint  = {arXiv:2507.06448},\n"
                    "}",
    }

    def __init__(self, model, reward_funcs=None, args: Optional[PAPOConfig] = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or type(model).__name__
            args = PAPOConfig(f"{name.split('/')[-1]}-PAPO")
        if not isinstance(args, PAPOConfig):
            raise TypeError(f"args must be a PAPOConfig (GRPOConfig with the PAPO fields), got {type(args).__name__}")
        for name in UNSUPPORTED_TRAINER_ARGUMENTS:
            if kwargs.get(name):
                raise ValueError(f"PAPOTrainer does not support {name}= (multi-turn or custom rollouts have no masked "
                                 "image); remove it")
        super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, processing_class, **kwargs)
        self._check_model_and_processor()
        if self.args.masked_forward == "sequential" and self.is_deepspeed_enabled:
            raise ValueError("PAPOConfig.masked_forward='sequential' runs two backwards per micro-batch, which "
                             "DeepSpeed's engine counts as two steps; use masked_forward='joint' with DeepSpeed")
        self._mask_rounds = 0
        self._heads_until_backward = ExitStack()  # ZeRO-3 gathers of the head that the loss's backward needs

    def _check_model_and_processor(self) -> None:
        image_processor = getattr(self.processing_class, "image_processor", None)
        missing = [name for name in QWEN_VL_IMAGE_PROCESSOR if not hasattr(image_processor, name)]
        if image_processor is None or missing:
            raise ValueError(f"processing_class: PAPOTrainer needs a Qwen-VL processor (an image_processor with "
                             f"{list(QWEN_VL_IMAGE_PROCESSOR)}), got {type(self.processing_class).__name__}"
                             + (f" whose image processor lacks {missing}" if image_processor is not None else ""))
        if self.args.mask_target == "pixel_values" and self.args.mask_cell != image_processor.patch_size:
            raise ValueError(f"PAPOConfig.mask_cell: with mask_target='pixel_values' a cell is one vision patch, "
                             f"so mask_cell must be {image_processor.patch_size}, got {self.args.mask_cell}")
        text_config = self.model.config.get_text_config()
        for name in LOGIT_TRANSFORMS:
            if getattr(text_config, name, None) not in (None, 1, 1.0):
                raise ValueError(f"model: its config sets {name}={getattr(text_config, name)}, which papo_loss does "
                                 "not apply to the logits")
        if self.aux_loss_enabled:
            raise ValueError("model: the MoE load-balancing loss (router_aux_loss_coef) is not supported by "
                             "PAPOTrainer; set router_aux_loss_coef=0")

    # Checkpoints: the mask counter, and the weights of models whose saved names differ from their own.

    def _save_checkpoint(self, model, trial) -> None:
        """TRL's checkpoint, plus the mask counter (as TRL keeps its entropy controller's state)."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            (folder / MASK_STATE_FILE).write_text(json.dumps({"mask_rounds": self._mask_rounds}))

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        """On resume, TRL's state and the mask counter, so the resumed run draws the uninterrupted run's masks."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = Path(checkpoint) / MASK_STATE_FILE
        if path.is_file():
            self._mask_rounds = json.loads(path.read_text())["mask_rounds"]
        else:
            warnings.warn(f"{checkpoint} has no {MASK_STATE_FILE} (it was not written by PAPOTrainer): the masks "
                          "restart from the counter 0 and do not replay the interrupted run's", stacklevel=2)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The checkpoint's weights, also where ``save_pretrained`` wrote them under the model's legacy names.

        transformers 5.25 saves Qwen2-VL's weights under their original names (``visual.*``,
        ``model.embed_tokens``; ``save_original_format=True``), while ``Trainer`` resumes with a plain
        ``load_state_dict`` that matches only ``lm_head`` and leaves every other tensor at its initial
        value (huggingface/transformers#43701). Where the saved names are not the model's, the weights
        load through the model's own ``from_pretrained``, which renames them, then every tensor is copied
        (strictly: a missing one is an error).
        """
        target = self.accelerator.unwrap_model(self.model if model is None else model)
        saved_names = _saved_weight_names(Path(resume_from_checkpoint))
        if saved_names is None or self.is_fsdp_enabled or _is_peft_model(target) \
                or saved_names <= set(target.state_dict()):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        saved = type(target).from_pretrained(resume_from_checkpoint, local_files_only=True)
        target.load_state_dict(saved.state_dict())

    # Rollouts: TRL's, plus the masked image of each prompt.

    def _generate_and_score_completions(self, inputs: List[dict]) -> dict:
        output = super()._generate_and_score_completions(inputs)
        if not self.args.uses_masked_image:
            return output
        if "image_grid_thw" not in output or "num_images" not in output:
            raise ValueError("PAPOTrainer needs image prompts of a Qwen-VL model (pixel_values with image_grid_thw); "
                             f"the batch holds {sorted(output)}")
        without_image = [index for index, count in enumerate(output["num_images"]) if count == 0]
        if without_image:
            raise ValueError(f"PAPOTrainer needs at least one image per prompt; prompts {without_image} of the batch "
                             "have none (in an 'image' or 'images' column or in the prompt's messages)")
        masked = self._masked_pixel_values(inputs, output)
        if self.args.masked_gradient:
            rows = output["image_grid_thw"].prod(-1).tolist()
            rows_per_sample = [sum(rows[start:end]) for start, end in _spans(output["num_images"])]
            output["masked_pixel_values"] = list(torch.split(masked, rows_per_sample))
        else:
            output["masked_per_token_logps"] = self._masked_logprobs(output, masked)
        return output

    def _masked_pixel_values(self, inputs: List[dict], output: dict) -> Tensor:
        """``pixel_values`` of the batch's masked images: one mask per prompt group, the same in every process."""
        training = self.model.training
        num_generations = self.num_generations if training else self.num_generations_eval
        first = self.accelerator.process_index * len(inputs)
        group_ids = [(first + index) // num_generations for index in range(len(inputs))]
        seed = group_generator(self.args.seed, TRAIN if training else EVAL, self.state.global_step,
                               self._mask_rounds).initial_seed()
        self._mask_rounds += 1
        image_processor = self.processing_class.image_processor
        clean = output["pixel_values"]
        if self.args.mask_target == "pixel_values":
            return mask_pixel_values_by_group(clean, output["image_grid_thw"], group_ids, seed, image_processor,
                                              images_per_sample=output["num_images"],
                                              probability=self.args.mask_probability)
        masked_images = mask_images_by_group(_prompt_images(inputs), group_ids, seed,
                                             probability=self.args.mask_probability, cell=self.args.mask_cell)
        flat = [image for sample in masked_images for image in sample]
        masked = image_processor(images=flat, return_tensors="pt")["pixel_values"].to(clean.device, clean.dtype)
        if masked.shape != clean.shape:
            raise RuntimeError(f"the masked images gave pixel_values of shape {tuple(masked.shape)}, the clean ones "
                               f"{tuple(clean.shape)}; masking must keep every image's size")
        return masked

    @torch.no_grad()
    def _masked_logprobs(self, output: dict, masked: Tensor) -> Tensor:
        """The rollout policy's log-probs on the masked images, without gradient (``masked_gradient=False``)."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        batch_size = self.args.per_device_train_batch_size if self.model.training \
            else self.args.per_device_eval_batch_size
        logps, _, _ = self._get_per_token_logps_and_entropies(
            self.model, input_ids, attention_mask, output["completion_ids"].size(1), batch_size=batch_size,
            pixel_values=masked, image_grid_thw=output["image_grid_thw"], num_images=output["num_images"],
            mm_token_type_ids=output.get("mm_token_type_ids"))
        return logps

    # Log-probs of the old and reference policies: the package's fused forward.

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, pixel_values=None,
                                           image_grid_thw=None, num_images=None, mm_token_type_ids=None,
                                           **other_inputs) -> Tuple[Tensor, Optional[Tensor], None]:
        if compute_aux_loss:
            raise ValueError("PAPOTrainer does not compute the MoE auxiliary loss")
        unsupported = sorted(name for name, value in other_inputs.items() if value is not None)
        if unsupported:
            raise ValueError(f"PAPOTrainer supports Qwen-VL inputs ({list(MULTIMODAL_KEYS)}), got {unsupported}")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                  "image_grid_thw": image_grid_thw, "mm_token_type_ids": mm_token_type_ids}
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            chunk = _take_samples(inputs, num_images, start, min(start + batch_size, input_ids.size(0)))
            hidden = self._hidden_states(model, chunk, logits_to_keep)
            mask = chunk["attention_mask"][:, -logits_to_keep:] != 0
            tokens = chunk["input_ids"][:, -logits_to_keep:].where(mask, 0)
            with self._head(model) as (weight, bias):
                chunk_logps, chunk_entropy = linear_logprobs(hidden.to(weight.dtype), weight, tokens, bias=bias,
                                                             temperature=self.temperature, backend=self.args.backend)
            logps.append(chunk_logps.where(mask, 0.0))
            entropies.append(chunk_entropy.where(mask, 0.0))
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _hidden_states(self, model, inputs: Dict[str, Tensor], completion_length: int) -> Tensor:
        """Final hidden states at the completion positions, under the trainer's autocast."""
        with self.accelerator.autocast():
            return completion_hidden_states(model, inputs, completion_length)

    @contextmanager
    def _head(self, model):
        """``(weight, bias)`` of the model's LM head, opened after the forwards whose hidden states it meets.

        Under DeepSpeed ZeRO-3 the head is gathered (``hidden_states.gathered_head``): where gradient is
        recorded, until ``training_step``'s backward has run (the gradient accumulates into the full weight);
        without gradient, until the block ends.
        """
        if torch.is_grad_enabled():
            yield self._heads_until_backward.enter_context(gathered_head(model))
        else:
            with gathered_head(model) as head:
                yield head

    def training_step(self, model, inputs, num_items_in_batch):
        """TRL's step (generation when due, the loss, ``accelerator.backward``, under DeepSpeed its step), then the
        head's ZeRO-3 gathers of the loss released."""
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._heads_until_backward.close()

    # The loss.

    def _compute_loss(self, model, inputs: dict) -> Tensor:
        if "tool_mask" in inputs:
            raise ValueError("PAPOTrainer does not support tool masks (multi-turn rollouts)")
        completion_length = inputs["completion_ids"].size(1)
        clean = {
            "input_ids": torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            **{key: inputs[key] for key in MULTIMODAL_KEYS if inputs.get(key) is not None},
        }
        hidden_masked = None
        if inputs.get("masked_pixel_values") is None:
            hidden = self._hidden_states(model, clean, completion_length)
        else:
            masked = {**clean, "pixel_values": torch.cat(inputs["masked_pixel_values"])}
            if self.args.masked_forward == "sequential" and torch.is_grad_enabled():
                return self._sequential_loss(model, inputs, clean, masked)
            if self.args.masked_forward == "sequential":  # no backward follows: two forwards, one batch each
                hidden = self._hidden_states(model, clean, completion_length)
                hidden_masked = self._hidden_states(model, masked, completion_length)
            else:
                hidden, hidden_masked = self._hidden_states(model, _clean_then_masked(clean, masked),
                                                            completion_length).chunk(2)
        with self._head(model) as (weight, bias):
            return self._loss_from_hidden_states(inputs, hidden.to(weight.dtype),
                                                 None if hidden_masked is None else hidden_masked.to(weight.dtype),
                                                 weight, bias)

    def _sequential_loss(self, model, inputs: dict, clean: Dict[str, Tensor], masked: Dict[str, Tensor]) -> Tensor:
        """The joint loss and gradients, holding one pass's activations at a time (``masked_forward="sequential"``).

        1. The masked pass without gradient: its hidden states H~.
        2. The clean pass, the loss of (its hidden states, H~ and the head as leaves), and its backward, under
           ``no_sync``: the clean pass's gradients accumulate locally, and the loss's gradients G~ on H~ and G_W
           on the head are kept.
        3. The masked pass again (with the random draws of step 1, so dropout masks match), and the surrogate
           ``loss + <H~, G~> + <W, G_W> - (their value)`` returned: its value is the loss, and the trainer's
           own backward of it adds the masked pass's and the head's gradients, where DDP all-reduces everything
           accumulated, once.
        """
        completion_length = inputs["completion_ids"].size(1)
        device = inputs["completion_ids"].device
        masked_draws = _rng_states(device)
        with torch.no_grad():
            hidden_masked = self._hidden_states(model, masked, completion_length)
        with self.accelerator.no_sync(model):
            hidden = self._hidden_states(model, clean, completion_length)
            weight, bias = output_head(model)  # never a ZeRO-3 head: __init__ refuses sequential under DeepSpeed
            hidden, hidden_masked = hidden.to(weight.dtype), hidden_masked.to(weight.dtype)
            leaves = {"hidden_masked": hidden_masked.detach().requires_grad_(),
                      "weight": weight.detach().requires_grad_(),
                      "bias": None if bias is None else bias.detach().requires_grad_()}
            loss = self._loss_from_hidden_states(inputs, hidden, leaves["hidden_masked"], leaves["weight"],
                                                 leaves["bias"])
            loss.backward()
        clean_draws = _rng_states(device)
        _set_rng_states(device, masked_draws)
        hidden_masked_again = self._hidden_states(model, masked, completion_length).to(weight.dtype)
        _set_rng_states(device, clean_draws)
        handed_on = sum((value * _grad_or_zeros(leaves[name])).sum()
                        for name, value in (("hidden_masked", hidden_masked_again), ("weight", weight), ("bias", bias))
                        if value is not None)
        return loss.detach() + (handed_on - handed_on.detach())

    def _loss_from_hidden_states(self, inputs: dict, hidden: Tensor, hidden_masked: Optional[Tensor], weight: Tensor,
                                 bias: Optional[Tensor]) -> Tensor:
        """``papo_loss`` with TRL's normalisation, and its metrics logged."""
        training = self.model.training
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        scale = self.args.coefficient_scale(self.state.global_step, self.state.max_steps)
        coefficients = {name: getattr(self.args, name) * scale for name in ("gamma", "eta_clean", "eta_masked")}
        num_items_in_batch = None
        if self.loss_type == "dapo":
            # TRL's normaliser: the generation batch's tokens, per process and per accumulation window.
            num_items_in_batch = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if training:
                num_items_in_batch = (num_items_in_batch * self.current_gradient_accumulation_steps
                                      / self.args.steps_per_generation)
        advantages = inputs["advantages"]
        policy_weights = self._policy_weights(inputs, hidden, weight, bias)
        with self.accelerator.autocast():
            loss, metrics = papo_loss(
                hidden, weight, completion_ids, completion_mask, advantages, hidden_masked=hidden_masked,
                masked_logprobs=inputs.get("masked_per_token_logps"), old_logprobs=inputs.get("old_per_token_logps"),
                ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0 else None, bias=bias,
                temperature=self.temperature, num_items_in_batch=num_items_in_batch,
                policy_weights=policy_weights, **coefficients,
                **self.args.papo_loss_options())
        if training and self.loss_type != "dapo":
            loss = loss / self.current_gradient_accumulation_steps
        self._log_loss_metrics(metrics, coefficients)
        return loss

    def _policy_weights(self, inputs: dict, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        """TRL's gradient-free per-token weights of the policy-gradient term, (B, T), or None without any."""
        completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"]
        weights = []
        if self.top_entropy_quantile < 1.0 or self.off_policy_mask_threshold is not None:
            with torch.no_grad():
                logps, entropies = linear_logprobs(hidden.detach(), weight.detach(), completion_ids.where(mask != 0, 0),
                                                   bias=None if bias is None else bias.detach(),
                                                   temperature=self.temperature, backend=self.args.backend)
            if self.off_policy_mask_threshold is not None:
                old_logps = inputs.get("old_per_token_logps", logps)
                weights.append(self.get_off_policy_mask(
                    advantages=inputs["advantages"].reshape(mask.shape[0], -1), per_token_logps=logps,
                    sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_logps), mask=mask,
                    off_policy_threshold=self.off_policy_mask_threshold))
            if self.top_entropy_quantile < 1.0:
                weights.append(self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile))
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights.append(inputs["importance_sampling_ratio"])
        if not weights:
            return None
        product = torch.ones(mask.shape, dtype=torch.float32, device=mask.device)
        for factor in weights:
            product = product * factor.to(torch.float32)
        return product

    def _log_loss_metrics(self, metrics: Dict[str, Tensor], coefficients: Dict[str, float]) -> None:
        """Token means over every process (sums and token counts reduced together), under TRL's names and papo/*."""
        mode = "train" if self.model.training else "eval"
        names = [name for name in metrics if name != "tokens"]
        tokens = metrics["tokens"].to(torch.float32)
        local = torch.stack([metrics[name].to(torch.float32) * tokens for name in names] + [tokens])
        totals = self.accelerator.reduce(local, reduction="sum")
        means = dict(zip(names, (totals[:-1] / totals[-1].clamp(min=1.0)).tolist()))
        logged = self._metrics[mode]
        if self.beta != 0.0:
            logged["kl"].append(means["ref_kl"])
        logged["entropy"].append(means["entropy"])
        logged["clip_ratio/low_mean"].append(means["clip_fraction_low"])
        logged["clip_ratio/high_mean"].append(means["clip_fraction_high"])
        logged["clip_ratio/region_mean"].append(means["clip_fraction_low"] + means["clip_fraction_high"])
        for name, value in means.items():
            logged[f"papo/{name}"].append(value)
        for name, value in coefficients.items():
            logged[f"papo/{name}"].append(value)


def _saved_weight_names(folder: Path) -> Optional[set]:
    """The tensor names of a checkpoint's safetensors weights (one file or an index of shards), or None without."""
    if (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
        return set(json.loads((folder / SAFE_WEIGHTS_INDEX_NAME).read_text())["weight_map"])
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        with safe_open(folder / SAFE_WEIGHTS_NAME, "pt") as weights:
            return set(weights.keys())
    return None


def _spans(counts: List[int]) -> List[Tuple[int, int]]:
    """``[(start, end)]`` of consecutive blocks of ``counts`` items."""
    ends = list(accumulate(counts))
    return list(zip([0] + ends[:-1], ends))


def _prompt_images(inputs: List[dict]) -> List[list]:
    """The images of each prompt of TRL's batch, in the order GRPOTrainer gives them to the processor.

    As GRPOTrainer does: the ``images`` or ``image`` column fills the prompt's image placeholders
    (``prepare_multimodal_messages``), then the prompt's images are the image parts of its messages
    in order, so images in a column, inside the messages, or both are read alike.
    """
    column = next((name for name in ("images", "image") if name in inputs[0]), None)
    images = []
    for index, example in enumerate(inputs):
        given = example.get(column) if column else None
        if column == "image" and given is not None:
            given = [given]
        messages = prepare_multimodal_messages(example["prompt"], images=given)
        prompt_images = [part.get("image") for message in messages if isinstance(message.get("content"), list)
                         for part in message["content"] if part["type"] == "image"]
        not_pil = [type(image).__name__ for image in prompt_images if not isinstance(image, Image.Image)]
        if not_pil:
            raise ValueError("PAPOTrainer with mask_target='image' masks PIL images, given in an 'image' or 'images' "
                             "column or as {'type': 'image', 'image': <PIL image>} parts of the prompt's messages; "
                             f"prompt {index} has {not_pil} (give PIL images, or set mask_target='pixel_values')")
        images.append(prompt_images)
    return images


def _take_samples(inputs: Dict[str, Optional[Tensor]], num_images: Optional[List[int]], start: int,
                  end: int) -> Dict[str, Tensor]:
    """Samples ``start:end`` of Qwen-VL model inputs, with their images' ``pixel_values`` rows."""
    taken = {key: inputs[key][start:end] for key in ("input_ids", "attention_mask", "mm_token_type_ids")
             if inputs.get(key) is not None}
    if inputs.get("pixel_values") is not None:
        images = _spans(num_images)
        first, last = images[start][0], images[end - 1][1]
        rows = [0] + list(accumulate(inputs["image_grid_thw"].prod(-1).tolist()))
        taken["pixel_values"] = inputs["pixel_values"][rows[first]:rows[last]]
        taken["image_grid_thw"] = inputs["image_grid_thw"][first:last]
    return taken


def _clean_then_masked(clean: Dict[str, Tensor], masked: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """One batch of 2B sequences: the B clean ones, then the same B on their masked images."""
    return {key: torch.cat([clean[key], masked[key]]) for key in clean}


def _rng_states(device: torch.device) -> Tuple[Tensor, Optional[Tensor]]:
    """The random states a forward on ``device`` draws from (the CPU's, and the CUDA device's)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_states(device: torch.device, states: Tuple[Tensor, Optional[Tensor]]) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


def _grad_or_zeros(leaf: Tensor) -> Tensor:
    """A leaf's gradient; zeros where the loss did not use it (the backward must still reach every parameter)."""
    return torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
