"""decodelab's Llama decode stack against mlx-lm's Llama and Qwen2 models, on the same checkpoint.

The test writes a tiny random checkpoint (config.json and model.safetensors, with numpy and the
safetensors package: not with decodelab's writer), runs mlx_lm.models.llama (or .qwen2) over the
token ids (one causal forward pass), and asks decodelab_interop's llama_logits for the logits of
the same ids (one decode step per token over the paged cache, backend "reference"). The logits of
every position must agree: NMSE <= 1e-8 with f32 weights (the issue's bound), and the same for
weights quantized to MLX affine on both sides (decodelab quantizes on load bit-exactly as
mx.quantize does, and both sides then run the same quantized weights).

Qwen2 adds biases to the q/k/v projections (mlx-lm's qwen2 Attention builds them with bias=True);
they are drawn large enough that a stack leaving them out fails the bound by orders of magnitude,
which the test checks too.

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
    from mlx_lm.models import llama, qwen2
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
# Qwen2-shaped: mlx-lm's qwen2 takes head_dim = hidden_size / num_attention_heads (it ignores a
# head_dim key), so the sizes keep that; no Llama 3 scaling; the sliding window off, as Qwen2's
# configs have it; attention_bias left out (implied for qwen2).
QWEN2_CONFIG = {
    "model_type": "qwen2", "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 2, "vocab_size": 512,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "sliding_window": 4096, "use_sliding_window": False, "tie_word_embeddings": False,
}
TOKENS = [1, 17, 300, 42, 7, 511, 0, 256]
BIAS_SCALE = 0.5  # q/k/v biases: about as large as the projections they are added to


def nmse(ours, theirs):
    ours, theirs = ours.astype(np.float64), theirs.astype(np.float64)
    return float(np.sum((ours - theirs) ** 2) / np.sum(theirs ** 2))


def write_checkpoint(directory, seed, config=CONFIG):
    rng = np.random.default_rng(seed)
    c = config
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]), "model.norm.weight": (c["hidden_size"],)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], c["hidden_size"])
    biases = {}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (c["hidden_size"],),
                       p + "post_attention_layernorm.weight": (c["hidden_size"],),
                       p + "self_attn.q_proj.weight": (q, c["hidden_size"]), p + "self_attn.k_proj.weight": (kv, c["hidden_size"]),
                       p + "self_attn.v_proj.weight": (kv, c["hidden_size"]), p + "self_attn.o_proj.weight": (c["hidden_size"], q),
                       p + "mlp.gate_proj.weight": (c["intermediate_size"], c["hidden_size"]),
                       p + "mlp.up_proj.weight": (c["intermediate_size"], c["hidden_size"]),
                       p + "mlp.down_proj.weight": (c["hidden_size"], c["intermediate_size"])})
        if c["model_type"] == "qwen2":
            biases.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    weights = {name: ((1.0 if len(shape) == 1 else 0.0) + 0.05 * rng.standard_normal(shape)).astype(np.float32)
               for name, shape in shapes.items()}
    weights.update({name: (BIAS_SCALE * rng.standard_normal(shape)).astype(np.float32) for name, shape in biases.items()})
    safetensors.numpy.save_file(weights, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return weights


def mlx_lm_logits(weights, quantize, config=CONFIG):
    module = {"llama": llama, "qwen2": qwen2}[config["model_type"]]
    model = module.Model(module.ModelArgs.from_dict(config))
    # strict: every weight of the checkpoint is one of the model's parameters and every parameter
    # is given (for qwen2, the q/k/v biases among them).
    model.load_weights([(name, mx.array(w)) for name, w in weights.items()], strict=True)
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


@pytest.mark.parametrize("quantize, tied", [(None, False), (None, True), ((4, 64), False)],
                         ids=["f32", "f32.tied", "mlx.q4.g64"])
def test_qwen2_logits_vs_mlx_lm(interop, tmp_path, quantize, tied):
    config = dict(QWEN2_CONFIG, tie_word_embeddings=tied)
    weights = write_checkpoint(tmp_path, seed=5, config=config)
    theirs = mlx_lm_logits(weights, quantize, config)
    params = {"checkpoint": str(tmp_path), "tokens": TOKENS,
              "quantize": "" if quantize is None else f"mlx.q{quantize[0]}.g{quantize[1]}"}
    ours = interop("llama_logits", params, {})["logits"][0]
    assert ours.shape == theirs.shape == (len(TOKENS), config["vocab_size"])
    error = nmse(ours, theirs)
    # The same model without its biases: what a stack that dropped them would match.
    unbiased = {name: (np.zeros_like(w) if name.endswith(".bias") else w) for name, w in weights.items()}
    without_biases = nmse(ours, mlx_lm_logits(unbiased, quantize, config))
    print(f"qwen2 logits vs mlx-lm, {params['quantize'] or 'f32'}{', tied' if tied else ''}: NMSE {error:.2e} "
          f"over {ours.size} values (vs the model without its q/k/v biases: {without_biases:.2e})")
    assert error <= 1e-8
    assert without_biases > 1e-3
    assert (ours.argmax(axis=1) == theirs.argmax(axis=1)).all()
