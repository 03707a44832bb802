"""The default `lomo-kernels train` fine-tune, run by the Hugging Face Trainer through `LomoTrainer`.

    python python/train_hf_trainer.py --steps 400 --output runs/hf-trainer

Same model (the built-in "small" LLaMA-style model, random init, byte-level tokenizer), data (the
Python standard library's source files) and settings as the CLI's default run. The only changes
from a stock Trainer script are the `LomoTrainer` class and its `optimizer_name`/`optimizer_kwargs`;
the Trainer's `max_grad_norm` turns on LOMO's exact two-pass norm clipping (0 here, as in the CLI,
which clips gradient values instead: free inside the fused update).
"""
import argparse

import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from lomo_kernels.integrations.transformers import LomoTrainer
from lomo_kernels.training.data import PackedData, TokenizerAdapter, pack, read_documents, split_eval
from lomo_kernels.training.presets import preset_config
from lomo_kernels.training.tokenizer import ByteTokenizer, save_byte_tokenizer


class Sequences(torch.utils.data.Dataset):
    """Packed sequences as the dicts of tensors the Trainer's default collator stacks."""

    def __init__(self, data: PackedData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.data.tokens[i], "labels": self.data.labels[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=0.5, help="peak learning rate (cosine schedule, 10 warmup steps)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--max-data-tokens", type=int, help="read at most this many tokens (default: all)")
    parser.add_argument("--output", default="runs/hf-trainer", help="Trainer output directory; the final model goes here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("small"))
    data = pack(read_documents(None), TokenizerAdapter(ByteTokenizer()), args.seq_len, max_tokens=args.max_data_tokens,
                source="the standard library")
    train, held_out = split_eval(data, fraction=0.05, max_eval=64, seed=0)

    training_args = TrainingArguments(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=10, max_grad_norm=0.0, logging_steps=20, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), seed=0)
    trainer = LomoTrainer(model=model, args=training_args, train_dataset=Sequences(train),
                          eval_dataset=Sequences(held_out), optimizer_name="lomo",
                          optimizer_kwargs={"clip_grad_value": 0.05})
    trainer.train()
    print(f"held-out loss {trainer.evaluate()['eval_loss']:.4f}")
    trainer.save_model(args.output)
    save_byte_tokenizer(args.output)
    print(f"model saved in {args.output} (loads with transformers.AutoModelForCausalLM.from_pretrained)")


if __name__ == "__main__":
    main()
