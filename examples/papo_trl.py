"""PAPO in TRL: a GRPOTrainer script switched to PAPO, on the offline tiny Qwen2-VL (CPU, no download).

The switch is two imports and a config:

    from trl import GRPOConfig, GRPOTrainer                              # before
    from papo_kernels.integrations.trl import PAPOConfig, PAPOTrainer    # after

and ``GRPOConfig(...)`` becomes ``PAPOConfig.from_preset("papo_d", ...)``, which sets the paper's PAPO-D
settings in full (clip range, dual clip, beta, loss type, gamma and both entropy coefficients).

Run: ``python examples/papo_trl.py [--steps 200]`` (needs the trl and train extras): 16 prompts x 8 responses
per step; the mean reward rises from about 0.1 and the perception KL grows as the policy starts to look.
"""

import argparse
import random
import tempfile

import torch
from datasets import Dataset

from papo_kernels.integrations.trl import PAPOConfig, PAPOTrainer
from papo_kernels.trainer.data import synthetic_example, synthetic_words
from papo_kernels.trainer.tiny_model import END_OF_TURN, build_model, build_processor


def colour_prompts(count: int, seed: int) -> Dataset:
    """Synthetic "what color is the square ?" prompts in TRL's conversational format, with their images."""
    rng = random.Random(seed)
    examples = [synthetic_example("color", rng, 56) for _ in range(count)]
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example.question}]}]
                   for example in examples],
        "image": [example.image for example in examples],
        "answer": [example.answer for example in examples],
    })


def accuracy(completions, answer, **kwargs):
    """1 when the response's first word is the colour."""
    return [float(completion[0]["content"].split()[:1] == [expected])
            for completion, expected in zip(completions, answer)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    options = parser.parse_args()
    torch.set_num_threads(1)

    processor = build_processor(synthetic_words(["color"]), image_size=56)
    model = build_model(processor.tokenizer, seed=0)
    tokenizer = processor.tokenizer
    # Never sample the special tokens but the end of turn (a sampled image token would break the next forward).
    suppressed = sorted(set(tokenizer.all_special_ids) - {tokenizer.convert_tokens_to_ids(END_OF_TURN)})

    with tempfile.TemporaryDirectory() as output_dir:
        args = PAPOConfig.from_preset(
            "papo_d", output_dir=output_dir, max_steps=options.steps, learning_rate=3e-4,
            per_device_train_batch_size=128, num_generations=8, max_completion_length=4,
            generation_kwargs={"suppress_tokens": suppressed}, use_cpu=True, gradient_checkpointing=False,
            logging_steps=min(10, options.steps), report_to=[], save_strategy="no",
        )
        trainer = PAPOTrainer(model=model, reward_funcs=accuracy, args=args, train_dataset=colour_prompts(256, 0),
                              processing_class=processor)
        trainer.train()

    for entry in trainer.state.log_history:
        if "papo/perception_kl" in entry:
            print(f"step {entry['step']:3d}  reward {entry['reward']:.3f}  loss {entry['loss']:+.4f}  "
                  f"perception_kl {entry['papo/perception_kl']:.2e}  entropy {entry['entropy']:.3f}  "
                  f"entropy_masked {entry['papo/entropy_masked']:.3f}")


if __name__ == "__main__":
    main()
