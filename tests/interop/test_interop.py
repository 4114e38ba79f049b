"""decodelab's reference backend against the owners' packages, on the same random inputs.

Every case draws seeded random inputs with numpy, hands them to decodelab_interop (which runs
the op through the public API with backend "reference") and to mlx.core / gguf, and compares:
quantization byte for byte, the float ops by NMSE = sum((ours - theirs)^2) / sum(theirs^2).

Run: DECODELAB_INTEROP=<build>/tests/interop/decodelab_interop python -m pytest tests/interop
"""

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

try:
    import mlx.core as mx
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize
    from gguf.quants import quantize as gguf_quantize
except ImportError as error:  # CI installs both: a missing owner package fails, it never skips
    raise ImportError(f"test_interop needs mlx and gguf (pip install 'mlx[cpu]' gguf): {error}") from error

# ---------------------------------------------------------------------------------------------
# Arrays. numpy has no bfloat16, so bf16 arrays travel as their uint16 bit patterns; every array
# below is a (numpy array, dtype name) pair in the tool's dtype names.

NP_DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16,
             "u32": np.uint32, "u8": np.uint8, "i32": np.int32}
MX_DTYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16, "u32": mx.uint32, "i32": mx.int32}
FLOAT_DTYPES = ["f32", "f16", "bf16"]


def bf16_bits_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def from_f32(values, dtype):
    """float32 values in `dtype`: f16 rounds to nearest even (numpy), bf16 truncates (any bf16
    value is as good an input as another, and truncation keeps exact values such as 1.25)."""
    values = np.asarray(values, np.float32)
    if dtype == "bf16":
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(NP_DTYPES[dtype])


def to_f64(array, dtype):
    if dtype == "bf16":
        return bf16_bits_to_f32(array).astype(np.float64)
    return array.astype(np.float64)


def to_mx(array, dtype):
    if dtype == "bf16":  # bf16 values are exact in f32, so this cast is exact
        return mx.array(bf16_bits_to_f32(array)).astype(mx.bfloat16)
    return mx.array(array)


def from_mx(array):
    """An mlx array as (numpy array, dtype name), bit for bit."""
    dtype = next(name for name, t in MX_DTYPES.items() if t == array.dtype)
    if dtype == "bf16":
        return np.array(array.view(mx.uint16)), dtype
    return np.array(array), dtype


def random_floats(rng, shape, dtype, scale=1.0):
    return from_f32(rng.standard_normal(shape) * scale, dtype)


def assert_same_bits(ours, theirs, what):
    """Byte-for-byte equality of two (array, dtype) pairs; returns the element count."""
    (a, a_dtype), (b, b_dtype) = ours, theirs
    assert a_dtype == b_dtype and a.shape == b.shape, f"{what}: ours {a_dtype} {a.shape}, theirs {b_dtype} {b.shape}"
    unsigned = np.dtype(f"u{a.dtype.itemsize}")  # compare bits: -0.0 != 0.0, NaN == NaN
    diff = np.argwhere(a.view(unsigned) != b.view(unsigned))
    if len(diff):
        at = tuple(int(i) for i in diff[0])
        pytest.fail(f"{what}: {len(diff)} of {a.size} elements differ; first at {at}: "
                    f"ours {a[at].item()!r} (0x{a.view(unsigned)[at]:x}), "
                    f"theirs {b[at].item()!r} (0x{b.view(unsigned)[at]:x})")
    return a.size


def nmse(ours, theirs):
    a, b = to_f64(*ours), to_f64(*theirs)
    assert a.shape == b.shape, f"shapes differ: ours {a.shape}, theirs {b.shape}"
    return float(np.sum((a - b) ** 2) / np.sum(b ** 2))


# ---------------------------------------------------------------------------------------------
# The tool.

@pytest.fixture(scope="session")
def interop():
    """run(op, params, inputs) -> outputs: one call of decodelab_interop, arrays as pairs."""
    tool = os.environ.get("DECODELAB_INTEROP")
    if not tool:
        pytest.fail("DECODELAB_INTEROP is not set: point it at the decodelab_interop executable "
                    "(cmake target decodelab_interop, built under <build>/tests/interop/)")
    if not (os.path.isfile(tool) and os.access(tool, os.X_OK)):
        pytest.fail(f"DECODELAB_INTEROP={tool} is not an executable file")

    def run(op, params, inputs):
        with tempfile.TemporaryDirectory(prefix=f"interop-{op}-") as tmp:
            directory = Path(tmp)
            request = {"op": op, "params": params, "inputs": {}}
            for name, (array, dtype) in inputs.items():
                assert array.dtype == NP_DTYPES[dtype], f"{name}: {array.dtype} is not {dtype}"
                array.astype(array.dtype.newbyteorder("<")).tofile(directory / f"in_{name}.bin")
                request["inputs"][name] = {"file": f"in_{name}.bin", "dtype": dtype, "shape": list(array.shape)}
            (directory / "request.json").write_text(json.dumps(request))
            done = subprocess.run([tool, str(directory)], capture_output=True, text=True)
            if done.returncode != 0:
                pytest.fail(f"decodelab_interop {op} {params} failed (exit {done.returncode}): {done.stderr.strip()}")
            response = json.loads((directory / "response.json").read_text())
            return {name: (np.fromfile(directory / out["file"], np.dtype(NP_DTYPES[out["dtype"]]).newbyteorder("<"))
                           .astype(NP_DTYPES[out["dtype"]]).reshape(out["shape"]), out["dtype"])
                    for name, out in response["outputs"].items()}

    return run


# ---------------------------------------------------------------------------------------------
# MLX affine quantization: bit-exact with mx.quantize / mx.dequantize.

MLX_SEEDS = [11, 12, 13]


def mlx_weight(seed, dtype, group, rows=18, cols=256):
    """[rows, cols] in `dtype`: adversarial rows for each branch of MLX's per-group arithmetic,
    then random rows over five decades of magnitude."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-3, 2, (rows, 1))
    w[0] = 3.0                                   # all equal: range 0, scale = eps, edge exact
    w[1] = -0.7
    w[2] = rng.uniform(0.5, 2.0, cols)           # all positive: the edge is the maximum
    w[3] = rng.uniform(-2.0, -0.5, cols)         # all negative: the edge is the minimum
    w[4] = rng.uniform(-1.0, 1.0, cols)          # |min| == |max| in every group: tie -> edge = max
    for g in range(0, cols, group):
        lo, hi = rng.choice(group, 2, replace=False)
        w[4, g + lo], w[4, g + hi] = -1.25, 1.25
    w[5] = rng.standard_normal(cols) * 1e-7      # range / n_bins below the 1e-7 eps (f16: subnormals)
    w[6] = 0.0                                   # zeros, some of them negative zeros
    w[6, rng.choice(cols, cols // 4, replace=False)] = -0.0
    w[7] = rng.integers(-8, 9, cols) * 0.25      # a grid: (w - bias) / scale hits exact halves
    w[8] = rng.integers(0, 16, cols)             # exactly 4-bit codes
    w[9] = rng.standard_normal(cols) + 100.0     # a large offset: bias dominates
    w[10] = rng.standard_normal(cols) * 1e3
    w[11] = rng.standard_normal(cols)            # one outlier per group
    w[11, ::group] = 60.0
    return from_f32(w, dtype)


def mlx_cases():
    return [pytest.param(dtype, bits, group, id=f"{dtype}-b{bits}-g{group}")
            for dtype in FLOAT_DTYPES for bits in (4, 8) for group in (32, 64, 128)]


@pytest.mark.parametrize("dtype,bits,group", mlx_cases())
def test_mlx_quantize_bit_exact(interop, dtype, bits, group):
    params = {"format": "mlx", "bits": bits, "group_size": group}
    elements = 0
    for seed in MLX_SEEDS:
        w = mlx_weight(seed, dtype, group)
        ours = interop("quantize", params, {"w": (w, dtype)})
        packed, scales, biases = mx.quantize(to_mx(w, dtype), group_size=group, bits=bits)
        what = f"mlx quantize {dtype} bits {bits} group {group} seed {seed}"
        elements += assert_same_bits(ours["packed"], from_mx(packed), what + ": packed")
        assert_same_bits(ours["scales"], from_mx(scales), what + ": scales")
        assert_same_bits(ours["biases"], from_mx(biases), what + ": biases")
    print(f"mlx quantize {dtype} bits {bits} group {group}: {len(MLX_SEEDS)} cases bit-exact "
          f"({elements} packed words, scales and biases)")


@pytest.mark.parametrize("dtype,bits,group", mlx_cases())
def test_mlx_dequantize_bit_exact(interop, dtype, bits, group):
    params = {"format": "mlx", "bits": bits, "group_size": group}
    # The scales' dtype, and f32: mx.dequantize computes in the scales' dtype either way and
    # casts at the end, which is what our reference does too.
    out_dtypes = sorted({dtype, "f32"})
    elements = 0
    for seed in MLX_SEEDS:
        packed, scales, biases = mx.quantize(to_mx(mlx_weight(seed, dtype, group), dtype), group_size=group, bits=bits)
        inputs = {"packed": from_mx(packed), "scales": from_mx(scales), "biases": from_mx(biases)}
        for out_dtype in out_dtypes:
            ours = interop("dequantize", {**params, "out_dtype": out_dtype}, inputs)
            theirs = mx.dequantize(packed, scales, biases, group_size=group, bits=bits, dtype=MX_DTYPES[out_dtype])
            elements += assert_same_bits(ours["out"], from_mx(theirs),
                                         f"mlx dequantize {dtype} bits {bits} group {group} seed {seed} -> {out_dtype}")
    print(f"mlx dequantize {dtype} bits {bits} group {group}: {len(MLX_SEEDS) * len(out_dtypes)} cases "
          f"bit-exact ({elements} elements)")


# ---------------------------------------------------------------------------------------------
# GGUF Q4_0 / Q8_0: bit-exact with gguf.quants.quantize / dequantize.

GGUF_TYPES = {"q4_0": GGMLQuantizationType.Q4_0, "q8_0": GGMLQuantizationType.Q8_0}
GGUF_SEEDS = [21, 22, 23]


def gguf_weight(seed, fmt, dtype, rows=16, cols=256):
    """[rows, cols] in `dtype` (f32 or f16): random rows plus blocks of 32 whose codes land
    exactly on rounding halves, and blocks whose largest magnitude appears with both signs."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-3, 2, (rows, 1))
    blocks = w.reshape(rows, cols // 32, 32)
    # Ties: an edge that makes d = +-1 (q4_0: -8 / -8, q8_0: 127 / 127) times a power of two, so
    # x * (1/d) is exact and every other element, an odd multiple of a half, is a rounding tie
    # (q4_0: trunc(x/d + 8.5) rounds halves up, 7.5 / d hits the clamp at 15; q8_0: halves round
    # away from zero).
    edge = 8.0 if fmt == "q4_0" else 127.0
    for row in range(4):
        for block in blocks[row]:
            sign, power = rng.choice([-1.0, 1.0]), 2.0 ** rng.integers(-4, 3)
            block[:] = (rng.integers(-int(edge), int(edge), 32) + 0.5) * power
            block[rng.integers(32)] = sign * edge * power
    # Argmax ties: the largest magnitude twice with opposite signs; q4_0 takes the first one.
    for row in range(4, 7):
        for block in blocks[row]:
            i, j = rng.choice(32, 2, replace=False)
            block[:] = rng.uniform(-1.0, 1.0, 32)
            block[i], block[j] = 1.5, -1.5
    blocks[7] = 0.0  # an all-zero row: d = 0, id = 0
    return from_f32(w, dtype)


def gguf_cases():
    return [pytest.param(fmt, dtype, id=f"{fmt}-{dtype}") for fmt in GGUF_TYPES for dtype in ("f32", "f16")]


@pytest.mark.parametrize("fmt,dtype", gguf_cases())
def test_gguf_quantize_bit_exact(interop, fmt, dtype):
    elements = 0
    for seed in GGUF_SEEDS:
        w = gguf_weight(seed, fmt, dtype)
        ours = interop("quantize", {"format": fmt}, {"w": (w, dtype)})
        # gguf casts the input to f32 (exact from f16) like our tool does.
        theirs = gguf_quantize(w, GGUF_TYPES[fmt]), "u8"
        elements += assert_same_bits(ours["packed"], theirs, f"gguf quantize {fmt} {dtype} seed {seed}")
    print(f"gguf quantize {fmt} from {dtype}: {len(GGUF_SEEDS)} cases bit-exact ({elements} bytes)")


@pytest.mark.parametrize("fmt,dtype", gguf_cases())
def test_gguf_dequantize_bit_exact(interop, fmt, dtype):
    elements = 0
    for seed in GGUF_SEEDS:
        packed = gguf_quantize(gguf_weight(seed, fmt, dtype), GGUF_TYPES[fmt])
        ours = interop("dequantize", {"format": fmt, "out_dtype": "f32"}, {"packed": (packed, "u8")})
        theirs = gguf_dequantize(packed, GGUF_TYPES[fmt]), "f32"
        elements += assert_same_bits(ours["out"], theirs, f"gguf dequantize {fmt} {dtype} seed {seed}")
    print(f"gguf dequantize {fmt} (quantized from {dtype}): {len(GGUF_SEEDS)} cases bit-exact ({elements} elements)")


def test_gguf_q4_0_zero_block_led_by_negative_zero(interop):
    """A block of zeros whose first element is -0.0. gguf-py takes d = x[argmax |x|] / -8 =
    -0.0 / -8 = +0.0; ggml's quantize_row_q4_0_ref starts from max = 0.0f and gets -0.0, and so
    does our reference. quant.h promises bit-exactness with the gguf package, so this fails until
    the library picks its owner here."""
    w = np.zeros((2, 64), np.float32)
    w[0, 0] = -0.0   # row 0, block 0
    w[1, 32] = -0.0  # row 1, block 1
    ours = interop("quantize", {"format": "q4_0"}, {"w": (w, "f32")})["packed"]
    theirs = gguf_quantize(w, GGUF_TYPES["q4_0"]), "u8"
    elements = assert_same_bits(
        ours, theirs, "gguf quantize q4_0, zero block led by -0.0 (LIBRARY BUG: src/reference/quant.cpp "
        "quantize_q4_0_block starts from max = +0.0f like ggml C, so d = -0.0 (f16 0x8000); gguf-py uses "
        "d = x[argmax|x|] / -8 = +0.0 (0x0000))")
    print(f"gguf quantize q4_0 zero blocks led by -0.0: 1 case bit-exact ({elements} bytes)")


# ---------------------------------------------------------------------------------------------
# Float ops against mx.fast, by NMSE. Our reference computes in double and rounds once; MLX 0.32
# on the CPU evaluates these ops as graphs of f32 ops (f16/bf16: every op rounded to the dtype), so
# the differences are MLX's roundings. A rounding with unit roundoff u adds about u^2/3 to the NMSE
# (a relative error spread over [-u, u]): 1.2e-15 for f32 (u = 2^-24), 8e-8 for f16 (2^-11) and
# 5e-6 for bf16 (2^-8); f32 sums over thousands of terms add more. Measured: f32 <= 1.2e-13,
# f16 <= 2.5e-7, bf16 <= 1.7e-5. The thresholds keep a 40x to 1000x margin over that, and real
# errors stay well above them (bf16 attention: a wrong KV head 1.1, no causal mask 6e-2, a scale
# 10% off 1e-2).
NMSE_MAX = {"f32": 1e-10, "f16": 1e-5, "bf16": 1e-3}


def check_nmse(ours, theirs, limit, what):
    error = nmse(ours, theirs)
    assert error <= limit, f"{what}: NMSE {error:.3g} > {limit:.1g}"
    return error


RMS_CASES = {  # name: (shape of x, eps, scale of x)
    "llama": ((2, 5, 4096), 1e-5, 1.0),
    "eps-dominated": ((16, 96), 1e-6, 1e-3),  # mean(x^2) ~ 1e-6, as large as eps
}


@pytest.mark.parametrize("case", RMS_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rms_norm_vs_mlx(interop, dtype, case):
    shape, eps, scale = RMS_CASES[case]
    rng = np.random.default_rng(31)
    x = random_floats(rng, shape, dtype, scale)
    weight = from_f32(1.0 + 0.1 * rng.standard_normal(shape[-1]), dtype)
    eps = float(np.float32(eps))  # the f32 value both sides use
    ours = interop("rms_norm", {"eps": eps}, {"x": (x, dtype), "weight": (weight, dtype)})["out"]
    theirs = from_mx(mx.fast.rms_norm(to_mx(x, dtype), to_mx(weight, dtype), eps))
    error = check_nmse(ours, theirs, NMSE_MAX[dtype], f"rms_norm {dtype} {case}")
    print(f"rms_norm {dtype} {case}: {x.size} elements, NMSE {error:.2e}")


def llama3_periods(theta, rotary_dim, factor, low_freq_factor, high_freq_factor, original_max_position):
    """mx.fast.rope's `freqs` (periods, 1 / inverse frequency) for Hugging Face's llama3 rope
    scaling (_compute_llama3_parameters), evaluated in float64 so that the comparison measures
    MLX's f32 arithmetic rather than HF's f32 inv_freq."""
    inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    inv_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return 1.0 / np.where(is_medium, smoothed, inv_llama)


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position": 8192}
ROPE_CASES = {  # name: (head_dim, params); positions are drawn below max_position
    "half_split": (128, {"theta": 10000.0, "style": "half_split"}),
    "interleaved": (64, {"theta": 10000.0, "style": "interleaved"}),
    "half_split-partial": (128, {"theta": 500000.0, "style": "half_split", "rotary_dim": 64}),
    "interleaved-partial": (64, {"theta": 10000.0, "style": "interleaved", "rotary_dim": 32}),
    "llama3": (128, {"theta": 500000.0, "style": "half_split", "llama3": LLAMA3}),
}
ROPE_MAX_POSITION = 2048
# f32: MLX computes the angle pos * inv_freq in f32 and takes f32 sin/cos of it, so an element
# moves by about |angle| * 2^-24 against the exact angle; angles reach ROPE_MAX_POSITION radians
# for the fastest pair (inv_freq = 1), and averaged over the pairs of a head that is an NMSE of
# about 1e-10 below position 2048 (measured: MLX vs a float64 numpy RoPE 1.4e-10, our reference
# vs the same 6e-16). 1e-9 leaves room for that and still catches a wrong frequency, style or
# position (one position off gives an NMSE near 6e-2).
ROPE_NMSE_MAX = {**NMSE_MAX, "f32": 1e-9}


@pytest.mark.parametrize("case", ROPE_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rope_vs_mlx(interop, dtype, case):
    head_dim, params = ROPE_CASES[case]
    rotary_dim = params.get("rotary_dim", head_dim)
    tokens, heads = 24, 4
    rng = np.random.default_rng(41)
    x = random_floats(rng, (tokens, heads, head_dim), dtype)
    positions = rng.integers(0, ROPE_MAX_POSITION, tokens).astype(np.int32)
    positions[:2] = [0, ROPE_MAX_POSITION - 1]
    ours = interop("rope", params, {"x": (x, dtype), "positions": (positions, "i32")})["out"]
    # mx.fast.rope has no per-token positions: make every token a batch of one (T, H, 1, D) and
    # give each batch its position as the offset.
    rope_args = {"traditional": params["style"] == "interleaved", "scale": 1.0, "offset": mx.array(positions)}
    if "llama3" in params:
        periods = llama3_periods(params["theta"], rotary_dim, **params["llama3"])
        rope_args.update(base=None, freqs=mx.array(periods.astype(np.float32)))
    else:
        rope_args.update(base=params["theta"])
    theirs = mx.fast.rope(to_mx(x, dtype).reshape(tokens, heads, 1, head_dim), rotary_dim, **rope_args)
    theirs = from_mx(theirs.reshape(tokens, heads, head_dim))
    error = check_nmse(ours, theirs, ROPE_NMSE_MAX[dtype], f"rope {dtype} {case}")
    print(f"rope {dtype} {case}: {x.size} elements, NMSE {error:.2e}")


ATTENTION_CASES = {  # name: (B, Sq, Skv, Hq, Hkv, D, causal, scale or None for 1/sqrt(D))
    "gqa-causal-chunk": (2, 5, 37, 8, 2, 64, True, None),    # causal with Sq < Skv
    "gqa-non-causal": (1, 7, 19, 6, 3, 128, False, None),
    "mqa-decode": (3, 1, 50, 4, 1, 64, True, None),
    "mha-causal-square": (1, 16, 16, 4, 4, 32, True, 0.1),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_prefill_attention_vs_mlx(interop, dtype, case):
    batch, sq, skv, hq, hkv, d, causal, scale = ATTENTION_CASES[case]
    scale = float(np.float32(scale if scale is not None else d ** -0.5))
    rng = np.random.default_rng(51)
    q = random_floats(rng, (batch, sq, hq, d), dtype)
    k = random_floats(rng, (batch, skv, hkv, d), dtype)
    v = random_floats(rng, (batch, skv, hkv, d), dtype)
    ours = interop("prefill_attention", {"causal": causal, "scale": scale},
                   {"q": (q, dtype), "k": (k, dtype), "v": (v, dtype)})["out"]
    # MLX takes [B, H, S, D]; its causal mask is aligned to the last key like ours.
    q_mx, k_mx, v_mx = (to_mx(a, dtype).transpose(0, 2, 1, 3) for a in (q, k, v))
    theirs = mx.fast.scaled_dot_product_attention(q_mx, k_mx, v_mx, scale=scale, mask="causal" if causal else None)
    theirs = from_mx(theirs.transpose(0, 2, 1, 3))
    error = check_nmse(ours, theirs, NMSE_MAX[dtype], f"prefill_attention {dtype} {case}")
    print(f"prefill_attention {dtype} {case}: {q.size} output elements, NMSE {error:.2e}")
