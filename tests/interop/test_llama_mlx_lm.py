"""decodelab's Llama decode stack against mlx-lm's Llama model, on the same checkpoint.

The test writes a tiny random Llama checkpoint (config.json and model.safetensors, with numpy and
the safetensors package: not with decodelab's writer), runs mlx_lm.models.llama over the token ids
(one causal forward pass), and asks decodelab_interop's llama_logits for the logits of the same
ids (one decode step per token over the paged cache, backend "reference"). The logits of every
position must agree: NMSE <= 1e-8 with f32 weights (the issue's bound), and the same for weights
quantized to MLX affine on both sides (decodelab quantizes on load bit-exactly as mx.quantize does,
and both sides then run the same quantized weights).

Run: DECODELAB_INTEROP=<build>/tests/interop/decodelab_interop python -m pytest tests/interop
"""

import json

import numpy as np
import pytest

from test_interop import interop  # noqa: F401  (the tool's fixture)

try:
    import mlx.core as mx
    import mlx.nn as nn
    import safetensors.numpy
    from mlx_lm.models import llama
except ImportError as error:  # CI installs it: a missing package fails, it never skips
    raise ImportError(f"test_llama_mlx_lm needs mlx-lm and safetensors (pip install mlx-lm safetensors): {error}") from error

CONFIG = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 2, "vocab_size": 512,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False,
}
TOKENS = [1, 17, 300, 42, 7, 511, 0, 256]


def nmse(ours, theirs):
    ours, theirs = ours.astype(np.float64), theirs.astype(np.float64)
    return float(np.sum((ours - theirs) ** 2) / np.sum(theirs ** 2))


def write_checkpoint(directory, seed):
    rng = np.random.default_rng(seed)
    c = CONFIG
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]), "model.norm.weight": (c["hidden_size"],),
              "lm_head.weight": (c["vocab_size"], c["hidden_size"])}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (c["hidden_size"],),
                       p + "post_attention_layernorm.weight": (c["hidden_size"],),
                       p + "self_attn.q_proj.weight": (q, c["hidden_size"]), p + "self_attn.k_proj.weight": (kv, c["hidden_size"]),
                       p + "self_attn.v_proj.weight": (kv, c["hidden_size"]), p + "self_attn.o_proj.weight": (c["hidden_size"], q),
                       p + "mlp.gate_proj.weight": (c["intermediate_size"], c["hidden_size"]),
                       p + "mlp.up_proj.weight": (c["intermediate_size"], c["hidden_size"]),
                       p + "mlp.down_proj.weight": (c["hidden_size"], c["intermediate_size"])})
    weights = {name: ((1.0 if len(shape) == 1 else 0.0) + 0.05 * rng.standard_normal(shape)).astype(np.float32)
               for name, shape in shapes.items()}
    safetensors.numpy.save_file(weights, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(CONFIG))
    return weights


def mlx_lm_logits(weights, quantize):
    model = llama.Model(llama.ModelArgs.from_dict(CONFIG))
    model.load_weights([(name, mx.array(w)) for name, w in weights.items()])
    if quantize is not None:
        bits, group = quantize
        # Every Linear (the projections and the LM head), as decodelab quantizes them on load.
        nn.quantize(model, group_size=group, bits=bits, class_predicate=lambda _, m: isinstance(m, nn.Linear))
    logits = model(mx.array([TOKENS]))
    return np.array(logits.astype(mx.float32))[0]


@pytest.mark.parametrize("quantize", [None, (4, 64), (8, 64)], ids=["f32", "mlx.q4.g64", "mlx.q8.g64"])
def test_llama_logits_vs_mlx_lm(interop, tmp_path, quantize):
    weights = write_checkpoint(tmp_path, seed=3)
    theirs = mlx_lm_logits(weights, quantize)
    params = {"checkpoint": str(tmp_path), "tokens": TOKENS,
              "quantize": "" if quantize is None else f"mlx.q{quantize[0]}.g{quantize[1]}"}
    ours = interop("llama_logits", params, {})["logits"][0]
    assert ours.shape == theirs.shape == (len(TOKENS), CONFIG["vocab_size"])
    error = nmse(ours, theirs)
    print(f"llama logits vs mlx-lm, {params['quantize'] or 'f32'}: NMSE {error:.2e} over {ours.size} values")
    assert error <= 1e-8
    # The same greedy next token at every position.
    assert (ours.argmax(axis=1) == theirs.argmax(axis=1)).all()
