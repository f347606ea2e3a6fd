"""The throwaway prototype behind bench/RESULTS.md's whole-step torch.compile figures (issue 18), kept as the
evidence, not as part of the project: the lean decode step written as one function over static buffers
(full-capacity masked attention, the KV appends as index_copy_ on graph inputs), fbgemm's fp16 product
wrapped as a custom op (dynamo cannot take its packed weight), compiled with inductor (fullgraph, static
shapes; CPPW=1 for the C++ wrapper) and timed against the eager lean step on the same state.

    python bench/results/lowp/compiled_step_prototype.py          # Python wrapper
    CPPW=1 python bench/results/lowp/compiled_step_prototype.py   # C++ wrapper
"""
import os, sys, time, statistics
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import torch
import torch.nn.functional as F
from PIL import Image
from visualchat.model import VisualChat
from visualchat.assets import ASSETS_DIR
from visualchat.kernels import lean_decoder

PACKED, OUT = [], []
op = torch.ops.quantized.linear_dynamic_fp16.default

@torch.library.custom_op("vcx::fp16_mm", mutates_args=())
def fp16_mm(x: torch.Tensor, idx: int) -> torch.Tensor:
    return op(x, PACKED[idx])

@fp16_mm.register_fake
def _(x, idx):
    return x.new_empty(x.shape[0], OUT[idx])

torch.set_grad_enabled(False)
vc = VisualChat.from_pretrained(None, device="cpu", lm_weights="auto")
ims = [Image.open(os.path.join(ASSETS_DIR, "examples", f"shapes_{i}.png")) for i in (1, 2, 3)]
s = vc.new_session()
s.ask("Describe Image 1, Image 2 and Image 3.", images=ims, max_new_tokens=32)
lean = lean_decoder(vc)
s._step(100)
st = s._cache._vc_lean
from visualchat.kernels.lowp import Fused
def reg(fn_owner):
    pass
# collect packed weights in step order
import visualchat.kernels.lowp as lowp
lm = vc.model.lm
dec = lm.get_decoder()
layers = []
for layer in dec.layers:
    at, mlp = layer.self_attn, layer.mlp
    ids = []
    for mods in (lowp.fused_group(at.q_proj, at.k_proj, at.v_proj), at.o_proj, lowp.fused_group(mlp.gate_proj, mlp.up_proj), mlp.down_proj):
        lin = mods.linear if isinstance(mods, Fused) else mods
        PACKED.append(lin.packed); OUT.append(lin.out_features); ids.append(len(PACKED) - 1)
    layers.append((layer.input_layernorm.weight, layer.post_attention_layernorm.weight, ids))
head = lm.get_output_embeddings()
PACKED.append(head.packed); OUT.append(head.out_features); head_id = len(PACKED) - 1
nh, nkv, d = lean.n_heads, lean.n_kv, lean.head_dim
g, rows, half, H = nh // nkv, nh + 2 * nkv, d // 2, lean.hidden
eps = lean.eps
normw = dec.norm.weight

def rms(x, w):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w

def step(x, c, s_, mask, at, kts, vs):
    for i, (w1, w2, (iq, io, igu, idn)) in enumerate(layers):
        h = rms(x, w1)
        r = fp16_mm(h, iq).view(rows, 2, half)
        r = r * c + r.flip(1) * s_
        q = r[:nh].view(nkv, g, d)
        k = r[nh:nh + nkv].view(nkv, d, 1)
        v = r[nh + nkv:].view(nkv, 1, d)
        kts[i].index_copy_(2, at, k)
        vs[i].index_copy_(1, at, v)
        sc = torch.bmm(q, kts[i])
        p = torch.softmax(sc + mask, -1).sum(0)
        a = torch.bmm(p, vs[i]).view(1, nh * d)
        x = x + fp16_mm(a, io)
        gu = fp16_mm(rms(x, w2), igu)
        n = gu.shape[-1] // 2
        x = x + fp16_mm(F.silu(gu[:, :n]) * gu[:, n:], idn)
    return fp16_mm(rms(x, normw), head_id).view(-1)

# static inputs from the state (full cap: mask covers unused positions)
n = st.n
mask = st.mask.clone()
c, s_ = [t[n] for t in next(iter(st.tables.values()))]
at = torch.tensor([n])
x = vc.model.embed_tokens.weight[101].clone().view(1, -1)
kts = [t.clone() for t in st.kt]; vs = [t.clone() for t in st.v]
mask.view(-1, mask.shape[-1])[0, n] = 0
eager_logits = step(x, c, s_, mask, at, [t.clone() for t in kts], [t.clone() for t in vs])
ref = lean.step(101, s._cache, s._cache_is_image + [False])
print("eager proto vs lean max diff", (eager_logits - ref).abs().max().item())
import torch._inductor.config as ic
ic.cpp_wrapper = os.environ.get("CPPW", "0") == "1"
cstep = torch.compile(step, fullgraph=True, dynamic=False)
t = time.perf_counter()
out = cstep(x, c, s_, mask, at, kts, vs)
print("compile s", time.perf_counter() - t, "diff", (out - ref).abs().max().item())
def med(f, n=30):
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3
kk = [t.clone() for t in kts]; vv = [t.clone() for t in vs]
for r in range(2):
    print("compiled step ms", med(lambda: cstep(x, c, s_, mask, at, kts, vs)))
    print("eager proto ms", med(lambda: step(x, c, s_, mask, at, kk, vv)))
    print("lean v3 step ms", med(lambda: lean.step(101, s._cache, None)))
