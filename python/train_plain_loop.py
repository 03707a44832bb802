"""The default `lomo-kernels train` fine-tune, written as a plain PyTorch loop around `lomo_kernels.Lomo`.

    python python/train_plain_loop.py --steps 400 --output runs/plain-loop

It trains the built-in "small" LLaMA-style model (random init, byte-level tokenizer) on the Python
standard library's source files. What the CLI adds on top (checkpoints, resume, metrics, bad-input
checks) is left out so the optimizer's use stands out: build the model, construct `Lomo` on it
(it patches the model, so no gradient tensor of a weight is ever kept), then per step compute the
loss and call `fused_backward(loss, lr)`; there is no `optimizer.step()` or `zero_grad()`.
"""
import argparse
import math

import torch
from transformers import AutoModelForCausalLM

import lomo_kernels
from lomo_kernels.training.data import TokenizerAdapter, pack, read_documents, split_eval
from lomo_kernels.training.presets import preset_config
from lomo_kernels.training.tokenizer import ByteTokenizer, save_byte_tokenizer


def cosine_with_warmup(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=0.5, help="peak learning rate (cosine schedule, 10 warmup steps)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--max-data-tokens", type=int, help="read at most this many tokens (default: all)")
    parser.add_argument("--output", default="runs/plain-loop", help="where the trained model is saved")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("small"))
    data = pack(read_documents(None), TokenizerAdapter(ByteTokenizer()), args.seq_len, max_tokens=args.max_data_tokens,
                source="the standard library")
    train, held_out = split_eval(data, fraction=0.05, max_eval=64, seed=0)

    optimizer = lomo_kernels.Lomo(model, lr=args.lr, clip_grad_value=0.05)  # as the CLI default
    generator = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        lr = cosine_with_warmup(step, args.steps, args.lr, warmup=10)
        batch = torch.randint(len(train), (args.batch_size,), generator=generator)
        loss = model(input_ids=train.tokens[batch], labels=train.labels[batch]).loss
        optimizer.fused_backward(loss, lr)  # backward pass that updates every weight as its gradient appears
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step + 1}: loss {loss.item():.4f}, lr {lr:.3f}")

    model.eval()
    with torch.no_grad():
        held_out_loss = model(input_ids=held_out.tokens, labels=held_out.labels).loss.item()
    print(f"held-out loss {held_out_loss:.4f} (perplexity {math.exp(held_out_loss):.2f})")
    optimizer.close()  # end the hold: the plain model again (saving works while held too)
    model.save_pretrained(args.output)
    save_byte_tokenizer(args.output)
    print(f"model saved in {args.output} (loads with transformers.AutoModelForCausalLM.from_pretrained)")


if __name__ == "__main__":
    main()
