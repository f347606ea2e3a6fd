"""The fused Triton MMCA kernel (visualchat/kernels/attention_triton.py), forward and gradients, against a
float64 reference written from the definition.

On CPU the kernels run in triton's interpreter. ``triton.jit`` reads TRITON_INTERPRET when a kernel
is decorated (i.e. when the module is imported), and the interpreter (triton 3.5) monkeypatches
``triton.language`` for good in the process that runs it, which would break compiled kernels
launched later in the same process. So the interpreted checks run in one subprocess, with
TRITON_INTERPRET=1 set before anything imports triton; this file is also that worker:
``python -m tests.test_attention_triton --interpreted OUT_JSON CASE...``. Only the selected
cases run (``-k`` works). The CUDA test (compiled kernels, larger random layouts) runs in-process.
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import traceback
import zlib

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------- layouts, reference (no triton needed)


def make_layout(name, n, b=2, seed=0):
    """``key_is_image`` and ``key_padding_mask`` (or None) ``[b, n]`` for a named layout."""
    img = torch.zeros(b, n, dtype=torch.bool)
    pad = None
    if name == "image_only":
        img[:] = True
    elif name == "image_start":  # images of 19 and 23 tokens: not a multiple of the 16-token tile
        img[0, :19] = True
        img[1, :23] = True
    elif name == "image_middle":
        img[0, 10:31] = True
        img[1, 5:12] = True
        img[1, 30:47] = True
    elif name == "image_end":
        img[0, -18:] = True
        img[1, -21:] = True
    elif name == "padding":
        img[0, 4:20] = True
        img[1, 12:30] = True
        pad = torch.ones(b, n, dtype=torch.bool)
        pad[0, -7:] = False  # right padding
        pad[1, :9] = False  # left padding
    elif name == "random":  # any interleaving: runs of images of random lengths (1 token included)
        g = torch.Generator().manual_seed(seed)
        for bi in range(b):
            j = int(torch.randint(0, 4, (1,), generator=g))
            while j < n:
                run = int(torch.randint(1, 12, (1,), generator=g))
                img[bi, j:j + run] = True
                j += run + int(torch.randint(1, 10, (1,), generator=g))
        pad = torch.ones(b, n, dtype=torch.bool)
        pad[1, :int(torch.randint(1, 6, (1,), generator=g))] = False
    elif name != "text_only":
        raise ValueError(name)
    return img, pad


def reference(q, k, v, img, pad, scale):
    """MMCA from the definition in float64: per (batch, query) and term, the key list is built
    token by token and one softmax over it is taken for all heads at once. Padded query rows are 0."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=1)  # query head h uses kv head h // (hq // hkv)
    v = v.repeat_interleave(hq // hkv, dim=1)
    rows = []
    for bi in range(b):
        real = [pad is None or bool(pad[bi, j]) for j in range(lk)]
        is_img = [bool(x) for x in img[bi]]
        for qi in range(lq):
            i = lk - lq + qi
            if not real[i]:
                rows.append(torch.zeros(hq, d, dtype=torch.float64))
            elif is_img[i]:
                rows.append(v[bi, :, i])
            else:
                out = torch.zeros(hq, d, dtype=torch.float64)
                text = [j for j in range(i + 1) if real[j] and not is_img[j]]
                image = [j for j in range(i) if real[j] and is_img[j]]
                for keys in (text, image):
                    if keys:
                        idx = torch.tensor(keys)
                        s = torch.einsum("hd,hnd->hn", q[bi, :, qi], k[bi][:, idx]) * scale
                        out = out + torch.einsum("hn,hnd->hd", s.softmax(-1), v[bi][:, idx])
                rows.append(out)
    return torch.stack(rows).view(b, lq, hq, d).transpose(1, 2)


def test_reference_agrees_with_token_by_token_reference():
    """The reference above against tests/test_attention.py's, on real query rows."""
    from tests.test_attention import reference as token_reference

    for name in ("padding", "random"):
        img, pad = make_layout(name, 32)
        for lq in (32, 5):
            torch.manual_seed(lq)
            q, k, v = torch.randn(2, 4, lq, 8), torch.randn(2, 2, 32, 8), torch.randn(2, 2, 32, 8)
            ours = reference(q, k, v, img, pad, 0.3)
            theirs = token_reference(q, k, v, img, pad, 0.3, "mmca")
            real = pad[:, -lq:] if pad is not None else torch.ones(2, lq, dtype=torch.bool)
            torch.testing.assert_close(ours.transpose(1, 2)[real], theirs.transpose(1, 2)[real], atol=1e-12, rtol=1e-12)


def test_dense_reference_agrees_with_reference():
    """The dense float64 reference that the CUDA test uses at large N, checked here at small N,
    gradients included (padded query rows get no upstream gradient)."""
    for name in ("padding", "random", "image_only", "text_only"):
        img, pad = make_layout(name, 40)
        pad = torch.ones_like(img) if pad is None else pad
        for lq in (40, 1, 5):
            torch.manual_seed(lq)
            x = [torch.randn(2, h, n, 8, dtype=torch.float64) for h, n in ((4, lq), (2, 40), (2, 40))]
            g = torch.randn(2, 4, lq, 8, dtype=torch.float64) * pad[:, None, -lq:, None]
            grads = []
            for fn in (reference, dense_reference):
                xs = [t.clone().requires_grad_() for t in x]
                out = fn(*xs, img, pad, 0.3)
                out.backward(g)
                grads.append([out.detach()] + [t.grad if t.grad is not None else torch.zeros_like(t) for t in xs])
            for a, b in zip(*grads):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def _random_case(seed, b, hq, hkv, lq, lk, d, dtype, device, img, pad):
    """Inputs, the kernel's output and gradients, and the float64 reference's (on CPU)."""
    torch.manual_seed(seed)
    q = torch.randn(b, hq, lq, d, device=device).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, lk, d, device=device).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, lk, d, device=device).to(dtype).requires_grad_()
    real = (pad[:, -lq:] if pad is not None else torch.ones(b, lq, dtype=torch.bool)).to(device)
    g = torch.randn(b, hq, lq, d, device=device) * real[:, None, :, None]  # padded rows: no upstream grad
    return q, k, v, g, real


def _assert_close(name, got, ref, dtype):
    """fp32: tight absolute/relative tolerance. 16-bit: max error relative to the largest reference
    value (inputs are rounded to 16 bits on both sides; the kernel rounds P and dS to 16 bits for
    its tensor-core dots, as FlashAttention does)."""
    got, ref = got.double().cpu(), ref.double().cpu()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    else:
        tol = {torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]  # observed: <= 1.2e-2, <= 6e-4
        err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()
        assert err <= tol, f"{name}: max error {err:.3g} x max|ref| > {tol}"


def check_against_reference(mod, img, pad, hq, hkv, lq, d, dtype, seed, device="cpu", **blocks):
    b, lk = img.shape
    q, k, v, g, real = _random_case(seed, b, hq, hkv, lq, lk, d, dtype, device, img, pad)
    out = mod.mmca_attention_triton(q, k, v, img.to(device), None if pad is None else pad.to(device), **blocks)
    out.backward(g.to(dtype))
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, img, pad, 1 / math.sqrt(d))
    ref.backward(g.cpu().double())
    assert out.shape == (b, hq, lq, d) and out.dtype == dtype
    assert (out.transpose(1, 2)[~real] == 0).all(), "padded query rows must be 0"
    _assert_close("out", out.transpose(1, 2)[real], ref.transpose(1, 2)[real.cpu()], dtype)
    for name, a, r in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert a.grad.dtype == dtype
        _assert_close(name, a.grad, torch.zeros_like(r) if r.grad is None else r.grad, dtype)  # None: q unused


# ---------------------------------------------------------------- interpreted cases (run by the worker)

LQ = {"prefill": None, "decode": 1, "chunk": 5}
HEADS = {"mha": (4, 4), "gqa": (4, 2)}
SIZES = {"text_only": 37, "image_only": 33, "image_start": 50, "image_middle": 64, "image_end": 45,
         "padding": 48, "random": 80}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# every layout x heads x query length in fp32 (d=16 for MHA, 32 for GQA), then a few 16-bit and odd-D cases
CASES = [f"{lay}-{h}-{lq}-fp32-d{16 if h == 'mha' else 32}" for lay in SIZES for h in HEADS for lq in LQ]
CASES += ["image_middle-gqa-prefill-bf16-d32", "random-mha-chunk-bf16-d16", "padding-gqa-decode-bf16-d32",
          "padding-mha-prefill-fp16-d16", "random-gqa-prefill-fp16-d32", "image_middle-mha-chunk-fp16-d16",
          "random-gqa-prefill-fp32-d24", "image_start-mha-chunk-fp32-d8"]
# extra behaviours, each a function below
CHECKS = ["exact_copy_and_zero_image_term", "padded_keys_get_no_weight", "strided_inputs_and_no_grad",
          "default_tiles"]


def run_case(mod, case):
    lay, heads, lq, dt, d = case.split("-")
    hq, hkv = HEADS[heads]
    n = SIZES[lay]
    img, pad = make_layout(lay, n, seed=zlib.crc32(case.encode()))
    tile = 16 if heads == "mha" else 32  # both: many tiles with ragged tails either way (L <= 80)
    check_against_reference(mod, img, pad, hq, hkv, LQ[lq] or n, int(d[1:]), DTYPES[dt],
                            seed=zlib.crc32(case.encode()), block_m=tile, block_n=tile)


def exact_copy_and_zero_image_term(mod):
    """Image queries copy their value row bit for bit; text before the first image ignores image values."""
    img, _ = make_layout("image_end", 45)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 45, 16), torch.randn(2, 2, 45, 16), torch.randn(2, 2, 45, 16)
    out = mod.mmca_attention_triton(q, k, v, img, block_m=32, block_n=32)
    for bi in range(2):
        for i in img[bi].nonzero().flatten().tolist():
            assert torch.equal(out[bi, :, i], v[bi, :, i].repeat_interleave(2, 0))
    v_big = v.clone()
    v_big[img[:, None, :, None].expand_as(v)] = 1e6
    out_big = mod.mmca_attention_triton(q, k, v_big, img, block_m=32, block_n=32)
    assert torch.equal(out_big[:, :, :24], out[:, :, :24])  # first image starts at 24 (batch 1)


def padded_keys_get_no_weight(mod):
    img, pad = make_layout("padding", 48)
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 48, 16), torch.randn(2, 2, 48, 16), torch.randn(2, 2, 48, 16)
    out = mod.mmca_attention_triton(q, k, v, img, pad, block_m=32, block_n=32)
    hole = ~pad[:, None, :, None].expand_as(v)
    k2, v2 = k.clone(), v.clone()
    k2[hole], v2[hole] = 50.0, 1e6
    out2 = mod.mmca_attention_triton(q, k2, v2, img, pad, block_m=32, block_n=32)
    assert torch.equal(out, out2)


def strided_inputs_and_no_grad(mod):
    """HF's layout (``[B, L, H, D]`` transposed views, a transposed upstream grad) gives the same
    results as contiguous inputs; the no-grad forward (nothing saved) gives the same output."""
    img, pad = make_layout("random", 40)
    torch.manual_seed(2)
    qs, ks, vs = torch.randn(2, 40, 4, 16), torch.randn(2, 40, 2, 16), torch.randn(2, 40, 2, 16)
    g = torch.randn(2, 40, 4, 16)
    results = []
    for contiguous in (True, False):
        q, k, v = (x.transpose(1, 2) for x in (qs, ks, vs))
        if contiguous:
            q, k, v = (x.contiguous() for x in (q, k, v))
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        out = mod.mmca_attention_triton(q, k, v, img, pad, block_m=32, block_n=32)
        out.backward(g.transpose(1, 2) if not contiguous else g.transpose(1, 2).contiguous())
        results.append([out.detach(), q.grad, k.grad, v.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        out = mod.mmca_attention_triton(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), img, pad,
                                        block_m=32, block_n=32)
    assert torch.equal(out, results[1][0])


def default_tiles(mod):
    """The default tile sizes (64 x 64, D padded to 32) on a ragged 80-token sequence."""
    img, pad = make_layout("random", 80, seed=5)
    check_against_reference(mod, img, pad, 4, 2, 80, 20, torch.float32, seed=5)


def worker(out_json, names):
    """Runs in a fresh process with TRITON_INTERPRET=1 (set by the parent before python starts)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _interpreter_compat()
    from visualchat.kernels import attention_triton as mod

    assert mod.INTERPRETED
    results = {}
    for name in names:
        try:
            globals()[name](mod) if name in CHECKS else run_case(mod, name)
            results[name] = "ok"
        except Exception:  # reported per case by the parent test
            results[name] = traceback.format_exc(limit=-3)
    with open(out_json, "w") as f:
        json.dump(results, f)


def _interpreter_compat():
    """Two gaps of triton 3.5's CPU interpreter, patched in the worker process only:

    - it turns scalars (1-element arrays) into Python ints with int(), which NumPy >= 2.4 refuses
      ("only 0-dimensional arrays can be converted to Python scalars"; triton-lang/triton#9171,
      fixed upstream by #9172): use .item();
    - it stores bfloat16 as raw uint16 bits and its tl.dot multiplies those bits (triton-lang/triton
      #11584; the interpreter does not support bf16 arithmetic): widen bf16 dot operands to float32
      first, which is exact, as the tensor cores do before accumulating in fp32.
    """
    import inspect

    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    original_patch = interp._patch_lang_tensor
    if "int(self.handle.data)" in inspect.getsource(original_patch):
        def patch_lang_tensor(tensor, *args, **kwargs):
            original_patch(tensor, *args, **kwargs)
            tensor.__index__ = lambda self: int(self.handle.data.item())

        interp._patch_lang_tensor = patch_lang_tensor

    original_dot = interp.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype == tl.bfloat16 and x.data.dtype == np.uint16:
            return interp.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    def create_dot(self, a, b, *args, **kwargs):
        return original_dot(self, widen(a), widen(b), *args, **kwargs)

    interp.InterpreterBuilder.create_dot = create_dot


# ---------------------------------------------------------------- tests (parent process)

triton = pytest.importorskip("triton", reason="triton is not installed; the fused MMCA kernel is optional "
                                              "(pip install -r tests/requirements.txt)")


@pytest.fixture(scope="module")
def interpreted(request):
    """Runs the selected interpreted cases in one subprocess; maps case -> "ok" or a traceback."""
    names = [item.callspec.params["case"] for item in request.session.items
             if getattr(item, "originalname", None) == "test_interpreted" and hasattr(item, "callspec")]
    with tempfile.TemporaryDirectory() as tmp:
        out_json = os.path.join(tmp, "results.json")
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run([sys.executable, "-m", "tests.test_attention_triton", "--interpreted", out_json, *names],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode or not os.path.exists(out_json):
            pytest.fail(f"interpreter worker failed (rc {proc.returncode}):\n"
                        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(out_json) as f:
            return json.load(f)


@pytest.mark.parametrize("case", CASES + CHECKS)
def test_interpreted(case, interpreted):
    """Forward and dq/dk/dv against the float64 reference (layout-heads-query_length-dtype-head_dim;
    16 x 16 tiles for MHA, 32 x 32 for GQA), or one of the CHECKS, in triton's CPU interpreter."""
    result = interpreted[case]
    assert result == "ok", result


def _compiled_module():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set for this process: no compiled kernels here")
    from visualchat.kernels import attention_triton

    return attention_triton


def test_available_and_cpu_dispatch(monkeypatch):
    """CPU tensors keep the vectorised torch path; available() follows the device / TRITON_INTERPRET."""
    from visualchat import attention as attn

    at = _compiled_module()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not at.available("cpu") and not at.available(torch.device("cpu"))
    assert at.available("cuda") == torch.cuda.is_available()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert at.available("cpu")

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path must not run for CPU tensors")

    monkeypatch.setattr(at, "mmca_attention_triton", boom)
    img, pad = make_layout("padding", 48)
    q, k = torch.randn(2, 4, 48, 8), torch.randn(2, 2, 48, 8)
    attn.mmca_attention(q, k, k, img, pad)


def test_bad_inputs_are_explained():
    at = _compiled_module()
    img = torch.zeros(1, 8, dtype=torch.bool)
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="multiple"):
        at.mmca_attention_triton(q[:, :3], k, k, img)
    with pytest.raises(ValueError, match="key_is_image"):
        at.mmca_attention_triton(q, k, k, img[:, :5])
    with pytest.raises(ValueError, match="more queries"):
        at.mmca_attention_triton(torch.randn(1, 4, 9, 16), k, k, img)
    with pytest.raises(ValueError, match="dtypes"):
        at.mmca_attention_triton(q.double(), k.double(), k.double(), img)
    with pytest.raises(ValueError, match="head dim"):
        at.mmca_attention_triton(torch.randn(1, 2, 8, 320), torch.randn(1, 2, 8, 320), torch.randn(1, 2, 8, 320), img)
    with pytest.raises(ValueError, match="power of two"):
        at.mmca_attention_triton(q, k, k, img, block_m=24)
    with pytest.raises(ValueError, match="CUDA"):
        at.mmca_attention_triton(q, k, k, img)


@pytest.mark.parametrize("dtype,d", [("bf16", 64), ("fp16", 128)])
def test_kernels_compile_for_sm90(dtype, d):
    """The three kernels go through triton's full compiler (TTIR -> PTX -> cubin via the bundled
    ptxas) for an H100 with the tile sizes the wrapper picks: catches compiled-mode-only errors
    without a GPU."""
    at = _compiled_module()
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton build bundles no ptxas")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bd, cfg = at._configs(d, None, None)
    ptr = {"Q": dtype, "K": dtype, "V": dtype, "O": dtype, "OI": dtype, "DO": dtype, "DQ": dtype, "DK": dtype,
           "DV": dtype, "LSE_T": "fp32", "LSE_I": "fp32", "DT": "fp32", "DI": "fp32", "KIND": "i8"}
    for kernel, key, extra in ((at._mmca_fwd, "fwd", {"STORE_OI": True}), (at._mmca_bwd_dkdv, "dkdv", {}),
                               (at._mmca_bwd_dq, "dq", {})):
        bm, bn, warps, stages = cfg[key]
        consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "PREC": "tf32", **extra}
        sig = {a: "constexpr" if a in consts else "*" + ptr[a] if a in ptr else
               "fp32" if a in ("qk_scale", "sm_scale") else "i32" for a in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": warps, "num_stages": stages})
        assert compiled.asm["cubin"]


# ---------------------------------------------------------------- CUDA (compiled kernels, fresh random inputs)

def random_layout(n, b, gen):
    """Random interleaving of text and image runs (images of 1..n/8 tokens), random left/right padding."""
    img = torch.zeros(b, n, dtype=torch.bool)
    pad = torch.ones(b, n, dtype=torch.bool)
    for bi in range(b):
        j = int(torch.randint(0, max(2, n // 10), (1,), generator=gen))
        while j < n:
            run = int(torch.randint(1, max(2, n // 8), (1,), generator=gen))
            img[bi, j:j + run] = True
            j += run + int(torch.randint(1, max(2, n // 6), (1,), generator=gen))
        cut = int(torch.randint(0, max(1, n // 10), (1,), generator=gen))
        if bi % 2:
            pad[bi, :cut] = False
        elif cut:
            pad[bi, -cut:] = False
    return img, pad


def dense_reference(q, k, v, img, pad, scale):
    """The definition as dense float64 masks ``[B, 1, Lq, Lk]``, for large N on the GPU."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hkv, 1)
    v = v.repeat_interleave(hq // hkv, 1)
    kpos = torch.arange(lk, device=q.device)
    qpos = kpos[lk - lq:]
    real_k = pad[:, None, None, :]
    k_img = img[:, None, None, :]
    q_img = img[:, None, lk - lq:, None]
    text = ~q_img & ~k_img & real_k & (kpos[None, :] <= qpos[:, None])
    image = ~q_img & k_img & real_k & (kpos[None, :] < qpos[:, None])
    s = q @ k.transpose(-1, -2) * scale
    out = 0
    for m in (text, image):
        has = m.any(-1, keepdim=True)  # rows without a key: softmax over all, times 0 (no NaN, no NaN grads)
        out = out + (torch.softmax(s.masked_fill(~(m | ~has), float("-inf")), -1) * has) @ v
    own = v[:, :, lk - lq:]
    out = torch.where(q_img, own, out)
    return out * pad[:, None, lk - lq:, None]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels); "
                    "the interpreted tests above check the same kernels on CPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_cuda_matches_float64_reference(dtype, monkeypatch):
    """Random layouts and sizes; the kernel's error must be no worse than about twice the error of
    the torch path (SDPA) in the same dtype, plus a small floor. Also checks the dispatch from
    ``mmca_attention`` and the VISUALCHAT_MMCA_KERNEL=torch opt-out."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    at = _compiled_module()
    from visualchat import attention as attn

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    shapes = [  # (n, lq, b, hq, hkv, d)
        (256, 256, 2, 8, 2, 64), (1000, 1000, 2, 4, 4, 128), (1000, 1, 2, 8, 2, 64), (1000, 37, 2, 8, 2, 128),
        (4096, 4096, 1, 8, 2, 128), (4096, 4096, 1, 4, 4, 64), (777, 300, 3, 6, 3, 96),
    ]
    floor = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for n, lq, b, hq, hkv, d in shapes:
        torch.manual_seed(seed + n + lq)
        img, pad = random_layout(n, b, gen)
        img, pad = img.to(dev), pad.to(dev)
        q = torch.randn(b, hq, lq, d, device=dev).to(dtype)
        k = torch.randn(b, hkv, n, d, device=dev).to(dtype)
        v = torch.randn(b, hkv, n, d, device=dev).to(dtype)
        real = pad[:, None, n - lq:, None]
        g = torch.randn(b, hq, lq, d, device=dev) * real
        scale = 1 / math.sqrt(d)
        results = {}
        for path in ("triton", "torch"):
            monkeypatch.setenv("VISUALCHAT_MMCA_KERNEL", path)
            x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            calls = []
            real_fn = at.mmca_attention_triton
            monkeypatch.setattr(at, "mmca_attention_triton", lambda *a, **kw: calls.append(1) or real_fn(*a, **kw))
            out = attn.mmca_attention(*x, img, pad)
            monkeypatch.setattr(at, "mmca_attention_triton", real_fn)
            assert bool(calls) == (path == "triton"), f"dispatch to the kernel: {bool(calls)} for {path}"
            out.backward(g.to(dtype))
            results[path] = [out * real] + [t.grad for t in x]
        x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = dense_reference(*x64, img, pad, scale)
        ref.backward(g.double())
        ref_all = [ref] + [t.grad for t in x64]
        for name, tri, tor, r in zip(("out", "dq", "dk", "dv"), results["triton"], results["torch"], ref_all):
            scale_r = r.abs().max().clamp_min(1.0)
            e_tri = ((tri.double() - r).abs().max() / scale_r).item()
            e_tor = ((tor.double() - r).abs().max() / scale_r).item()
            assert math.isfinite(e_tri) and e_tri <= 2 * e_tor + floor, (
                f"N={n} Lq={lq} B={b} Hq={hq} Hkv={hkv} D={d} {dtype} seed={seed}: {name} error {e_tri:.3g} "
                f"(torch path {e_tor:.3g})")
        del results, ref, ref_all, x64
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--interpreted":
        worker(sys.argv[2], sys.argv[3:] or CASES + CHECKS)
    else:
        sys.exit("usage: TRITON_INTERPRET=1 python -m tests.test_attention_triton --interpreted OUT_JSON [CASE...]")
