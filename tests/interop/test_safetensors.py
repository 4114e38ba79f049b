"""decodelab's safetensors reader and writer against the safetensors package, both ways.

Files written by safetensors (its numpy API save_file; for bf16, which numpy lacks, the
framework-free serialize_file under it) are read by decodelab_interop's safetensors_read, and
files written by its safetensors_write are read by safetensors' deserialize (the parser under
every framework API, which hands back raw bytes for any dtype); every element must come back bit
for bit.

Run: DECODELAB_INTEROP=<build>/tests/interop/decodelab_interop python -m pytest tests/interop
"""

import json

import numpy as np
import pytest

# The tool's fixture and array helpers (a fixture imported here is a fixture of this module too).
from test_interop import NP_DTYPES, assert_same_bits, interop  # noqa: F401

try:
    import safetensors
    import safetensors.numpy
except ImportError as error:  # CI installs it: a missing package fails, it never skips
    raise ImportError(f"test_safetensors needs safetensors (pip install safetensors): {error}") from error

# Shapes a checkpoint holds: matrices, vectors, odd sizes, a scalar, an empty tensor.
SHAPES = {"model.embed_tokens.weight": (17, 8), "model.norm.weight": (8,), "odd": (3, 5, 7), "scalar": (),
          "empty": (0, 4)}
SEEDS = {"f32": 1, "f16": 2, "bf16": 3}


def random_bits(rng, shape, dtype):
    """Every bit pattern is fair, NaN payloads and subnormals included: nothing may be converted."""
    unsigned = np.dtype(f"u{np.dtype(NP_DTYPES[dtype]).itemsize}")
    bits = rng.integers(0, np.iinfo(unsigned).max, shape, dtype=unsigned, endpoint=True)
    return bits.view(NP_DTYPES[dtype]), dtype


def tensors(dtype):
    rng = np.random.default_rng(SEEDS[dtype])
    return {name: random_bits(rng, shape, dtype) for name, shape in SHAPES.items()}


SAFETENSORS_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


def save_theirs(arrays, path):
    """Writes (array, dtype) pairs with the safetensors package."""
    if all(dtype != "bf16" for _, dtype in arrays.values()):
        safetensors.numpy.save_file({name: array for name, (array, _) in arrays.items()}, str(path))
        return
    # The uint16 bit patterns declared bfloat16; `arrays` keeps the buffers alive meanwhile.
    specs = {name: safetensors.TensorSpec(dtype="bfloat16", shape=array.shape, data_ptr=array.ctypes.data,
                                          data_len=array.nbytes)
             for name, (array, _) in arrays.items()}
    safetensors.serialize_file(specs, str(path), None)


def load_theirs(path):
    """Every tensor of the file as the safetensors package reads it, as (array, dtype) pairs."""
    out = {}
    for name, tensor in safetensors.deserialize(path.read_bytes()):
        dtype = SAFETENSORS_DTYPES[tensor["dtype"]]
        out[name] = np.frombuffer(tensor["data"], NP_DTYPES[dtype]).reshape(tensor["shape"]), dtype
    return out


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_ours_reads_theirs(interop, tmp_path, dtype):
    arrays = tensors(dtype)
    path = tmp_path / "theirs.safetensors"
    save_theirs(arrays, path)
    ours = interop("safetensors_read", {"file": str(path)}, {})
    assert sorted(ours) == sorted(arrays)
    count = sum(assert_same_bits(ours[name], arrays[name], name) for name in arrays)
    print(f"{dtype}: {len(arrays)} tensors, {count} elements bit-exact")


def test_ours_reads_theirs_mixed_dtypes(interop, tmp_path):
    """The package orders the data by falling element size; lists integer tensors, which we refuse
    to view as activations."""
    rng = np.random.default_rng(4)
    f32, f16 = random_bits(rng, (5, 3), "f32"), random_bits(rng, (7,), "f16")
    path = tmp_path / "mixed.safetensors"
    safetensors.numpy.save_file({"a32": f32[0], "b16": f16[0], "ids": np.arange(6, dtype=np.int64)}, str(path))
    ours = interop("safetensors_read", {"file": str(path), "names": ["a32", "b16"]}, {})
    assert_same_bits(ours["a32"], f32, "a32")
    assert_same_bits(ours["b16"], f16, "b16")
    with pytest.raises(pytest.fail.Exception, match=r'tensor "ids": dtype: expected F32, F16 or BF16 to view it as a Tensor, got I64'):
        interop("safetensors_read", {"file": str(path), "names": ["ids"]}, {})


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_theirs_reads_ours(interop, tmp_path, dtype):
    # The tool's inputs have rank 1 to 4: no scalar this way.
    arrays = {name: pair for name, pair in tensors(dtype).items() if name != "scalar"}
    path = tmp_path / "ours.safetensors"
    interop("safetensors_write", {"file": str(path)}, arrays)
    theirs = load_theirs(path)
    assert sorted(theirs) == sorted(arrays)
    count = sum(assert_same_bits(theirs[name], arrays[name], name) for name in arrays)
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
    print(f"{dtype}: {len(arrays)} tensors, {count} elements bit-exact")


def test_theirs_reads_ours_mixed_dtypes(interop, tmp_path):
    """Our layout (falling element size, then name) keeps every tensor aligned, as theirs does."""
    rng = np.random.default_rng(5)
    arrays = {"a16": random_bits(rng, (3,), "f16"), "b32": random_bits(rng, (5,), "f32"),
              "c16": random_bits(rng, (2, 3), "bf16")}
    path = tmp_path / "ours.safetensors"
    interop("safetensors_write", {"file": str(path)}, arrays)
    theirs = load_theirs(path)
    for name, pair in arrays.items():
        assert_same_bits(theirs[name], pair, name)
    raw = path.read_bytes()
    header_bytes = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_bytes])
    assert header_bytes % 8 == 0
    assert [header[name]["data_offsets"] for name in ("b32", "a16", "c16")] == [[0, 20], [20, 26], [26, 38]]
