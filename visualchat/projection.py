"""The trainable map from vision-encoder features to rows of the LM's input embedding (``--vis_proj``).

Every kind takes one image's features ``[n, K_in, d_vis]`` and returns ``[n, K_out, H]``:

============== ========================================================== ===============
spec           what                                                       K_out
============== ========================================================== ===============
``linear``     one ``Linear(d_vis, H)`` per token (the default; every     K_in
               checkpoint from before ``--vis_proj`` is one)
``baseline``   ``Linear`` then ``LayerNorm(H)`` (the original code's       K_in
               "baseline" projection)
``mlp``        ``Linear(d_vis, H)``, GELU, ``Linear(H, H)`` (LLaVA-1.5)    K_in
``perceiver``  ``perceiver:N`` (default N = 16): N learned latent queries  N
               cross-attend to the image's tokens (plus a learned position
               embedding), then an MLP; one block, pre-LayerNorm
``words``      per-cell classifiers whose predicted labels are looked up   cells x (name
               in the LM's own word space (:class:`Words`); needs a        words + heads)
               concept space (``config.concepts``) and labelled images     + 2 per image
               to train (``--aux_loss``)                                   head
``words:cell`` the same heads (the same tensors), read out as one row per  cells + 1 per
               cell: the mean of its name's and its labels' rows, so each  image head
               row holds the whole cell (MMCA keeps image rows apart: an
               image token attends only to itself, so a cell spread over
               several rows cannot be bound back together)
============== ========================================================== ===============

A checkpoint stores the module's ``state_dict`` under ``projection.`` (a linear one as
``projection.weight`` / ``projection.bias``, as always) and its spec in ``config.json``'s
``vis_proj``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("linear", "baseline", "mlp", "perceiver", "words")
DEFAULT_LATENTS = 16
WORDS_LAYOUTS = ("", "cell")  # words: the rows of every word; words:cell: one row per cell


def same_tensors(a: str, b: str) -> bool:
    """Whether projections ``a`` and ``b`` hold the same tensors (a checkpoint of one loads into the
    other): the same spec, or two layouts of the words projection."""
    return a == b or (parse_spec(a)[0] == parse_spec(b)[0] == "words")


def parse_spec(spec: str) -> tuple[str, int]:
    """``"perceiver:32"`` -> ``("perceiver", 32)``; other kinds take no argument (latents 0)."""
    if not isinstance(spec, str):
        raise ValueError(f"vis_proj must be a string such as 'linear' or 'perceiver:16', got {spec!r}")
    kind, _, arg = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown vis_proj {spec!r}: choose one of {', '.join(KINDS)} (perceiver:N for N latents)")
    if kind == "words":
        if arg not in WORDS_LAYOUTS:
            raise ValueError(f"vis_proj {spec!r}: the words projection's layout after ':' is one of "
                             f"{', '.join(repr(x) for x in WORDS_LAYOUTS if x)} (or none)")
        return kind, 0
    if kind != "perceiver":
        if arg:
            raise ValueError(f"vis_proj {kind!r} takes no ':' argument, got {spec!r}")
        return kind, 0
    try:
        n = int(arg) if arg else DEFAULT_LATENTS
    except ValueError:
        raise ValueError(f"vis_proj {spec!r}: the number of latents after ':' must be an integer") from None
    if not 1 <= n <= 4096:
        raise ValueError(f"vis_proj {spec!r}: the number of latents must be between 1 and 4096")
    return kind, n


class Perceiver(nn.Module):
    """``latents`` learned queries attend (multi-head) to the image's projected tokens."""

    def __init__(self, d_vis: int, hidden: int, in_tokens: int, latents: int, heads: int | None = None):
        super().__init__()
        heads = heads or next(h for h in (8, 4, 2, 1) if hidden % h == 0)
        self.inp = nn.Linear(d_vis, hidden)
        self.pos = nn.Parameter(torch.zeros(in_tokens, hidden))  # which token of the grid a feature came from
        self.latents = nn.Parameter(torch.randn(latents, hidden) * hidden ** -0.5)
        self.norm_q = nn.LayerNorm(hidden)
        self.norm_kv = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, K_in, d_vis] -> [n, latents, H]
        if x.shape[1] != self.pos.shape[0]:
            raise ValueError(f"the perceiver projection was built for {self.pos.shape[0]} image tokens, got {x.shape[1]}")
        kv = self.norm_kv(self.inp(x) + self.pos)  # [n, K_in, H]
        q = self.norm_q(self.latents).expand(x.shape[0], -1, -1)  # [n, latents, H]
        y = self.latents + self.attn(q, kv, kv, need_weights=False)[0]
        return y + self.mlp(self.norm_mlp(y))


class Words(nn.Module):
    """Sharp image rows in the LM's own word space, for images whose grid cells carry labels.

    Each of the ``in_tokens`` feature rows (one per cell of the image's grid, e.g.
    ``efficientnet-lite0:head@3``) goes through a small MLP and one classifier per *cell head* (in the
    shapes world: size, colour and shape, each with an ``empty`` class); each *image head* (the word
    written across the image) reads the concatenated features of the cells it names. Every head's
    class probabilities mix that head's table of word embeddings (the LM's input embedding of each
    label, copied in at the start of training by :meth:`init_tables` and kept fixed), so a confident
    head writes the embedding of its word. An image becomes, per cell, the words of the cell's name
    ("top", "left") followed by one row per cell head ("small", "red", "circle"), then for each image
    head its name and value ("word", "cat"): a scene the LM reads like a sentence, with every position
    spelled out. ``concepts`` (stored in the checkpoint's config) names the cells, heads and labels.
    The heads learn from per-cell labels through :meth:`aux_loss` (the trainer's ``--aux_loss``) and
    from the LM's loss through the mixes."""

    def __init__(self, d_vis: int, hidden: int, in_tokens: int, concepts: dict, width: int = 512,
                 layout: str = ""):
        super().__init__()
        check_concepts(concepts, in_tokens)
        self.concepts = concepts
        self.layout = layout
        self.cell_heads = list(concepts["cell_heads"])
        self.image_heads = list(concepts["image_heads"])
        self.name_words = max(len(n.split()) for n in concepts["cells"])
        self.norm = nn.LayerNorm(d_vis)
        self.cell_mlp = nn.Sequential(nn.Linear(d_vis, width), nn.GELU())
        self.cell_out = nn.ModuleDict({h: nn.Linear(width, len(v)) for h, v in concepts["cell_heads"].items()})
        self.image_out = nn.ModuleDict({
            h: nn.Sequential(nn.Linear(len(v["cells"]) * d_vis, width), nn.GELU(), nn.Linear(width, len(v["labels"])))
            for h, v in concepts["image_heads"].items()})
        # fixed word tables: the LM's embedding of every label, cell-name word and image-head name
        self.tables = nn.ParameterDict({h: nn.Parameter(torch.zeros(len(labels), hidden), requires_grad=False)
                                        for h, labels in self.labels().items()})
        self.cell_names = nn.Parameter(torch.zeros(in_tokens, self.name_words, hidden), requires_grad=False)
        self.head_names = nn.Parameter(torch.zeros(len(self.image_heads), hidden), requires_grad=False)
        if layout == "cell":
            self.out_tokens = in_tokens + len(self.image_heads)
            # per cell, the weight of each name row in the cell's mean (0 for the "," padding a short name)
            n = [len(c.split()) for c in concepts["cells"]]
            w = torch.tensor([[1.0 if j < k else 0.0 for j in range(self.name_words)] for k in n])
            self.register_buffer("name_weight", w, persistent=False)
        else:
            self.out_tokens = in_tokens * (self.name_words + len(self.cell_heads)) + 2 * len(self.image_heads)

    def labels(self) -> dict[str, list[str]]:
        """head -> its labels, cell heads first, in row order."""
        out = {h: list(v) for h, v in self.concepts["cell_heads"].items()}
        out.update({h: list(v["labels"]) for h, v in self.concepts["image_heads"].items()})
        return out

    @torch.no_grad()
    def init_tables(self, tokenizer, embedding: torch.Tensor) -> None:
        """Fill the word tables from the LM's input ``embedding`` ``[V, H]``: each word's row is the mean
        of its tokens' rows (tokenized with a leading space, as inside a sentence). A cell name
        shorter than the longest ends with the embedding of ",".""" 
        def row(text: str) -> torch.Tensor:
            ids = tokenizer.encode(" " + text, add_special_tokens=False)
            return embedding[ids].float().mean(0)

        for h, labels in self.labels().items():
            self.tables[h].copy_(torch.stack([row(x) for x in labels]))
        for c, name in enumerate(self.concepts["cells"]):
            words = name.split()
            words += [","] * (self.name_words - len(words))
            self.cell_names[c].copy_(torch.stack([row(w) for w in words]))
        self.head_names.copy_(torch.stack([row(h) for h in self.image_heads]))

    def logits(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[n, cells, d_vis]`` -> head -> logits (``[n, cells, C]`` for a cell head, ``[n, C]`` for an image head)."""
        x = self.norm(feats)
        h = self.cell_mlp(x)
        out = {name: head(h) for name, head in self.cell_out.items()}
        for name, spec in self.concepts["image_heads"].items():
            out[name] = self.image_out[name](x[:, spec["cells"]].flatten(1))
        return out

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # [n, cells, d_vis] -> [n, K_out, H]
        lg = self.logits(feats)
        n, cells = feats.shape[:2]
        heads = torch.stack([lg[h].float().softmax(-1) @ self.tables[h].float() for h in self.cell_heads], 2)
        names = self.cell_names.float().expand(n, -1, -1, -1)  # [n, cells, name_words, H]
        if self.layout == "cell":  # one row per cell: the mean of its name's words and its labels
            w = self.name_weight.to(names.device)
            total = (names * w[None, :, :, None]).sum(2) + heads.sum(2)
            rows = [total / (w.sum(1)[None, :, None] + heads.shape[2])]  # [n, cells, H]
        else:
            rows = [torch.cat([names, heads], 2).flatten(1, 2)]  # [n, cells * (name_words + heads), H]
        for i, h in enumerate(self.image_heads):
            value = lg[h].float().softmax(-1) @ self.tables[h].float()  # [n, H]
            name = self.head_names[i].float().expand(n, -1)
            rows.append(((name + value) / 2)[:, None] if self.layout == "cell" else torch.stack([name, value], 1))
        return torch.cat(rows, 1).to(feats.dtype)

    def aux_loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of every head against ``labels`` ``[n, cells * cell heads + image heads]``
        (cell heads' labels cell by cell in head order, then the image heads'; -100 = unlabelled)."""
        lg = self.logits(feats)
        n, cells = feats.shape[:2]
        k = cells * len(self.cell_heads)
        cell_y = labels[:, :k].reshape(n, cells, len(self.cell_heads))
        losses = [F.cross_entropy(lg[h].float().flatten(0, 1), cell_y[..., i].flatten(), ignore_index=-100)
                  for i, h in enumerate(self.cell_heads)]
        losses += [F.cross_entropy(lg[h].float(), labels[:, k + i], ignore_index=-100)
                   for i, h in enumerate(self.image_heads)]
        return torch.stack(losses).mean()

    @torch.no_grad()
    def predict(self, feats: torch.Tensor) -> list[dict]:
        """Each image's most likely label per head: ``{"cells": [{head: label}, ...], head: label}``."""
        lg = self.logits(feats)
        names = self.labels()
        out = []
        for i in range(feats.shape[0]):
            d = {"cells": [{h: names[h][int(lg[h][i, c].argmax())] for h in self.cell_heads}
                           for c in range(feats.shape[1])]}
            d.update({h: names[h][int(lg[h][i].argmax())] for h in self.image_heads})
            out.append(d)
        return out


def check_concepts(concepts, in_tokens: int | None = None) -> None:
    """A clear error unless ``concepts`` is ``{"cells": [names], "cell_heads": {head: [labels]},
    "image_heads": {head: {"cells": [indices], "labels": [labels]}}}`` (with ``in_tokens`` cells)."""
    def fail(why):
        raise ValueError(f"the 'words' projection's concept space is malformed: {why}")

    if not isinstance(concepts, dict) or set(concepts) != {"cells", "cell_heads", "image_heads"}:
        fail("expected an object with exactly the keys cells, cell_heads and image_heads")
    cells = concepts["cells"]
    if not isinstance(cells, list) or not cells or not all(isinstance(c, str) and c.split() for c in cells):
        fail("'cells' must be a non-empty list of cell names")
    if in_tokens is not None and len(cells) != in_tokens:
        fail(f"{len(cells)} cells named, but the encoder gives {in_tokens} tokens per image (use a grid with one "
             f"token per cell, e.g. efficientnet-lite0:head@3 for a 3x3 grid)")
    heads = concepts["cell_heads"]
    if not isinstance(heads, dict) or not heads:
        fail("'cell_heads' must name at least one head")
    for h, labels in heads.items():
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
            fail(f"cell head {h!r} needs a list of at least two labels")
    if not isinstance(concepts["image_heads"], dict):
        fail("'image_heads' must be an object")
    for h, spec in concepts["image_heads"].items():
        if (not isinstance(spec, dict) or not isinstance(spec.get("labels"), list) or len(spec["labels"]) < 2
                or not isinstance(spec.get("cells"), list) or not spec["cells"]
                or not all(isinstance(c, int) and 0 <= c < len(cells) for c in spec["cells"])):
            fail(f"image head {h!r} needs 'labels' (two or more) and 'cells' (indices of cells it reads)")
        if h in heads:
            fail(f"{h!r} is both a cell head and an image head")


class Projection(nn.Module):
    """``forward(features [n, K_in, d_vis]) -> [n, K_out, H]`` for any kind of :data:`KINDS`."""

    def __init__(self, spec: str, d_vis: int, hidden: int, in_tokens: int, concepts: dict | None = None):
        super().__init__()
        self.spec = spec
        self.kind, latents = parse_spec(spec)
        self.in_tokens = in_tokens
        if self.kind == "words" and concepts is None:
            raise ValueError("the 'words' projection needs a concept space (config.concepts): which cells an "
                             "image has and which labels each is classified into")
        self.out_tokens = latents if self.kind == "perceiver" else in_tokens
        self.per_token = self.kind not in ("perceiver", "words")  # each row depends on its own feature row alone
        if self.kind == "linear":
            self.net = nn.Linear(d_vis, hidden)
        elif self.kind == "baseline":
            self.net = nn.Sequential(nn.Linear(d_vis, hidden), nn.LayerNorm(hidden))
        elif self.kind == "mlp":
            self.net = nn.Sequential(nn.Linear(d_vis, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        elif self.kind == "perceiver":
            self.net = Perceiver(d_vis, hidden, in_tokens, latents)
        else:
            self.net = Words(d_vis, hidden, in_tokens, concepts, layout=spec.partition(":")[2])
            self.out_tokens = self.net.out_tokens

    @property
    def concepts(self) -> dict | None:
        """The concept space of a ``words`` projection (None for the other kinds)."""
        return self.net.concepts if self.kind == "words" else None

    @property
    def first(self) -> nn.Linear:
        """The layer that reads the features (its weight sets the device and dtype)."""
        n = self.net
        if isinstance(n, Words):
            return n.cell_mlp[0]
        return n if isinstance(n, nn.Linear) else (n.inp if isinstance(n, Perceiver) else n[0])

    # A linear projection keeps the attributes it had as a bare nn.Linear.
    @property
    def weight(self) -> nn.Parameter:
        return self._linear().weight

    @property
    def bias(self) -> nn.Parameter:
        return self._linear().bias

    def _linear(self) -> nn.Linear:
        if self.kind != "linear":
            raise AttributeError(f"a {self.spec!r} projection has no single weight; use .net or .parameters()")
        return self.net

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats)

    # A linear projection keeps the checkpoint names it always had (``projection.weight``/``.bias``).
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {"projection." + _strip(k, self.kind): v for k, v in self.state_dict().items()}

    def checkpoint_key(self, name: str) -> str:
        """The state_dict name of a module parameter in the checkpoint (``net.weight`` -> ``projection.weight``)."""
        return "projection." + _strip(name, self.kind)

    @torch.no_grad()
    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy in ``projection.*`` tensors named as :meth:`checkpoint_tensors` names them (the caller,
        :func:`visualchat.checkpoint.load_trainable`, has checked names, shapes and values)."""
        for k, p in self.state_dict(keep_vars=True).items():
            p.copy_(tensors[self.checkpoint_key(k)].to(p.dtype))


def _strip(name: str, kind: str) -> str:
    return name[len("net."):] if kind == "linear" else name
