"""Generated Llama-shaped Hugging Face checkpoints: a base and fine-tuned variants on disk.

For tests and benchmarks of the file merges (:mod:`jmerge.io.streaming`, ``jmerge merge``):
the tensor names, shapes and ``config.json`` of a Llama model (``LlamaForCausalLM``), random
values, a base model and "fine-tuned" models = base + a small random task vector, written as
sharded safetensors with an index exactly as transformers writes them.

    python -m jmerge.examples.checkpoints /tmp/ckpts --hidden 2048 --layers 16 --models 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from jmerge.io.safetensors import ShardedWriter

__all__ = ["LlamaShape", "llama_tensors", "write_llama", "write_family"]


class LlamaShape(NamedTuple):
    hidden: int = 64
    intermediate: int = 176
    layers: int = 2
    vocab: int = 128
    heads: int = 4
    kv_heads: int = 2
    tie_word_embeddings: bool = False

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": dtype,
        }


SMALL = LlamaShape()
"""A tiny Llama (64 hidden, 2 layers, 128 tokens) for tests."""


def llama_tensors(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama model, in transformers' order."""
    h, i, v = shape.hidden, shape.intermediate, shape.vocab
    kv = h // shape.heads * shape.kv_heads
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not shape.tie_word_embeddings:
        out.append(("lm_head.weight", (v, h)))
    return out


def _values(name: str, s: tuple[int, ...], seed: int, scale: float) -> np.ndarray:
    rng = np.random.default_rng([seed, *name.encode()])
    if len(s) == 1:  # norm weights around 1
        return np.float32(1.0) + np.float32(scale) * rng.standard_normal(s, np.float32)
    return np.float32(scale) * rng.standard_normal(s, np.float32)


def write_llama(
    out: str | Path,
    shape: LlamaShape = SMALL,
    *,
    seed: int = 0,
    base: str | Path | None = None,
    delta: float = 0.01,
    dtype: str = "bfloat16",
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write one checkpoint: random (``base=None``, entries N(0, 0.02²), norms 1 + N(0, 0.02²))
    or ``base`` + a task vector N(0, (delta·0.02)²) per entry. Returns ``out``."""
    out = Path(out)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    tensors = llama_tensors(shape)
    base_ckpt = None
    if base is not None:
        from jmerge.io.safetensors import SafetensorsCheckpoint

        base_ckpt = SafetensorsCheckpoint(base)
    with ShardedWriter(out, plan=[(n, s, np_dtype) for n, s in tensors],
                       max_shard_size=max_shard_size, overwrite=True) as w:
        for name, s in tensors:
            if base_ckpt is None:
                x = _values(name, s, seed, 0.02)
            else:
                tv = np.float32(0.02 * delta) * np.random.default_rng(
                    [seed, *name.encode()]).standard_normal(s, np.float32)
                x = base_ckpt.get(name).astype(np.float32) + tv
            w.add(name, x.astype(np_dtype))
            del x
        (w.stage_dir / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
        # Tokenizer files for the copy step (placeholders: no tokenizer is built from them).
        (w.stage_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
        (w.stage_dir / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {}}))
    return out


def write_family(
    root: str | Path,
    shape: LlamaShape = SMALL,
    *,
    num_models: int = 3,
    dtype: str = "bfloat16",
    delta: float = 0.01,
    max_shard_size: int | str = "5GB",
) -> tuple[Path, list[Path]]:
    """A base model ``root/base`` and ``num_models`` fine-tuned ones ``root/ft{i}``."""
    root = Path(root)
    base = write_llama(root / "base", shape, seed=0, dtype=dtype, max_shard_size=max_shard_size)
    fts = [
        write_llama(root / f"ft{i}", shape, seed=i + 1, base=base, delta=delta, dtype=dtype,
                    max_shard_size=max_shard_size)
        for i in range(num_models)
    ]
    return base, fts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-shard-size", default="2GB")
    a = ap.parse_args(argv)
    shape = LlamaShape(a.hidden, a.intermediate, a.layers, a.vocab, heads=16, kv_heads=4)
    base, fts = write_family(a.root, shape, num_models=a.models, dtype=a.dtype,
                             max_shard_size=a.max_shard_size)
    print(base, *fts)


if __name__ == "__main__":
    main()
